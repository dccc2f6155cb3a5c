"""``gradsim report LOGDIR --out DIR``: does each auxiliary task help the main task, and how sure is that?

Reads the :class:`~lightning_gradsim.GradSimMonitor` metrics of every run found under ``LOGDIR``
(Lightning ``CSVLogger`` ``metrics.csv`` files, TensorBoard event files, ``gradsim compare`` and
``gradsim table1`` ``result.json``; see :mod:`~lightning_gradsim.experiments.report_logs`) and writes,
per run and auxiliary task, to ``DIR``:

* ``transfer.md`` -- a table: the mean cosine with its 95% interval, the mean cosine of the first
  and of the last quarter of the logged steps (each with its interval), the open fraction, the mean
  applied weight, the fraction of decisions "decided by noise", and a one-line reading;
* ``transfer.png`` -- per run and task: the cosine over steps (per step, window means, the running
  mean with its 95% band, the threshold) and the gate's open fraction (and weight) over steps;
* ``transfer.csv`` -- the table's numbers, one row per run and task (:func:`transfer_row`).

From arrays in memory (an experiment that keeps its own per-step cosines), without log files:
``transfer_row(task_report(RunLog.from_arrays("run", "aux", steps, cos, gate_open=...), "aux"))``.

Where the numbers come from (:mod:`~lightning_gradsim.experiments.report_stats` has the rules):

* **mean cosine and interval**: if the gate logged its own running mean and standard error
  (``gradsim/cos_mean/<task>``, ``gradsim/cos_se/<task>``), their last values, ``mean ± 1.96 SE``;
  otherwise the mean of the logged per-step cosines, with a batch-means interval over 20 windows;
* **first / last quarter**: the first and last ``n // 4`` logged cosines, batch means within each;
* **open fraction**: the last logged ``open_fraction`` (the gate's own count over every measured
  step, logged or not), else the mean of the logged ``gate_open``; **weight**: the mean of the
  logged ``weight``;
* **decided by noise**: the last logged ``gradsim/noise_decided/<task>`` if the gate logs it; else
  the fraction of logged steps whose decision cosine (``cos_smoothed`` when logged, else ``cos``) is
  within two running standard errors of ``--threshold``;
* **reading**: the rules of :func:`~lightning_gradsim.experiments.report_stats.reading`.

Only logged steps count: with ``GradSimMonitor(logging_interval=10)`` the report sees every tenth step.

>>> from lightning_gradsim.experiments.report_logs import RunLog, Series
>>> steps = np.arange(100)
>>> cos = np.where(steps < 60, 0.4, -0.4) + 0.05 * np.sin(steps)
>>> run = RunLog("demo", "csv", "demo/metrics.csv", {"aux": {"cos": Series(steps, cos)}})
>>> rep = task_report(run, "aux", threshold=0.0)
>>> rep.reading, rep.open_fraction is None
('conflict after step 60', True)
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .csv_rows import write_csv
from .report_logs import RunLog, Series, find_runs
from .report_stats import WINDOWS, batch_means, interval, noise_fraction, reading, running_se

__all__ = ["TaskReport", "task_report", "transfer_row", "build_reports", "write_report", "main"]

#: the most (run, task) rows drawn in ``transfer.png`` (the table lists all of them).
MAX_PLOTTED = 12


@dataclass
class TaskReport:
    """The report's numbers for one auxiliary task of one run (``nan``/``None``: not available)."""

    run: str
    task: str
    source: str
    unit: str
    n: int
    mean: float
    low: float
    high: float
    se: float
    #: where the interval comes from: "batch means (W windows)" or "the gate's logged cos_se".
    se_source: str
    early: tuple[float, float, float]
    late: tuple[float, float, float]
    open_fraction: float | None
    weight: float | None
    noise: float | None
    noise_source: str
    reading: str
    change_step: int | None
    series: dict[str, Series] = field(default_factory=dict, repr=False)


def _aligned(series: Series, steps: np.ndarray) -> np.ndarray | None:
    """``series``' values at ``steps``, or None unless it has every one of them."""
    where = {int(s): i for i, s in enumerate(series.steps)}
    if not all(int(s) in where for s in steps):
        return None
    return series.values[[where[int(s)] for s in steps]]


