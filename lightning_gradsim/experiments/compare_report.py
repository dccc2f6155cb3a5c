"""The files of ``gradsim compare``: tables, CSVs, JSON and the two figures of a :class:`CompareResult`."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .csv_rows import write_csv

if TYPE_CHECKING:
    from .compare import CompareResult

__all__ = ["write_outputs"]


def write_outputs(result: CompareResult, out: Path, setup: str) -> dict[str, str]:
    """Write ``runs.csv``, ``summary.csv``, ``table.md``, ``result.json``, ``accuracy.png`` and
    ``cosine.png`` under ``out``; return their paths by kind."""
    out.mkdir(parents=True, exist_ok=True)
    files = {
        "runs": out / "runs.csv",
        "summary": out / "summary.csv",
        "table": out / "table.md",
        "json": out / "result.json",
    }
    write_csv(files["runs"], result.rows)
    write_csv(files["summary"], result.summary)
    table = f"Setup `{setup}`\n\n" + result.markdown() + "\n"
    if result.has_auroc:
        table += "\n" + result.markdown("auroc") + "\n"
    files["table"].write_text(table)
    files["json"].write_text(
        json.dumps({"rows": result.rows, "summary": result.summary, "runs": result.runs}, indent=1)
    )
    files["accuracy"], files["cosine"] = out / "accuracy.png", out / "cosine.png"
    _plot(result, files["accuracy"], files["cosine"])
    return {k: str(v) for k, v in files.items()}


def _mean_curve(curves: list[tuple[list[float], list[float]]]) -> tuple[list[float], list[float]]:
    curves = [c for c in curves if c[0]]
    if not curves:
        return [], []
    n = min(len(c[0]) for c in curves)
    steps = curves[0][0][:n]
    return steps, [sum(c[1][i] for c in curves) / len(curves) for i in range(n)]


def _smooth(values: list[float], window: int) -> list[float]:
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v
        if i >= window:
            acc -= values[i - window]
        out.append(acc / min(i + 1, window))
    return out


def _panels(plt: Any, n: int) -> tuple[Any, Any]:
    """A figure of ``n`` panels, at most 5 per row, sharing the y axis."""
    cols = min(n, 5)
    rows = math.ceil(n / cols)
    return plt.subplots(rows, cols, figsize=(3.6 * cols, 3.0 * rows), squeeze=False, sharey=True)


def _plot(result: CompareResult, acc_path: Path, cos_path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    nv = len(result.variants)
    fig, axes = _panels(plt, nv)
    for ax, variant in zip(axes.flat, result.variants):
        for m in result.methods:
            steps, acc = _mean_curve(
                [
                    (r["val_steps"], r["val_acc"])
                    for r in result.runs
                    if r["row"]["variant"] == variant and r["row"]["method"] == m
                ]
            )
            ax.plot(steps, acc, label=m, lw=1.3)
        ax.set_title(variant, fontsize="small")
        ax.set_xlabel("training step")
    for ax in axes[:, 0]:
        ax.set_ylabel("main-task val. accuracy")
    for ax in list(axes.flat)[nv:]:
        ax.axis("off")
    axes.flat[0].legend(fontsize="x-small")
    fig.tight_layout()
    fig.savefig(acc_path, dpi=110)
    plt.close(fig)

    nm = len(result.methods)
    fig, axes = _panels(plt, nm)
    for ax, m in zip(axes.flat, result.methods):
        for variant in result.variants:
            runs = [r for r in result.runs if r["row"]["variant"] == variant and r["row"]["method"] == m]
            tasks = sorted({t for r in runs for t in r["cos"]})
            for task in tasks:
                steps, cos = _mean_curve([(r["cos_steps"], r["cos"][task]) for r in runs if task in r["cos"]])
                label = variant if len(tasks) == 1 else f"{variant} {task}"
                ax.plot(steps, _smooth(cos, max(1, len(cos) // 40)), label=label, lw=1.1)
        ax.axhline(0.0, color="grey", lw=0.6, ls=":")
        ax.set_title(m, fontsize="small")
        ax.set_xlabel("training step")
        ax.set_ylim(-1.05, 1.05)
    for ax in axes[:, 0]:
        ax.set_ylabel("cos(main, aux gradient)")
    for ax in list(axes.flat)[nm:]:
        ax.axis("off")
    axes.flat[0].legend(fontsize="x-small")
    fig.tight_layout()
    fig.savefig(cos_path, dpi=110)
    plt.close(fig)
