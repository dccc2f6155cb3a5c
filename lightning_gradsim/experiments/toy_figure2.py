"""The paper's Figure 2 toys and its convergence-time measure (``gradsim toy figure2``).

Paper, section 3: steepest descent with a constant step size; "convergence time is defined as the
number of steps needed to get below [a] value of the main loss"; the figure's rows are main losses
with auxiliary losses or an arbitrary vector field ``V``, its columns follow ``g_main`` alone, the
sum ``g_main + g_aux`` and the cosine method. The figure captions fill the numbers: 600 iterations,
step size 0.01, level 0.1 of the main loss.

Rows (:data:`ROWS`), recovered from the captions; our copy garbles some formulas:

* ``L1+L2`` -- main ``L1 = t1^2 + t2^2``, auxiliary ``L2 = (t1 - 1)^2 + (t2 - 1)^2`` (caption, intact).
* ``L1+V`` -- main ``L1``, auxiliary field ``V``. The caption reads ``V = [- t2+t2 - 2t1,
  t1+t1 - 2t2]`` with superscripts lost; we read ``V = (-t2 + t2^2 - 2 t1, t1 + t1^2 - 2 t2)``.
  Reading 1 (``L1+V``): ``V`` is added like a gradient (the step is ``-lr (g_main + V)``). Then
  ``g_main + V = (-t2 + t2^2, t1 + t1^2)``: the sum drops the main gradient and turns around the
  origin (curl ``2 + 2 (t1 - t2)``, not a gradient field), and ``V`` opposes ``g_main`` near the
  origin, so a cosine gate is mostly closed and cannot speed anything up.
* ``L1-V`` -- reading 2 of the same caption: ``V`` is a *velocity* (an update direction, the
  step is ``+lr V``, as for the Q-learning updates section 3 names), so the auxiliary vector in
  the gradient's convention is ``-V = (t2 - t2^2 + 2 t1, -t1 - t1^2 + 2 t2)``: aligned with
  ``g_main = 2 t`` near the origin (the gate opens there), rotating and quadratic farther out.
  The text ("our method speeds up learning, even when combined with V"; "simply adding V ... leads
  to divergence") does not say which; both rows are shown side by side.
* ``L3+L4`` -- the negative example: main ``L3 = 1[t1 < 0] (t1^2 + t2^2) + 1[t1 >= 0] (1 -
  exp(-2 (t1^2 + t2^2)))`` (caption partly garbled: we read the exponent as ``-2 r^2``), flat far
  from 0 for ``t1 >= 0``; auxiliary ``L4 = (t1 - 2)^2 + (t2 - 0.5)^2`` (intact), which pulls into
  the flat region.

Ours (not given in the paper): the random starts (uniform in ``[-2, 2]^2``, 500 per cell, seed 0)
and the outcome classes: *converged* (main loss below the level from some step on, through step
600), *diverged*
(not converged and the main loss ended above where it started, or left every bound), *stalled*
(the rest). Convergence time statistics are over the converged runs.

Example:

>>> res = convergence_times("L1+L2", "main_only", torch.tensor([[3.0, 0.0]], dtype=torch.float64))
>>> int(res.steps[0])    # 9 * 0.98^(2t) < 0.1 first at t = 112
112
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from ..methods import make_gate

__all__ = [
    "Row",
    "ROWS",
    "PAPER",
    "ConvergenceResult",
    "convergence_times",
    "random_starts",
    "figure2_table",
    "figure2_markdown",
    "plot_figure2",
    "FIGURE2_RULES",
    "settle_step",
]

#: the paper's three columns (g_main alone, the sum, the cosine method) plus the weighted variant.
FIGURE2_RULES: tuple[str, ...] = ("main_only", "sum", "unweighted", "weighted")
#: the captions' numbers: iterations, constant step size, level of the main loss.
PAPER = {"steps": 600, "lr": 0.01, "level": 0.1}
_BOUND = 1e6  # a point farther than this from the origin is frozen and counted as diverged


def _l1(t: Tensor) -> Tensor:
    return (t**2).sum(-1)


def _l1_grad(t: Tensor) -> Tensor:
    return 2 * t


def _l2_grad(t: Tensor) -> Tensor:
    return 2 * (t - 1)


def _v_field(t: Tensor) -> Tensor:
    a, b = t[..., 0], t[..., 1]
    return torch.stack([-b + b**2 - 2 * a, a + a**2 - 2 * b], -1)


def _minus_v_field(t: Tensor) -> Tensor:
    return -_v_field(t)


def _l3(t: Tensor) -> Tensor:
    r2 = (t**2).sum(-1)
    return torch.where(t[..., 0] < 0, r2, 1 - torch.exp(-2 * r2))


def _l3_grad(t: Tensor) -> Tensor:
    r2 = (t**2).sum(-1, keepdim=True)
    return torch.where(t[..., :1] < 0, 2 * t, 4 * t * torch.exp(-2 * r2))


def _l4_grad(t: Tensor) -> Tensor:
    return 2 * (t - torch.tensor([2.0, 0.5], dtype=t.dtype))


@dataclass(frozen=True)
class Row:
    """One row of Figure 2: the main loss, its gradient, the auxiliary vector field, a label."""

    main_loss: Callable[[Tensor], Tensor]
    main_grad: Callable[[Tensor], Tensor]
    aux_field: Callable[[Tensor], Tensor]
    label: str


ROWS: dict[str, Row] = {
    "L1+L2": Row(_l1, _l1_grad, _l2_grad, "main t1^2+t2^2, aux (t1-1)^2+(t2-1)^2"),
    "L1+V": Row(_l1, _l1_grad, _v_field, "main t1^2+t2^2, aux field V added like a gradient (reading 1)"),
    "L1-V": Row(_l1, _l1_grad, _minus_v_field, "main t1^2+t2^2, V a velocity: aux vector -V (reading 2)"),
    "L3+L4": Row(_l3, _l3_grad, _l4_grad, "main flat for t1>=0 (negative example), aux (t1-2)^2+(t2-0.5)^2"),
}


@dataclass
class ConvergenceResult:
    """Per start: ``steps`` to get below the level (-1: never), ``diverged``, and the paths."""

    steps: Tensor  #: (N,) long
    diverged: Tensor  #: (N,) bool
    paths: Tensor  #: (T + 1, N, 2)

    @property
    def converged(self) -> Tensor:
        return self.steps >= 0


def random_starts(n: int, box: float = 2.0, seed: int = 0) -> Tensor:
    """``(n, 2)`` float64 starts uniform in ``[-box, box]^2``."""
    gen = torch.Generator().manual_seed(seed)
    return (torch.rand(n, 2, generator=gen, dtype=torch.float64) * 2 - 1) * box


def settle_step(loss: Tensor, level: float) -> Tensor:
    """Per column of ``loss`` ``(T + 1, N)``: the first step from which it stays below ``level`` (-1: never).

    >>> settle_step(torch.tensor([[1.0], [0.05], [0.2], [0.01], [0.02]]), 0.1).tolist()
    [3]
    """
    above = ~(loss < level)
    steps = torch.arange(loss.shape[0]).unsqueeze(-1).expand_as(above)
    last_above = torch.where(above, steps, torch.full_like(steps, -1)).amax(0)
    return torch.where(last_above + 1 < loss.shape[0], last_above + 1, torch.full_like(last_above, -1))


def convergence_times(
    row: str, rule: str, starts: Tensor, steps: int = 600, lr: float = 0.01, level: float = 0.1
) -> ConvergenceResult:
    """Steepest descent with the rule's update from every start (one gate state per start).

    Convergence time = the first step ``t`` from which the main loss stays below ``level`` through
    the last step (0 if it starts and stays there; for ``main_only`` and the gated rules the main
    loss only decreases here, so this is the paper's "steps needed to get below"). Points that leave
    the ``1e6`` ball are frozen there (counted as diverged).
    """
    if row not in ROWS:
        raise ValueError(f"Unknown Figure 2 row {row!r}; choose from {', '.join(ROWS)}.")
    spec = ROWS[row]
    gate = make_gate(rule).double()
    theta = starts.to(torch.float64).clone()
    paths = torch.empty(steps + 1, *theta.shape, dtype=torch.float64)
    paths[0] = theta
    blown = torch.zeros(theta.shape[0], dtype=torch.bool)
    for t in range(steps):
        update, _ = gate.combine(spec.main_grad(theta), {"aux": spec.aux_field(theta)}, batch_dims=1)
        assert isinstance(update, Tensor)  # combine() returns main's structure: a tensor here
        step = torch.where(blown.unsqueeze(-1) | ~torch.isfinite(update), torch.zeros_like(update), lr * update)
        theta = theta - step
        blown |= theta.norm(dim=-1) > _BOUND
        paths[t + 1] = theta
    loss = spec.main_loss(paths)  # (T + 1, N)
    first = settle_step(loss, level)
    end_loss = loss[-1]
    diverged = (first < 0) & (blown | ~torch.isfinite(end_loss) | (end_loss > loss[0]))
    return ConvergenceResult(first.long(), diverged, paths)


def figure2_table(
    rows: Sequence[str] = tuple(ROWS),
    rules: Sequence[str] = FIGURE2_RULES,
    n_starts: int = 500,
    steps: int = 600,
    lr: float = 0.01,
    level: float = 0.1,
    box: float = 2.0,
    seed: int = 0,
) -> tuple[list[dict], dict[tuple[str, str], ConvergenceResult]]:
    """Every row x rule from the same random starts: summary rows and the raw results."""
    starts = random_starts(n_starts, box, seed)
    raw = {(row, rule): convergence_times(row, rule, starts, steps, lr, level) for row in rows for rule in rules}
    table = []
    for row in rows:
        for rule in rules:
            res = raw[(row, rule)]
            ok = res.steps[res.converged].double()
            table.append(
                {
                    "row": row,
                    "rule": rule,
                    "n": n_starts,
                    "converged": float(res.converged.double().mean()),
                    "diverged": float(res.diverged.double().mean()),
                    "stalled": float((~res.converged & ~res.diverged).double().mean()),
                    "mean_steps": float(ok.mean()) if len(ok) else math.nan,
                    "median_steps": float(ok.median()) if len(ok) else math.nan,
                    **_paired_with_main(res, raw.get((row, "main_only"))),
                }
            )
    return table, raw


def _paired_with_main(res: ConvergenceResult, main: ConvergenceResult | None) -> dict[str, float]:
    """Among starts converged under both: fraction slower / faster than ``main_only``."""
    if main is None or main is res:
        return {"slower": math.nan, "faster": math.nan}
    both = res.converged & main.converged
    n = int(both.sum())
    if n == 0:
        return {"slower": math.nan, "faster": math.nan}
    return {
        "slower": float((res.steps[both] > main.steps[both]).sum()) / n,
        "faster": float((res.steps[both] < main.steps[both]).sum()) / n,
    }


def figure2_markdown(table: Sequence[dict], steps: int = 600, level: float = 0.1) -> str:
    """Rows x rules: converged / diverged / stalled fractions and mean / median convergence time."""
    lines = [
        f"Convergence time = first step from which the main loss stays below {level:g} "
        f"(steepest descent, {steps} steps); mean and median over the converged starts.",
        "",
        "Slower / faster: among the starts converged under both, the fraction where the rule needs more /"
        " fewer steps than `main_only`.",
        "",
        "| row | rule | converged | diverged | stalled | mean steps | median steps | slower | faster |",
        "|---|---|---|---|---|---|---|---|---|",
    ]

    def pct(v: float) -> str:
        return "-" if math.isnan(v) else f"{v:.1%}"

    for r in table:
        mean = "-" if math.isnan(r["mean_steps"]) else f"{r['mean_steps']:.1f}"
        med = "-" if math.isnan(r["median_steps"]) else f"{r['median_steps']:.0f}"
        lines.append(
            f"| {r['row']} | {r['rule']} | {r['converged']:.1%} | {r['diverged']:.1%} | {r['stalled']:.1%} | "
            f"{mean} | {med} | {pct(r['slower'])} | {pct(r['faster'])} |"
        )
    return "\n".join(lines) + "\n"


def plot_figure2(
    raw: dict[tuple[str, str], ConvergenceResult],
    path: str | os.PathLike,
    level: float = 0.1,
    shown: int = 25,
    box: float = 2.0,
) -> str:
    """Rows x rules grid: background = cosine of the auxiliary vector with the main gradient
    (green aligned, red opposed), grey = main loss below the level, ``shown`` trajectories."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = list(dict.fromkeys(k[0] for k in raw))
    rules = list(dict.fromkeys(k[1] for k in raw))
    fig, axes = plt.subplots(len(rows), len(rules), figsize=(3.3 * len(rules), 3.3 * len(rows)), squeeze=False)
    lim = 1.6 * box
    grid = torch.linspace(-lim, lim, 161, dtype=torch.float64)
    xx, yy = torch.meshgrid(grid, grid, indexing="xy")
    pts = torch.stack([xx, yy], -1)
    for i, row in enumerate(rows):
        spec = ROWS[row]
        gm, ga = spec.main_grad(pts), spec.aux_field(pts)
        cos = (gm * ga).sum(-1) / (gm.norm(dim=-1) * ga.norm(dim=-1)).clamp(min=1e-12)
        below = spec.main_loss(pts) < level
        for j, rule in enumerate(rules):
            ax, res = axes[i][j], raw[(row, rule)]
            ax.imshow(
                cos.numpy(), extent=(-lim, lim, -lim, lim), origin="lower", cmap="RdYlGn", vmin=-1, vmax=1, alpha=0.35
            )
            ax.contourf(xx.numpy(), yy.numpy(), below.double().numpy(), levels=[0.5, 1.5], colors="0.5", alpha=0.5)
            for s in range(min(shown, res.paths.shape[1])):
                p = res.paths[:, s].clamp(-lim, lim)
                ax.plot(p[:, 0], p[:, 1], lw=0.7)
                ax.plot(p[-1, 0], p[-1, 1], "k*", ms=4)
            ok = res.steps[res.converged].double()
            med = f"{ok.median():.0f}" if len(ok) else "-"
            conv, div = res.converged.double().mean(), res.diverged.double().mean()
            ax.set_title(f"{row} | {rule}\nconv {conv:.0%}, div {div:.0%}, median {med} steps", fontsize="x-small")
            ax.set_xlim(-lim, lim)
            ax.set_ylim(-lim, lim)
            ax.set_aspect("equal")
            ax.tick_params(labelsize="xx-small")
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return str(path)
