"""The projection blog's unit-circle toy with the blog's own settings (``gradsim toy``, the default).

The blog: "find a point (x, y) that, above all, minimizes the square distance to the unit circle
and, only if it doesn't increase this distance, also minimizes the square distance to point (2, 0)":
``L_primary = (sqrt(x^2 + y^2) - 1)^2``, ``L_auxiliary = (x - 2)^2 + y^2``, start ``(0, 2)``,
``lambda = 0.1``; Adam (learning rate 0.01, beta1 = 0.9, beta2 = 0.999; its Figure 4) and vanilla
gradient descent (learning rate 0.01; its Figure 5); multitask (``sum``), ``projection``,
``unweighted`` and ``weighted``. The solution is ``(1, 0)``.

Settings the blog leaves blank are ours (:class:`BlogCircle`): the number of steps (6000), Adam's
epsilon (PyTorch's 1e-8), what "reaching (1, 0)" means (staying within 0.05 of it from some step
on: the *settling step*), and the extra random starts for the blog's "also the case for other
starting points" (50, uniform in the square [-2, 2]^2, seed 0).

Every rule runs through :meth:`GradientGate.combine` with ``batch_dims=1`` (the blog's start and
the random starts together, one gate state each); the combined vector is handed to the optimizer
as the gradient.

Example:

>>> paths = run_blog_circle("gd", rules=("sum",), settings=BlogCircle(steps=3, random_starts=0))
>>> [round(v, 4) for v in paths["sum"][1, 0].tolist()]   # (0, 2) - 0.01 * ((0, 2) + 0.1 * (-4, 4))
[0.004, 1.976]
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from ..methods import make_gate

__all__ = [
    "BlogCircle",
    "BLOG_RULES",
    "OPTIMIZERS",
    "primary_loss",
    "primary_grad",
    "auxiliary_grad",
    "run_blog_circle",
    "settling_step",
    "blog_circle_report",
    "plot_blog_circle",
]

#: the blog's four training modes (multitask is ``sum``).
BLOG_RULES: tuple[str, ...] = ("sum", "projection", "unweighted", "weighted")
#: the blog's two optimizers: Adam (its Figure 4) and vanilla gradient descent (its Figure 5).
OPTIMIZERS: tuple[str, ...] = ("adam", "gd")
TARGET = (1.0, 0.0)
#: where the unit circle meets the circle of radius 1 around (1, 0) (the two gradients orthogonal).
CROSSING = (0.5, math.sqrt(3) / 2)


@dataclass(frozen=True)
class BlogCircle:
    """The toy's settings: the blog's (first block) and ours where it is silent (second block)."""

    start: tuple[float, float] = (0.0, 2.0)  #: blog
    aux_weight: float = 0.1  #: blog's lambda
    lr: float = 0.01  #: blog, both optimizers
    betas: tuple[float, float] = (0.9, 0.999)  #: blog (Adam)
    aux_point: tuple[float, float] = (2.0, 0.0)  #: blog
    steps: int = 6000  #: ours (not given)
    eps: float = 1e-8  #: ours (Adam's epsilon, not given; PyTorch's default)
    tol: float = 0.05  #: ours: "reached (1, 0)" = within tol of it from the settling step on
    random_starts: int = 50  #: ours: extra starts for "other starting points"
    box: float = 2.0  #: ours: random starts uniform in [-box, box]^2
    seed: int = 0  #: ours


def primary_loss(t: Tensor) -> Tensor:
    """``(sqrt(x^2 + y^2) - 1)^2`` over the last dimension."""
    return (t.norm(dim=-1) - 1) ** 2


def primary_grad(t: Tensor) -> Tensor:
    """``2 (r - 1) theta / r`` (zero at the origin, where the loss has a cusp)."""
    r = t.norm(dim=-1, keepdim=True)
    return torch.where(r > 0, 2 * (r - 1) * t / r.clamp(min=1e-300), torch.zeros_like(t))


def auxiliary_grad(t: Tensor, point: Sequence[float] = (2.0, 0.0)) -> Tensor:
    """Gradient of ``(x - 2)^2 + y^2``: ``2 (theta - (2, 0))``."""
    return 2 * (t - torch.tensor(point, dtype=t.dtype))


def _starts(settings: BlogCircle) -> Tensor:
    gen = torch.Generator().manual_seed(settings.seed)
    extra = (torch.rand(settings.random_starts, 2, generator=gen, dtype=torch.float64) * 2 - 1) * settings.box
    return torch.cat([torch.tensor([settings.start], dtype=torch.float64), extra])


def run_blog_circle(
    optimizer: str, rules: Sequence[str] = BLOG_RULES, settings: BlogCircle = BlogCircle()
) -> dict[str, Tensor]:
    """Paths ``(steps + 1, 1 + random_starts, 2)`` per rule; start 0 is the blog's ``(0, 2)``."""
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"Unknown optimizer {optimizer!r}; the blog uses {', '.join(OPTIMIZERS)}.")
    starts = _starts(settings)
    out = {}
    for rule in rules:
        gate = make_gate(rule, aux_weight=settings.aux_weight).double()
        theta = starts.clone().requires_grad_(True)
        if optimizer == "adam":
            opt: torch.optim.Optimizer = torch.optim.Adam(
                [theta], lr=settings.lr, betas=settings.betas, eps=settings.eps
            )
        else:
            opt = torch.optim.SGD([theta], lr=settings.lr)
        path = torch.empty(settings.steps + 1, *starts.shape, dtype=torch.float64)
        path[0] = starts
        for step in range(settings.steps):
            t = theta.detach()
            grad, _ = gate.combine(primary_grad(t), {"aux": auxiliary_grad(t, settings.aux_point)}, batch_dims=1)
            assert isinstance(grad, Tensor)  # combine() returns main's structure: a tensor here
            theta.grad = grad
            opt.step()
            path[step + 1] = theta.detach()
        out[rule] = path
    return out


