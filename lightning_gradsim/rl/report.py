"""Files and figures of ``gradsim gridworld``: curves, gate statistics, the claims table, Figure 4.

Example::

    paths = write_outputs(run_experiment(ExperimentConfig(envs=20, steps=1_000)), "runs/gridworld")
"""

from __future__ import annotations

import csv
import os
from pathlib import Path

import torch

from .claims import assess_claims, claims_markdown
from .experiment import ExperimentResult, mean_stderr
from .teacher import teacher_policy
from .training import GATED_RULES
from .world import GridSpec, Layouts

__all__ = ["write_outputs", "greedy_path"]

FILES = ("curves.csv", "gate.csv", "summary.csv", "claims.md", "curves.png", "gate.png", "layout.png")
_TITLES = {"cross": "cross-task (teacher's rewards removed)", "same": "same task (teacher of the same task)"}


def greedy_path(layouts: Layouts, index: int, policy: torch.Tensor, max_len: int = 60) -> list[int]:
    """Cells visited by the noise-free greedy rollout of ``policy`` ``(S, 4)`` in gridworld ``index``."""
    nxt = layouts.next_cell()[index]
    codes = layouts.flat_cells()[index]
    terminal = GridSpec.terminal_table()
    pos = int(layouts.start[index])
    path = [pos]
    for _ in range(max_len):
        if bool(terminal[codes[pos]]):
            break
        pos = int(nxt[pos, int(policy[pos].argmax())])
        seen = pos in path
        path.append(pos)
        if seen:  # a deterministic loop (or bumping into a wall)
            break
    return path


