"""Outputs of ``gradsim table1``: ``runs.csv``, ``table.md`` (the paper's layout), ``result.json``, PNGs.

``table.md`` has the paper's Table 1 layout -- rows are rotations, columns single-task
(``main_only``), multi-task (``sum``), our method (``unweighted``), then any other method --
with the main task's test error in % as mean ± sample std over seeds; then each method against
``sum`` and ``main_only`` paired by seed (two-sided paired t-test); then the gate's mean cosine
and open fraction.

Example:

>>> runs = (("main_only", 0.0, [0.10, 0.12]), ("sum", 1.0, [0.09, 0.10]), ("unweighted", 0.8, [0.08, 0.10]))
>>> rows = [{"angle": 0.0, "method": m, "seed": s, "test_error": e, "mean_cosine": 0.1, "open_fraction": o}
...         for m, o, errs in runs for s, e in enumerate(errs)]
>>> print(error_table(rows, ["main_only", "sum", "unweighted"], [0.0]))
| rotation | single-task (`main_only`) | multi-task (`sum`) | our method (`unweighted`) |
|---|---|---|---|
| 0 | 11.00 ± 1.41 | 9.50 ± 0.71 | 9.00 ± 1.41 |
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .csv_rows import write_csv
from .heldout import base_method
from .paired import paired_t_test

__all__ = ["error_table", "paired_table", "gate_table", "table_markdown", "write_outputs", "PAPER_COLUMNS"]

#: the paper's columns, in its order: method -> header.
PAPER_COLUMNS = {"main_only": "single-task", "sum": "multi-task", "unweighted": "our method"}
BASELINES = ("sum", "main_only")


def _ordered(methods: Sequence[str]) -> list[str]:
    return [m for m in PAPER_COLUMNS if m in methods] + [m for m in methods if m not in PAPER_COLUMNS]


def _header(m: str) -> str:
    return f"{PAPER_COLUMNS[m]} (`{m}`)" if m in PAPER_COLUMNS else f"`{m}`"


def _values(rows: list[dict[str, Any]], method: str, angle: float, key: str) -> list[float]:
    picked = sorted((r for r in rows if r["method"] == method and r["angle"] == angle), key=lambda r: r["seed"])
    return [float(r[key]) for r in picked]


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    n = len(values)
    mean = sum(values) / n
    return mean, (math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0)


def _angle(a: float) -> str:
    return f"{a:g}"


def error_table(rows: list[dict[str, Any]], methods: Sequence[str], angles: Sequence[float]) -> str:
    """Rows = rotations, columns = methods (the paper's first): test error in %, mean ± std over seeds."""
    cols = _ordered(methods)
    lines = ["| rotation | " + " | ".join(_header(m) for m in cols) + " |", "|" + "---|" * (len(cols) + 1)]
    for a in angles:
        cells = []
        for m in cols:
            vals = _values(rows, m, a, "test_error")
            if not vals:
                cells.append("")
                continue
            mean, std = _mean_std(vals)
            cells.append(f"{100 * mean:.2f} ± {100 * std:.2f}")
        lines.append(f"| {_angle(a)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def paired_table(rows: list[dict[str, Any]], methods: Sequence[str], angles: Sequence[float]) -> str | None:
    """Each method minus ``sum`` and minus ``main_only``, paired by seed: mean difference (points) and p; a
    held-out gate (``unweighted_heldout``) also minus its training-batch gate (``unweighted``) when both ran."""
    # main_only is the reference of all; sum is compared with main_only only.
    pairs = [
        (m, base) for m in _ordered(methods) if m != "main_only" for base in BASELINES if base in methods and m != base
    ]
    # a held-out gate also against the same gate on the training batch (when both ran)
    pairs += [(m, gate) for m in _ordered(methods) for gate, held in [base_method(m)] if held and gate in methods]
    if not pairs:
        return None
    lines = [
        "| rotation | " + " | ".join(f"`{m}` − `{base}`" for m, base in pairs) + " |",
        "|" + "---|" * (len(pairs) + 1),
    ]
    for a in angles:
        cells = []
        for m, base in pairs:
            x, y = _values(rows, m, a, "test_error"), _values(rows, base, a, "test_error")
            if len(x) != len(y) or not x:
                cells.append("")
                continue
            res = paired_t_test(x, y)
            p = "n/a" if math.isnan(res.p_value) else (f"{res.p_value:.3f}" if res.p_value >= 0.001 else "<0.001")
            diff = round(100 * res.mean_diff, 2) + 0.0  # no "-0.00"
            cells.append(f"{diff:+.2f} (p {p})")
        lines.append(f"| {_angle(a)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def gate_table(rows: list[dict[str, Any]], methods: Sequence[str], angles: Sequence[float]) -> str:
    """Mean cosine of the two tasks' trunk gradients and the gate's open fraction, mean over seeds."""
    cols = _ordered(methods)
    lines = ["| rotation | " + " | ".join(f"`{m}`" for m in cols) + " |", "|" + "---|" * (len(cols) + 1)]
    for a in angles:
        cells = []
        for m in cols:
            cos, op = _values(rows, m, a, "mean_cosine"), _values(rows, m, a, "open_fraction")
            cells.append(f"{sum(cos) / len(cos):.3f} / {sum(op) / len(op):.2f}" if cos else "")
        lines.append(f"| {_angle(a)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _duration(seconds: float) -> str:
    m, s = divmod(int(round(seconds)), 60)
    h, m = divmod(m, 60)
    return f"{h} h {m} min {s} s" if h else (f"{m} min {s} s" if m else f"{seconds:.1f} s")


def table_markdown(result: Any, command: str, total_seconds: float | None) -> str:
    """The whole ``table.md``: data, protocol, the three tables, timing."""
    cfg = result.config
    methods = [s.label for s in result.specs]
    angles = [float(a) for a in cfg.angles]
    n_seeds = cfg.seeds
    bad = [r for r in result.rows if not r.get("finite", True)]
    parts = ["# Table 1 (paper section 4.2): main-task test error with a rotated auxiliary task", ""]
    parts.append(f"Data: {result.data_description}.")
    if result.data_note:
        parts.append(f"**Not the paper's data: {result.data_note}.**")
    parts += [
        "",
        "Protocol: main task = the images, auxiliary task = the same images rotated counter-clockwise by the angle; "
        f"{cfg.depth}x{cfg.hidden} ReLU MLP trunk, one 10-way head per task; RMSprop (lr {cfg.lr:g}), "
        f"batch {cfg.batch_size}, {cfg.epochs} epochs ({result.steps} steps); seeds 0-{n_seeds - 1} "
        "(seed = initialisation and data order, shared by all methods and angles); "
        f"aux weight {cfg.aux_weight:g}, threshold {cfg.threshold:g}, cosine EMA {cfg.cosine_ema:g}, "
        f"per-layer cosine {'yes' if cfg.per_layer else 'no'}. Final model, no early stopping.",
        "",
        f"Command: `{command}`",
        "",
        f"## Test error (%), mean ± std over {n_seeds} seed(s)",
        "",
        error_table(result.rows, methods, angles),
    ]
    paired = paired_table(result.rows, methods, angles)
    if paired:
        parts += [
            "",
            "## Paired by seed: difference in test error (percentage points; negative = lower error), "
            f"two-sided paired t-test over {n_seeds} seeds",
            "",
            paired,
        ]
    parts += [
        "",
        "## Gate: mean cosine of the two tasks' trunk gradients / fraction of steps the auxiliary gradient was used",
        "",
        gate_table(result.rows, methods, angles),
    ]
    if bad:
        parts += ["", f"**{len(bad)} run(s) ended with non-finite parameters** (see `finite` in runs.csv)."]
    timing = (
        f"Training: {_duration(result.seconds)} for {len(result.rows)} stacked runs "
        f"on {result.device} ({result.threads} thread(s))"
    )
    m = result.machine
    if m:
        timing += f"; torch {m.get('torch')}, {m.get('gpu') or m.get('cpu')} ({m.get('cpu_capability')})"
    if total_seconds is not None:
        timing += f"; whole command, start-up included: {_duration(total_seconds)}"
    parts += ["", timing + "."]
    return "\n".join(parts) + "\n"


def _process_age() -> float | None:
    """Seconds since this process started (Linux ``/proc``), ``None`` elsewhere."""
    try:
        import os

        with open("/proc/self/stat") as f:
            start_ticks = float(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        return uptime - start_ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, AttributeError):
        return None


def write_outputs(result: Any, out_dir: str | Path, command: str, wall_start: float | None = None) -> dict[str, str]:
    """Write runs.csv, table.md, result.json, error_vs_angle.png and cosine.png; returns their paths.

    The returned dict also holds ``markdown_text`` (the table, for printing).
    """
    import time

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = {
        "runs": out / "runs.csv",
        "table": out / "table.md",
        "json": out / "result.json",
        "error_png": out / "error_vs_angle.png",
        "cosine_png": out / "cosine.png",
    }
    write_csv(files["runs"], result.rows)
    _plot(result, files["error_png"], files["cosine_png"])
    age = _process_age()
    total = age if age is not None else (time.perf_counter() - wall_start if wall_start is not None else None)
    text = table_markdown(result, command, total)
    files["table"].write_text(text)
    payload = result.to_json()
    payload["total_seconds"] = total
    payload["command"] = command
    files["json"].write_text(json.dumps(payload, indent=1))
    paths: dict[str, str] = {k: str(v) for k, v in files.items()}
    paths["markdown_text"] = text
    return paths


def _plot(result: Any, error_path: Path, cosine_path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = _ordered([s.label for s in result.specs])
    angles = [float(a) for a in result.config.angles]
    fig, ax = plt.subplots(figsize=(5.2, 3.6))
    span = (max(angles) - min(angles)) or 1.0
    for i, m in enumerate(methods):
        stats = [_mean_std(_values(result.rows, m, a, "test_error")) for a in angles]
        shift = 0.012 * span * (i - (len(methods) - 1) / 2)  # side by side, so the error bars stay readable
        ax.errorbar(
            [a + shift for a in angles],
            [100 * s[0] for s in stats],
            yerr=[100 * s[1] for s in stats],
            label=m,
            marker="o",
            ms=4,
            capsize=2,
            lw=1.1,
        )
    ax.set_xlabel("rotation of the auxiliary task's images (degrees)")
    ax.set_ylabel("main-task test error (%)")
    ax.set_xticks(angles)
    ax.legend(fontsize="x-small")
    ax.set_title(f"mean ± std over {result.config.seeds} seed(s)", fontsize="small")
    fig.tight_layout()
    fig.savefig(error_path, dpi=110)
    plt.close(fig)

    cols = min(len(angles), 5)
    rows_ = math.ceil(len(angles) / cols)
    fig, axes = plt.subplots(rows_, cols, figsize=(3.4 * cols, 2.9 * rows_), squeeze=False, sharey=True)
    for ax, a in zip(axes.flat, angles):
        for m in methods:
            curves = result.cosine_curves.get((m, a), [])
            if not curves:
                continue
            epochs = range(1, len(curves[0]) + 1)
            ax.plot(epochs, [sum(c[i] for c in curves) / len(curves) for i in range(len(curves[0]))], label=m, lw=1.2)
        ax.axhline(0.0, color="grey", lw=0.6, ls=":")
        if result.config.threshold:
            ax.axhline(result.config.threshold, color="grey", lw=0.6, ls="--")
        ax.set_title(f"rotation {_angle(a)}°", fontsize="small")
        ax.set_xlabel("epoch")
    for ax in axes[:, 0]:
        ax.set_ylabel("cos(main, aux) on the trunk")
    for ax in list(axes.flat)[len(angles) :]:
        ax.axis("off")
    axes.flat[0].legend(fontsize="x-small")
    fig.suptitle(
        "cosine of the two tasks' gradients along each method's own training (mean over seeds, per epoch)",
        fontsize="small",
    )
    fig.tight_layout()
    fig.savefig(cosine_path, dpi=110)
    plt.close(fig)