def settling_step(path: Tensor, point: Sequence[float] = TARGET, tol: float = 0.05) -> Tensor:
    """Per start: the first step from which the path stays within ``tol`` of ``point`` (-1: never)."""
    far = (path - torch.tensor(point, dtype=path.dtype)).norm(dim=-1) >= tol  # (T, N)
    steps = torch.arange(path.shape[0]).unsqueeze(-1).expand_as(far)
    last_far = torch.where(far, steps, torch.full_like(steps, -1)).amax(0)
    return torch.where(last_far + 1 < path.shape[0], last_far + 1, torch.full_like(last_far, -1))


def _dist(p: Tensor, point: Sequence[float]) -> Tensor:
    return (p - torch.tensor(point, dtype=p.dtype)).norm(dim=-1)


def blog_circle_report(paths: Mapping[str, Mapping[str, Tensor]], settings: BlogCircle = BlogCircle()) -> str:
    """Markdown: per optimizer and rule, the blog start's end point and settling step, the random
    starts' summary, and the blog's statements checked one by one."""
    lines = [
        "| optimizer | rule | end from (0, 2) | distance to (1, 0) | settling step (0, 2) | "
        "random starts settled | median settling step | ended on the circle far from (1, 0) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    info: dict[tuple[str, str], dict[str, float]] = {}
    for opt, by_rule in paths.items():
        for rule, p in by_rule.items():
            settle = settling_step(p, TARGET, settings.tol)
            end = p[-1]
            far_on_circle = ((end.norm(dim=-1) - 1).abs() < 0.01) & (_dist(end, TARGET) > 0.25)
            rnd = settle[1:]
            ok = rnd[rnd >= 0]
            med = float(ok.float().median()) if len(ok) else float("nan")
            near_cross = (_dist(p[:, 0], CROSSING) < settings.tol).sum().item()
            info[(opt, rule)] = {
                "settle": float(settle[0]),
                "dist": float(_dist(end[0], TARGET)),
                "r": float(end[0].norm()),
                "median": med,
                "near_crossing": near_cross,
                "far_on_circle": bool(far_on_circle[0]),
            }
            n = len(rnd)
            lines.append(
                f"| {opt} | {rule} | ({end[0, 0]:.4f}, {end[0, 1]:.4f}) | {float(_dist(end[0], TARGET)):.4f} | "
                f"{'never' if settle[0] < 0 else int(settle[0])} | {len(ok)}/{n} | "
                f"{'-' if math.isnan(med) else int(med)} | {int(far_on_circle[1:].sum())}/{n} |"
            )
    lines += [
        "",
        f"Settling step: first step from which the point stays within {settings.tol} of (1, 0) "
        f"({settings.steps} steps; 'never' = not by the end).",
    ]
    lines += ["", "The blog's statements:", ""] + _claims(info, settings)
    return "\n".join(lines) + "\n"


def _claims(info: dict[tuple[str, str], dict[str, float]], s: BlogCircle) -> list[str]:
    out = []

    def say(text: str, held: bool | None, numbers: str) -> None:
        out.append(f"- {text}: **{'not run' if held is None else 'held' if held else 'NOT held'}** ({numbers})")

    def get(opt: str, rule: str) -> dict[str, float] | None:
        return info.get((opt, rule))

    a = get("adam", "sum")
    if a:
        say("Adam, multitask ends close to but not at (1, 0)", s.tol < a["dist"] < 0.25, f"distance {a['dist']:.4f}")
    gated = [r for r in ("projection", "unweighted", "weighted") if get("adam", r)]
    if gated:
        settles = {r: get("adam", r)["settle"] for r in gated}  # type: ignore[index]
        say(
            "Adam, the gated rules reach (1, 0)",
            all(v >= 0 for v in settles.values()),
            ", ".join(f"{r} settles at step {int(v)}" if v >= 0 else f"{r} never" for r, v in settles.items()),
        )
        if "projection" in settles and len(settles) > 1:
            p = settles["projection"]
            others = [v for r, v in settles.items() if r != "projection"]
            say(
                "Adam, projection converges notably quicker (from (0, 2))",
                p >= 0 and all(v < 0 or v > p for v in others),
                ", ".join(f"{r} {int(v)}" for r, v in settles.items()),
            )
            meds = {r: get("adam", r)["median"] for r in gated}  # type: ignore[index]
            say(
                "Adam, ... also for other starting points (median over random starts)",
                all(math.isnan(v) or v > meds["projection"] for r, v in meds.items() if r != "projection"),
                ", ".join(f"{r} {v:.0f}" for r, v in meds.items()),
            )
    w = get("adam", "weighted")
    if w:
        say(
            "Adam, weighted stagnates near where the unit circle meets the circle around (1, 0)",
            w["near_crossing"] >= 100,
            f"{int(w['near_crossing'])} steps within {s.tol} of (0.5, 0.866)",
        )
    for rule in ("unweighted", "weighted"):
        g = get("gd", rule)
        if g:
            say(
                f"gradient descent, {rule} stops on the unit circle far from (1, 0)",
                bool(g["far_on_circle"]),
                f"radius {g['r']:.4f}, distance to (1, 0) {g['dist']:.4f}",
            )
    return out


def plot_blog_circle(paths: Mapping[str, Mapping[str, Tensor]], path: str | os.PathLike) -> str:
    """One panel per optimizer (the blog's Figures 4 and 5): the blog start's trajectory per rule,
    plus the distance to (1, 0) against the step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    opts = list(paths)
    fig, axes = plt.subplots(2, len(opts), figsize=(5.2 * len(opts), 9), squeeze=False)
    angle = torch.linspace(0, 2 * math.pi, 300)
    for col, opt in enumerate(opts):
        ax, ax2 = axes[0][col], axes[1][col]
        ax.plot(angle.cos(), angle.sin(), color="0.3", lw=0.8, label="unit circle (primary minima)")
        ax.fill(1 + angle.cos(), angle.sin(), color="tab:red", alpha=0.08, label="disk where the gradients conflict")
        for rule, p in paths[opt].items():
            ax.plot(p[:, 0, 0], p[:, 0, 1], lw=1.4, label=rule)
            ax2.semilogy(_dist(p[:, 0], TARGET).clamp(min=1e-8), label=rule)
        ax.plot(0, 2, "ko", ms=4)
        ax.plot(*TARGET, "k*", ms=10)
        ax.set_xlim(-0.6, 2.2)
        ax.set_ylim(-0.6, 2.2)
        ax.set_aspect("equal")
        ax.set_title(
            f"{'Adam (lr 0.01)' if opt == 'adam' else 'gradient descent (lr 0.01)'}: start (0, 2), lambda 0.1",
            fontsize="small",
        )
        ax.legend(fontsize="x-small", loc="upper right")
        ax2.set_xlabel("step")
        ax2.set_ylabel("distance to (1, 0)")
        ax2.grid(alpha=0.3)
        ax2.legend(fontsize="x-small")
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)
