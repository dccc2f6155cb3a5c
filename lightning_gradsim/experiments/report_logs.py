"""Find and read a run's :class:`~lightning_gradsim.GradSimMonitor` metrics, for ``gradsim report``.

Sources, found anywhere under the folder given (each becomes one or more :class:`RunLog`):

* Lightning ``CSVLogger`` files: every ``metrics.csv`` (one run per file);
* TensorBoard event files: every folder holding ``events.out.tfevents.*`` (one run per folder),
  read with ``tensorboard``'s ``EventAccumulator`` (``pip install 'lightning-gradsim[experiments]'``).
  A folder whose ``metrics.csv`` already holds the monitor's metrics is read from the CSV only
  (a ``CSVLogger`` and a ``TensorBoardLogger`` with the same ``save_dir`` and name share a folder);
* ``gradsim compare``'s ``result.json``: one run per method, variant and seed (its per-step cosine;
  the gate's decisions and weights too when the file has them);
* ``gradsim table1``'s ``result.json``: one run per method, angle and seed; it holds the *per-epoch*
  mean cosine only (the stacked trainer logs no per-step metrics), so steps are epochs there, and the
  open fraction comes from ``runs.csv``.

Only metrics named like the monitor's (``gradsim/<key>/<task>``, or ``gradsim/<gate path>/<key>/<task>``
with several gates) are kept; other columns (losses, accuracies) are ignored.

>>> parse_metric("gradsim/cos/rotated"), parse_metric("gradsim/encoder.gate/gate_open/aux")
(('rotated', 'cos'), ('encoder.gate/aux', 'gate_open'))
>>> parse_metric("train/loss") is None, parse_metric("gradsim/grad_norm/main") is None
(True, True)
"""

from __future__ import annotations

import csv
import json
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

__all__ = ["KEYS", "Series", "RunLog", "parse_metric", "find_runs", "read_metrics_csv", "read_tensorboard"]

#: the monitor's per-task metric keys the report reads.
KEYS = ("cos", "cos_smoothed", "weight", "gate_open", "open_fraction", "cos_mean", "cos_se", "noise_decided")
_METRIC = re.compile(r"^gradsim/(?:(?P<path>.+)/)?(?P<key>" + "|".join(KEYS) + r")/(?P<task>[^/]+)$")


@dataclass
class Series:
    """One metric over steps: ``steps`` (int) and ``values`` (float), sorted by step, no NaN."""

    steps: np.ndarray
    values: np.ndarray

    @staticmethod
    def from_pairs(pairs: Iterable[tuple[float, float]]) -> Series:
        """Sort by step, keep the last value of a step logged twice (a resumed run), drop NaN."""
        last: dict[int, float] = {}
        for step, value in pairs:
            if value is not None and not math.isnan(value):
                last[int(step)] = float(value)
        steps = np.array(sorted(last), dtype=np.int64)
        return Series(steps, np.array([last[int(s)] for s in steps], dtype=np.float64))

    def __len__(self) -> int:
        return len(self.steps)


@dataclass
class RunLog:
    """A run's monitor metrics: ``tasks[task][key]`` is a :class:`Series` (``key`` in :data:`KEYS`)."""

    label: str
    source: str  # "csv", "tensorboard", "compare", "table1"
    path: str
    tasks: dict[str, dict[str, Series]] = field(default_factory=dict)
    #: the unit of ``steps``: "step" (monitor logs) or "epoch" (table1's per-epoch means).
    unit: str = "step"
    #: scalars a source gives instead of a per-step series (table1: the gate's open fraction).
    scalars: dict[str, dict[str, float]] = field(default_factory=dict)

    @staticmethod
    def from_arrays(
        label: str, task: str, steps: Sequence[float], cos: Sequence[float], **keys: Sequence[float]
    ) -> RunLog:
        """A one-task run from arrays in memory: ``cos`` and any of :data:`KEYS` (``gate_open=...``) at ``steps``."""
        unknown = set(keys) - set(KEYS)
        if unknown:
            raise ValueError(f"Unknown keys {sorted(unknown)}; choose from {', '.join(KEYS)}.")
        series = {k: Series.from_pairs(zip(steps, v)) for k, v in {"cos": cos, **keys}.items()}
        return RunLog(label, "arrays", "", {task: series})


def parse_metric(name: str) -> tuple[str, str] | None:
    """``(task, key)`` of a monitor metric name, or ``None`` for any other name.

    With several gates the task is ``<gate path>/<task>``.
    """
    m = _METRIC.match(name)
    if m is None:
        return None
    task = m["task"] if m["path"] is None else f"{m['path']}/{m['task']}"
    return task, m["key"]


def _tasks_from(columns: dict[str, list[tuple[float, float]]]) -> dict[str, dict[str, Series]]:
    tasks: dict[str, dict[str, Series]] = {}
    for name, pairs in columns.items():
        parsed = parse_metric(name)
        if parsed is not None:
            series = Series.from_pairs(pairs)
            if len(series):
                tasks.setdefault(parsed[0], {})[parsed[1]] = series
    return {t: keys for t, keys in tasks.items() if "cos" in keys}


def read_metrics_csv(path: str | Path) -> dict[str, dict[str, Series]]:
    """The monitor's metrics in a Lightning ``CSVLogger`` ``metrics.csv`` (rows with blanks are fine)."""
    columns: dict[str, list[tuple[float, float]]] = {}
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            step = row.get("step")
            if step in (None, ""):
                continue
            for name, value in row.items():
                if name and value not in (None, "") and name.startswith("gradsim/"):
                    columns.setdefault(name, []).append((float(step), float(value)))
    return _tasks_from(columns)