def task_report(run: RunLog, task: str, threshold: float = 0.0, windows: int = WINDOWS) -> TaskReport:
    """The numbers and the reading of one task of one run (module docs)."""
    keys = run.tasks[task]
    cos_s = keys["cos"]
    steps, cos = cos_s.steps, cos_s.values
    mean, se, w = batch_means(cos, windows)
    _, low, high = interval(cos, windows)
    se_source = f"batch means ({w} windows)"
    whole = None
    if "cos_mean" in keys and "cos_se" in keys and math.isfinite(keys["cos_se"].values[-1]):
        mean, se = float(keys["cos_mean"].values[-1]), float(keys["cos_se"].values[-1])
        low, high = mean - 1.96 * se, mean + 1.96 * se
        se_source, whole = "the gate's logged cos_se", (low, high)
    q = len(cos) // 4
    early = interval(cos[:q], windows) if q else (math.nan,) * 3
    late = interval(cos[len(cos) - q :], windows) if q else (math.nan,) * 3
    text, change = reading(steps, cos, threshold, whole, windows, run.unit)
    scalars = run.scalars.get(task, {})
    if "open_fraction" in keys:  # the gate's own count, over every measured step (logged or not)
        open_fraction: float | None = float(keys["open_fraction"].values[-1])
    elif "gate_open" in keys:
        open_fraction = float(keys["gate_open"].values.mean())
    else:
        open_fraction = scalars.get("open_fraction")
    weight = float(keys["weight"].values.mean()) if "weight" in keys else None
    noise: float | None = None
    noise_source = "not available"
    if "noise_decided" in keys:
        noise, noise_source = float(keys["noise_decided"].values[-1]), "the gate's logged noise_decided"
    elif run.unit == "step":
        smoothed = _aligned(keys["cos_smoothed"], steps) if "cos_smoothed" in keys else None
        decision = smoothed if smoothed is not None else cos
        noise = noise_fraction(decision, cos, threshold, windows)
        noise_source = "computed: |decision cosine - threshold| < 2 running SE"
    return TaskReport(
        run.label,
        task,
        run.source,
        run.unit,
        len(cos),
        mean,
        low,
        high,
        se,
        se_source,
        tuple(early),  # type: ignore[arg-type]
        tuple(late),  # type: ignore[arg-type]
        open_fraction,
        weight,
        noise,
        noise_source,
        text,
        change,
        dict(keys),
    )


def transfer_row(report: TaskReport) -> dict[str, Any]:
    """The numbers of one :class:`TaskReport` as a flat row (``transfer.csv``; a ``runs.csv`` can add them).

    >>> from lightning_gradsim.experiments.report_logs import RunLog
    >>> run = RunLog.from_arrays("r", "aux", np.arange(40), np.full(40, 0.2) + 0.01 * np.sin(np.arange(40)))
    >>> row = transfer_row(task_report(run, "aux"))
    >>> row["reading"], round(row["cos_mean"], 2), row["open_fraction"]
    ('positive transfer throughout', 0.2, None)
    """
    return {
        "run": report.run,
        "task": report.task,
        "source": report.source,
        "unit": report.unit,
        "n": report.n,
        "cos_mean": report.mean,
        "cos_low": report.low,
        "cos_high": report.high,
        "cos_se": report.se,
        "se_source": report.se_source,
        "cos_first_quarter": report.early[0],
        "cos_last_quarter": report.late[0],
        "open_fraction": report.open_fraction,
        "weight": report.weight,
        "noise_decided": report.noise,
        "reading": report.reading,
        "change_step": report.change_step,
    }


def build_reports(runs: Sequence[RunLog], threshold: float = 0.0, windows: int = WINDOWS) -> list[TaskReport]:
    """One :class:`TaskReport` per run and auxiliary task, in the runs' order, tasks sorted."""
    return [task_report(run, task, threshold, windows) for run in runs for task in sorted(run.tasks)]


def _fmt(value: float | None, digits: int = 3) -> str:
    return "n/a" if value is None or not math.isfinite(value) else f"{value:.{digits}f}"


def _ci(values: tuple[float, float, float]) -> str:
    mean, low, high = values
    if not math.isfinite(mean):
        return "n/a"
    if not (math.isfinite(low) and math.isfinite(high)):
        return f"{mean:.3f}"
    return f"{mean:.3f} [{low:.3f}, {high:.3f}]"


