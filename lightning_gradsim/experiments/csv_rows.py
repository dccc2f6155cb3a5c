"""Writing an experiment's rows (a list of dicts) as a CSV file, the one way every command does it.

>>> import tempfile, pathlib
>>> path = pathlib.Path(tempfile.mkdtemp()) / "runs.csv"
>>> write_csv(path, [{"method": "sum", "error": 4.5}, {"method": "unweighted", "error": 4.25, "open": 0.9}])
>>> print(path.read_text().replace("\\r", ""), end="")
method,error,open
sum,4.5,
unweighted,4.25,0.9
"""

from __future__ import annotations

import csv
import os
from collections.abc import Iterable, Mapping
from typing import Any

__all__ = ["write_csv"]


def write_csv(path: str | os.PathLike[str], rows: Iterable[Mapping[str, Any]]) -> None:
    """Write ``rows`` to ``path`` with a header: every key that occurs, in the order first seen (a
    row without a key leaves its cell empty)."""
    rows = list(rows)
    fieldnames = list(dict.fromkeys(k for row in rows for k in row))
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fieldnames)
        writer.writeheader()
        writer.writerows(rows)