def read_tensorboard(folder: str | Path) -> dict[str, dict[str, Series]]:
    """The monitor's scalars in a folder's TensorBoard event files (needs ``tensorboard``)."""
    from tensorboard.backend.event_processing.event_accumulator import (  # type: ignore[import-untyped]
        EventAccumulator,
    )

    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    acc.Reload()
    columns = {
        tag: [(e.step, e.value) for e in acc.Scalars(tag)]
        for tag in acc.Tags().get("scalars", [])
        if tag.startswith("gradsim/")
    }
    return _tasks_from(columns)


def _rel(path: Path, root: Path) -> str:
    rel = path.relative_to(root).as_posix() if path != root else "."
    return rel or "."


def _prefix(path: Path, root: Path) -> str:
    """``"<folder>: "`` of a result.json below ``root``; empty for one in ``root`` itself."""
    rel = _rel(path.parent, root)
    return "" if rel == "." else f"{rel}: "


def _compare_runs(path: Path, data: dict, root: Path) -> list[RunLog]:
    out = []
    for run in data.get("runs", []):
        row = run.get("row", {})
        label = f"{_prefix(path, root)}{row.get('method')} {row.get('variant')} seed={row.get('seed')}"
        steps = run.get("cos_steps", [])
        tasks: dict[str, dict[str, Series]] = {}
        for task, values in run.get("cos", {}).items():
            tasks[task] = {"cos": Series.from_pairs(zip(steps, values))}
        for name, values in run.get("gradsim", {}).items():  # the decisions, when compare stored them
            parsed = parse_metric(name)
            if parsed is not None and parsed[0] in tasks:
                tasks[parsed[0]][parsed[1]] = Series.from_pairs(zip(steps, values))
        if tasks:
            out.append(RunLog(label, "compare", str(path), tasks))
    return out


def _table1_runs(path: Path, data: dict, root: Path) -> list[RunLog]:
    rows = data.get("rows", [])
    open_frac = {(r["method"], float(r["angle"]), int(r["seed"])): r.get("open_fraction") for r in rows}
    seeds_of: dict[tuple[str, float], list[int]] = {}
    for r in rows:  # table1 appends each (method, angle)'s curves in the order of its rows
        seeds_of.setdefault((r["method"], float(r["angle"])), []).append(int(r["seed"]))
    task = data.get("aux_task", "rotated")
    out = []
    for curve in data.get("cosine_curves", []):
        method, angle = curve["method"], float(curve["angle"])
        for seed, values in zip(seeds_of.get((method, angle), []), curve["per_seed"]):
            label = f"{_prefix(path, root)}{method} angle={angle:g} seed={seed}"
            series = Series.from_pairs(zip(range(1, len(values) + 1), values))
            run = RunLog(label, "table1", str(path), {task: {"cos": series}}, unit="epoch")
            frac = open_frac.get((method, angle, seed))
            if frac is not None and not (isinstance(frac, float) and math.isnan(frac)):
                run.scalars[task] = {"open_fraction": float(frac)}
            out.append(run)
    return out


def find_runs(root: str | Path) -> tuple[list[RunLog], list[str]]:
    """Every run with monitor metrics under ``root``, and notes on what was skipped and why.

    Without ``tensorboard`` installed, event files are skipped with a note, or, when nothing else
    is found, ``ModuleNotFoundError`` (named ``tensorboard``) is raised.
    """
    root = Path(root)
    runs: list[RunLog] = []
    notes: list[str] = []
    csv_dirs: set[Path] = set()
    no_tensorboard: list[str] = []
    for path in sorted(root.rglob("metrics.csv")):
        tasks = read_metrics_csv(path)
        if tasks:
            runs.append(RunLog(_rel(path.parent, root), "csv", str(path), tasks))
            csv_dirs.add(path.parent)
    event_dirs = sorted({p.parent for p in root.rglob("events.out.tfevents.*")})
    for folder in event_dirs:
        if folder in csv_dirs:
            notes.append(f"{_rel(folder, root)}: TensorBoard events skipped (the metrics.csv beside them has the same)")
            continue
        try:
            tasks = read_tensorboard(folder)
        except ModuleNotFoundError as err:
            if not (err.name or "").startswith("tensorboard"):
                raise
            no_tensorboard.append(_rel(folder, root))
            continue
        if tasks:
            runs.append(RunLog(_rel(folder, root), "tensorboard", str(folder), tasks))
    for path in sorted(root.rglob("result.json")):
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if not isinstance(data, dict):
            continue
        if "cosine_curves" in data:
            runs.extend(_table1_runs(path, data, root))
            notes.append(
                f"{_rel(path.parent, root)}: gradsim table1 keeps the per-epoch mean cosine only (steps are epochs; "
                "no per-step decisions or weights, so no weight and no decided-by-noise fraction)"
            )
        elif isinstance(data.get("runs"), list) and any("cos_steps" in r for r in data["runs"]):
            found = _compare_runs(path, data, root)
            runs.extend(found)
            if found and not any("gate_open" in t for r in found for t in r.tasks.values()):
                notes.append(
                    f"{_rel(path.parent, root)}: this gradsim compare result.json has the per-step cosine only "
                    "(no gate decisions or weights)"
                )
    if no_tensorboard:
        if not runs:
            raise ModuleNotFoundError("No module named 'tensorboard'", name="tensorboard")
        notes.append(
            f"TensorBoard event files not read ({', '.join(no_tensorboard)}): they need the package 'tensorboard' "
            "(pip install 'lightning-gradsim[experiments]')"
        )
    return runs, notes