def write_outputs(result: ExperimentResult, out: str | os.PathLike) -> dict[str, Path]:
    """Write ``curves.csv``, ``gate.csv``, ``summary.csv``, ``claims.md`` and the figures
    ``curves.png`` (Figure 4: a row per transfer, a column per temperature), ``gate.png`` (open
    fraction and cosine over training) and ``layout.png`` under ``out``; returns their paths."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {name: out / name for name in FILES}
    cfg = result.config
    with open(paths["curves.csv"], "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["transfer", "method", "temperature", "step", "mean_return", "stderr"])
        for tr, m, t, s, v, se in result.curves:
            w.writerow([tr, m, t, s, f"{v:.6f}", f"{se:.6f}"])
        for (tr, t), ret in result.teacher_return.items():
            w.writerow([tr, "teacher", t, cfg.steps, *(f"{x:.6f}" for x in mean_stderr(ret))])
        for tr, ret in result.random_return.items():
            for t in cfg.temperatures:
                w.writerow([tr, "random", t, cfg.steps, *(f"{x:.6f}" for x in mean_stderr(ret))])
    with open(paths["gate.csv"], "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(
            [
                "transfer",
                "method",
                "temperature",
                "step",
                "open_fraction",
                "mean_cosine",
                "expected_cosine",
                "expected_positive",
            ]
        )
        for tr, m, t, s, *values in result.gate:
            w.writerow([tr, m, t, s, *(f"{x:.6f}" for x in values)])
    reach = result.steps_to_reach("reward")
    with open(paths["summary.csv"], "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["transfer", "method", "temperature", "final_mean_return", "stderr", "steps_to_reach_reward_final"])
        for key, ret in result.returns.items():
            first = reach.get(key)
            w.writerow([*key, *(f"{x:.6f}" for x in mean_stderr(ret[-1])), "" if first is None else first])
    paths["claims.md"].write_text(claims_markdown(assess_claims(result)) + "\n")
    _plot_curves(result, paths["curves.png"])
    _plot_gate(result, paths["gate.png"])
    _plot_layout(result, paths["layout.png"])
    return paths


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def _plot_curves(result: ExperimentResult, path: Path) -> None:
    plt = _pyplot()
    cfg = result.config
    temps, transfers = cfg.temperatures, cfg.transfers
    fig, axes = plt.subplots(
        len(transfers), len(temps), figsize=(4.2 * len(temps), 3.4 * len(transfers)), sharex=True, squeeze=False
    )
    steps = torch.tensor(result.steps, dtype=torch.float64)
    for row, tr in zip(axes, transfers):
        for ax, t in zip(row, temps):
            for m in cfg.methods:
                ret = result.returns[(tr, m, t)]
                v = ret.mean(1)
                se = ret.std(1) / ret.shape[1] ** 0.5 if ret.shape[1] > 1 else torch.zeros_like(v)
                (line,) = ax.plot(steps, v, label=m)
                ax.fill_between(steps, v - se, v + se, color=line.get_color(), alpha=0.2)
            ax.axhline(float(result.teacher_return[(tr, t)].mean()), color="k", linestyle=":", label="teacher")
            ax.axhline(float(result.random_return[tr].mean()), color="grey", linestyle=":", label="random")
            ax.set_title(f"{_TITLES[tr]}\nteacher temperature {t:g}", fontsize=9)
        row[0].set_ylabel(f"expected return ({cfg.envs} gridworlds)")
    for ax in axes[-1]:
        ax.set_xlabel("training steps (states visited)")
    axes[0][-1].legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_gate(result: ExperimentResult, path: Path) -> None:
    plt = _pyplot()
    cfg = result.config
    temps, transfers = cfg.temperatures, cfg.transfers
    gated = [m for m in cfg.methods if m in GATED_RULES]
    fig, axes = plt.subplots(
        2 * len(transfers), len(temps), figsize=(4.2 * len(temps), 2.6 * 2 * len(transfers)), sharex=True, squeeze=False
    )
    for i, tr in enumerate(transfers):
        for j, t in enumerate(temps):
            ax_open, ax_cos = axes[2 * i][j], axes[2 * i + 1][j]
            for m in gated:
                rows = sorted(r[3:7] for r in result.gate if r[:3] == (tr, m, t))
                if rows:
                    s, op, c, ex = zip(*rows)
                    (line,) = ax_open.plot(s, op, label=m)
                    ax_cos.plot(s, c, color=line.get_color(), label=f"{m}: one episode (the gate's)")
                    ax_cos.plot(s, ex, color=line.get_color(), linestyle="--", label=f"{m}: expected updates")
            ax_open.set_title(f"{_TITLES[tr]}, T = {t:g}", fontsize=9)
            ax_open.set_ylim(-0.02, 1.02)
            ax_cos.axhline(0.0, color="grey", linewidth=0.8)
        axes[2 * i][0].set_ylabel("gate open fraction")
        axes[2 * i + 1][0].set_ylabel("cosine (pg, distill)")
    for ax in axes[-1]:
        ax.set_xlabel("training steps")
    if gated:
        axes[0][-1].legend(fontsize=7)
        axes[1][-1].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_layout(result: ExperimentResult, path: Path) -> None:
    plt = _pyplot()
    import numpy as np

    from .world import CODE_COLOURS

    colours = np.array(CODE_COLOURS, dtype=np.uint8)
    spec = result.config.spec
    tr = result.config.transfers[0]
    original = result.layouts.index(0)
    task = result.tasks[tr].index(0)
    method = next(
        (m for m in ("cos-unweighted", "cos-weighted") if (tr, m) in result.example_policies), result.config.methods[0]
    )
    panels = [
        ("original task", original, None),
        ("teacher's solution (Q-learning)", original, teacher_policy(result.q[0], 0.0)),
        (f"student's task ({tr})", task, None),
        (f"student's solution ({method})", task, result.example_policies[(tr, method)]),
    ]
    fig, axes = plt.subplots(1, 4, figsize=(13, 3.6))
    for ax, (title, lay, pol) in zip(axes, panels):
        ax.imshow(colours[lay.cells[0].numpy()])
        r0, c0 = divmod(int(lay.start[0]), spec.width)
        ax.plot(c0, r0, "o", color="gold", markersize=10, markeredgecolor="k")
        if pol is not None:
            rc = np.array([divmod(c, spec.width) for c in greedy_path(lay, 0, pol)])
            ax.plot(rc[:, 1], rc[:, 0], "-", color="gold", linewidth=2.5)
        ax.set_title(title, fontsize=10)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.text(
        0.5,
        0.01,
        "green: goal (the teacher's reward; removed in the cross task), blue: gem, red: pit, brown: mud",
        ha="center",
        fontsize=8,
    )
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