def markdown(reports: Sequence[TaskReport], logdir: str, threshold: float, notes: Sequence[str] = ()) -> str:
    """The text of ``transfer.md``."""
    lines = [
        "# Transfer report",
        "",
        f"Runs under `{logdir}`; threshold {threshold:g}. One row per run and auxiliary task.",
        "",
        "| run | task | steps | mean cosine [95% CI] | first quarter | last quarter | open | weight "
        "| decided by noise | reading |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in reports:
        n = f"{r.n}" if r.unit == "step" else f"{r.n} {r.unit}s"
        lines.append(
            f"| {r.run} | {r.task} | {n} | {_ci((r.mean, r.low, r.high))} | {_ci(r.early)} | {_ci(r.late)} "
            f"| {_fmt(r.open_fraction)} | {_fmt(r.weight)} | {_fmt(r.noise)} | {r.reading} |"
        )
    sources = sorted({f"{r.se_source}" for r in reports})
    noise_sources = sorted({r.noise_source for r in reports})
    lines += [
        "",
        "How to read it:",
        "",
        "- *mean cosine*: the cosine between the auxiliary and the main gradient (on the shared parameters), "
        f"averaged over the logged steps; the interval is 95%, from {', '.join(sources)}.",
        "- *first / last quarter*: the same over the first and the last quarter of the logged steps.",
        "- *open*: fraction of the gate's decisions that opened it (its own count over every measured step); "
        "*weight*: mean applied weight over the logged steps.",
        "- *decided by noise*: fraction of decisions taken on a cosine within two standard errors of the "
        f"threshold ({', '.join(noise_sources)}).",
        "- *reading*: positive / conflict = the interval lies above / below the threshold; "
        "the rules are in `lightning_gradsim.experiments.report_stats`.",
    ]
    if notes:
        lines += ["", "Notes:", ""] + [f"- {note}" for note in notes]
    return "\n".join(lines) + "\n"


def plot(reports: Sequence[TaskReport], path: str | Path, threshold: float, windows: int = WINDOWS) -> None:
    """``transfer.png``: per (run, task), the cosine with its band and the gate's open fraction."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = list(reports)[:MAX_PLOTTED]
    fig, axes = plt.subplots(len(shown), 2, figsize=(11, 2.8 * len(shown)), squeeze=False)
    for (ax_cos, ax_gate), r in zip(axes, shown):
        cos = r.series["cos"]
        steps, values = cos.steps, cos.values
        ax_cos.plot(steps, values, color="C0", alpha=0.25, lw=0.7, label="cosine")
        if len(values) >= 4:
            chunks = np.array_split(np.arange(len(values)), min(windows, len(values) // 2))
            edges = [steps[c[0]] for c in chunks] + [steps[-1]]
            ax_cos.stairs([values[c].mean() for c in chunks], edges, color="C0", label="window means")
        if "cos_mean" in r.series and "cos_se" in r.series:
            mean_s, se_s = r.series["cos_mean"], r.series["cos_se"]
            se_at = _aligned(se_s, mean_s.steps)
            band_steps, mean = mean_s.steps, mean_s.values
            se = se_at if se_at is not None else np.full(len(mean), math.nan)
        else:
            band_steps = steps
            mean = np.cumsum(values) / np.arange(1, len(values) + 1)
            se = running_se(values, windows)
        ax_cos.plot(band_steps, mean, color="C1", lw=1.3, label="running mean")
        ax_cos.fill_between(band_steps, mean - 1.96 * se, mean + 1.96 * se, color="C1", alpha=0.25, label="95% band")
        ax_cos.axhline(threshold, color="grey", lw=0.8, ls=":")
        if r.change_step is not None:
            ax_cos.axvline(r.change_step, color="C3", lw=0.8, ls="--")
        ax_cos.set_ylabel("cosine")
        ax_cos.set_title(f"{r.run} / {r.task}: {r.reading}", fontsize="small", loc="left")
        ax_cos.legend(fontsize="x-small", loc="best")
        if "gate_open" in r.series:
            g = r.series["gate_open"]
            k = max(1, len(g) // windows)
            rolling = np.convolve(g.values, np.ones(k) / k, mode="valid")
            ax_gate.plot(g.steps[k - 1 :], rolling, color="C2", label=f"open (mean of {k} steps)")
        frac, weight = r.series.get("open_fraction"), r.series.get("weight")
        if frac is not None:
            ax_gate.plot(frac.steps, frac.values, color="C4", label="open fraction")
        elif r.open_fraction is not None and "gate_open" not in r.series:
            ax_gate.axhline(r.open_fraction, color="C4", label="open fraction (end of run)")
        top = 1.05
        if weight is not None:
            ax_gate.plot(weight.steps, weight.values, color="C5", lw=0.7, alpha=0.6, label="weight")
            top = max(top, float(weight.values.max()) + 0.05)
        ax_gate.set_ylim(-0.05, top)
        ax_gate.set_ylabel("gate")
        if ax_gate.get_legend_handles_labels()[0]:
            ax_gate.legend(fontsize="x-small", loc="best")
    for ax in axes[-1]:
        ax.set_xlabel(shown[-1].unit if shown else "step")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_report(
    logdir: str | Path, out: str | Path, threshold: float = 0.0, windows: int = WINDOWS
) -> tuple[list[TaskReport], dict[str, str]]:
    """Read every run under ``logdir``, write ``transfer.md``, ``transfer.png`` and ``transfer.csv`` to ``out``.

    Raises ``FileNotFoundError`` when no run with monitor metrics is found.
    """
    runs, notes = find_runs(logdir)
    if not runs:
        raise FileNotFoundError(
            f"no GradSimMonitor metrics (gradsim/cos/<task>) under {logdir}: looked for metrics.csv (CSVLogger), "
            "TensorBoard event files and gradsim compare/table1 result.json"
        )
    reports = build_reports(runs, threshold, windows)
    if len(reports) > MAX_PLOTTED:
        notes = [*notes, f"transfer.png draws the first {MAX_PLOTTED} of the {len(reports)} rows"]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    files = {"markdown": str(out / "transfer.md"), "png": str(out / "transfer.png"), "csv": str(out / "transfer.csv")}
    Path(files["markdown"]).write_text(markdown(reports, str(logdir), threshold, notes))
    write_csv(files["csv"], [transfer_row(r) for r in reports])
    plot(reports, files["png"], threshold, windows)
    return reports, files


def _check_out(out: Path) -> str | None:
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".gradsim_report_probe"
        probe.write_text("")
        probe.unlink()
    except OSError as err:
        return f"cannot write to --out {out}: {err.strerror or err}"
    return None


def main(argv: Sequence[str] | None = None) -> int:
    """``gradsim report LOGDIR --out DIR [--threshold T] [--windows W]``."""
    p = argparse.ArgumentParser(
        prog="gradsim report",
        description="Transfer report of a run's GradSimMonitor logs: per auxiliary task, the mean cosine "
        "with a 95% interval, early vs late, open fraction, weight, decided-by-noise, a reading, a PNG.",
    )
    p.add_argument("logdir", help="folder holding the run's logs (searched recursively)")
    p.add_argument("--out", required=True, help="folder for transfer.md and transfer.png")
    p.add_argument("--threshold", type=float, default=0.0, help="the gate's cosine threshold (default 0)")
    p.add_argument("--windows", type=int, default=WINDOWS, help=f"batch-means windows (default {WINDOWS})")
    args = p.parse_args(list(sys.argv[1:] if argv is None else argv))
    logdir = Path(args.logdir)
    error = None
    if not logdir.is_dir():
        error = f"LOGDIR {logdir} is not a folder" if logdir.exists() else f"LOGDIR {logdir} does not exist"
    elif args.windows < 2:
        error = f"--windows must be >= 2, got {args.windows}"
    else:
        error = _check_out(Path(args.out))
    if error is None:
        try:
            reports, files = write_report(logdir, args.out, args.threshold, args.windows)
        except FileNotFoundError as err:
            error = str(err)
        except ModuleNotFoundError as err:
            if not (err.name or "").startswith("tensorboard"):
                raise
            error = (
                f"{logdir} holds TensorBoard event files; reading them needs the package 'tensorboard' "
                "(pip install 'lightning-gradsim[experiments]'), or log with a CSVLogger too"
            )
    if error is not None:
        print(f"gradsim report: {error}.", file=sys.stderr)
        return 2
    for r in reports:
        print(f"{r.run} / {r.task}: mean cosine {_ci((r.mean, r.low, r.high))}; {r.reading}")
    print(f"wrote {files['markdown']} and {files['png']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
