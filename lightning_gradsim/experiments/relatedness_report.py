"""Tables and figures of the task-relatedness sweep (:mod:`lightning_gradsim.experiments.relatedness`).

>>> from lightning_gradsim.experiments.relatedness_report import summarize
>>> from lightning_gradsim.experiments.relatedness_setup import RunResult
>>> rows = [RunResult("same", "sum", 1.0, s, 3, 0.5, loss) for s, loss in ((0, 1.0), (1, 3.0))]
>>> [(r["mean"], r["se"]) for r in summarize(rows)]
[(2.0, 1.0)]
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import asdict

from .csv_rows import write_csv
from .relatedness_setup import METHODS, RELATEDNESS, RunResult

__all__ = ["summarize", "markdown_table", "plot_sweep", "write_outputs"]


def summarize(results: Sequence[RunResult]) -> list[dict]:
    """Mean and standard error (over seeds) of the main task's test loss per setting."""
    groups: dict[tuple[str, str, float], list[float]] = {}
    for r in results:
        groups.setdefault((r.relatedness, r.method, r.lam), []).append(r.test_loss)
    rows = []
    for (rel, method, lam), values in groups.items():
        n = len(values)
        mean = sum(values) / n
        se = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1) / n) if n > 1 else float("nan")
        rows.append({"relatedness": rel, "method": method, "lam": lam, "n": n, "mean": mean, "se": se})
    return rows


def markdown_table(summary: Sequence[dict]) -> str:
    """Rows: method and lambda; columns: relatedness; cells: ``mean ± s.e.`` of the test loss."""
    rels = [r for r in RELATEDNESS if any(s["relatedness"] == r for s in summary)]
    keys = list(dict.fromkeys((s["method"], s["lam"]) for s in summary))
    cell = {(s["relatedness"], s["method"], s["lam"]): s for s in summary}
    n_seeds = max(s["n"] for s in summary)
    lines = [
        f"Main-task test MSE, mean ± standard error over {n_seeds} seed(s) (lower is better).",
        "",
        "| method | lambda | " + " | ".join(rels) + " |",
        "|---|---|" + "---|" * len(rels),
    ]
    for method, lam in keys:
        cells = []
        for rel in rels:
            s = cell.get((rel, method, lam))
            cells.append("" if s is None else f"{s['mean']:.4f} ± {s['se']:.4f}")
        lam_text = "-" if METHODS[method].single_task else f"{lam:g}"
        lines.append(f"| {METHODS[method].label} | {lam_text} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_sweep(summary: Sequence[dict], path: str) -> str:
    """The blog's figure: test loss against lambda, one line per method, one panel per relatedness."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    rels = [r for r in RELATEDNESS if any(s["relatedness"] == r for s in summary)]
    fig, axes = plt.subplots(1, len(rels), figsize=(5 * len(rels), 4), squeeze=False)
    methods = list(dict.fromkeys(s["method"] for s in summary))
    for ax, rel in zip(axes[0], rels):
        rows = [s for s in summary if s["relatedness"] == rel]
        lams = sorted({s["lam"] for s in rows if s["lam"] > 0}) or [1.0]
        for method in methods:
            mrows = sorted((s for s in rows if s["method"] == method), key=lambda s: s["lam"])
            if not mrows:
                continue
            se = [0.0 if math.isnan(s["se"]) else s["se"] for s in mrows]
            if METHODS[method].single_task:
                m, e = mrows[0]["mean"], se[0]
                ax.axhline(m, color="k", linestyle="--", label=METHODS[method].label)
                ax.axhspan(m - e, m + e, color="k", alpha=0.1)
                continue
            ax.errorbar(
                [s["lam"] for s in mrows],
                [s["mean"] for s in mrows],
                yerr=se,
                marker="o",
                capsize=3,
                label=METHODS[method].label,
            )
        ax.set_xscale("log")
        ax.set_xticks(lams, [f"{v:g}" for v in lams])
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xlabel("lambda (auxiliary weight)")
        ax.set_title(f"auxiliary task: {rel}")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("main task test MSE")
    axes[0][-1].legend(fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_outputs(results: Sequence[RunResult], out: str) -> dict[str, str]:
    """Write ``runs.csv``, ``summary.csv``, ``table.md`` and ``relatedness.png`` under ``out``."""
    os.makedirs(out, exist_ok=True)
    paths = {name: os.path.join(out, name) for name in ("runs.csv", "summary.csv", "table.md", "relatedness.png")}
    write_csv(paths["runs.csv"], (asdict(r) for r in results))
    summary = summarize(results)
    write_csv(paths["summary.csv"], summary)
    with open(paths["table.md"], "w") as f:
        f.write(markdown_table(summary))
    plot_sweep(summary, paths["relatedness.png"])
    return paths
