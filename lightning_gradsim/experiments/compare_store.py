"""The finished runs of one :func:`~lightning_gradsim.experiments.compare.compare`, kept as they finish.

Each finished run is one JSON file in ``<out_dir>/finished/`` named by a hash of its
:class:`~lightning_gradsim.experiments.compare.RunSpec`, written atomically; a crash loses at most the
runs in progress. With ``resume=True`` (``gradsim compare --resume``) runs already there are not run
again; once the final outputs are written the folder is removed.

>>> import tempfile
>>> store = RunStore(tempfile.mkdtemp(), resume=False)
>>> store.put({"setup": "s", "seed": 0}, {"row": {"test_error": 0.1}})
>>> RunStore(store.folder.parent, resume=True).get({"setup": "s", "seed": 0})
{'row': {'test_error': 0.1}}
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

__all__ = ["RunStore"]


class RunStore:
    """``<out_dir>/finished/<hash of the run's spec>.json`` per finished run."""

    def __init__(self, out_dir: str | os.PathLike[str], resume: bool) -> None:
        self.folder = Path(out_dir) / "finished"
        existing = sorted(self.folder.glob("*.json")) if self.folder.is_dir() else []
        if existing and not resume:
            raise ValueError(
                f"{out_dir} holds {len(existing)} finished run(s) of a compare that did not end: add --resume "
                "(resume=True) to keep them and run the rest, or give another output folder."
            )
        self.resumed = len(existing)

    @staticmethod
    def _key(spec: Any) -> str:
        data = _as_dict(spec)
        text = json.dumps(data, sort_keys=True, default=repr)
        return hashlib.sha1(text.encode()).hexdigest()[:20]

    def get(self, spec: Any) -> dict[str, Any] | None:
        """The stored result of ``spec``'s run, or ``None``."""
        path = self.folder / f"{self._key(spec)}.json"
        if not path.is_file():
            return None
        with open(path) as f:
            return dict(json.load(f)["run"])

    def put(self, spec: Any, run: dict[str, Any]) -> None:
        """Keep ``run`` (JSON-serialisable) as the result of ``spec``."""
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / f"{self._key(spec)}.json"
        data = _as_dict(spec)
        with open(str(path) + ".tmp", "w") as f:
            json.dump({"spec": data, "run": run}, f, default=repr)
        os.replace(str(path) + ".tmp", path)

    def clear(self) -> None:
        """Remove the folder (the compare's outputs now hold every run)."""
        shutil.rmtree(self.folder, ignore_errors=True)


def _as_dict(spec: Any) -> Any:
    if dataclasses.is_dataclass(spec) and not isinstance(spec, type):
        return dataclasses.asdict(spec)
    return spec
