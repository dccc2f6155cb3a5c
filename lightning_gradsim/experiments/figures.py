"""The paper's remaining illustrations, drawn with the library's own gate (``gradsim figures``).

* :func:`negative_example` -- Appendix B's point that the gate can *slow* convergence: the main
  loss ``log(1 + x^2) + y^2`` is flat in ``x`` far from 0, and the auxiliary loss
  ``((x - 8)^2 + y^2) / 2`` pulls toward that flat region. From ``(-1, 10)`` (step 0.05), while
  ``y`` is still large the two gradients agree (cosine > 0), so the ``unweighted`` gate lets the
  auxiliary drag ``x`` out to about 3.3; then only the weak main gradient brings it back: 104 steps
  to reach a main loss below 0.01 against 44 for main-only descent (``projection``: 155).
* :func:`proposition3` -- the counterexample of Proposition 3: the gated field ``V = g_main +
  1[cos >= 0] g_aux`` (main ``|theta|^2 / 2``, auxiliary ``|theta - (2, 0)|^2 / 2``) is not the
  gradient of any function. From ``P = (-0.5, 0)`` to ``Q = (2.5, 0)`` the main field's line
  integral is 3 along both paths; the gated field's is 2 along the straight path A (the gate is
  closed inside the circle of diameter [0, (2, 0)]) and 0 along path B around that circle.
* :func:`cosine_vs_dimension` -- the cosine of two independent Gaussian vectors falls toward 0
  as ``sqrt(2 / (pi d))``; the cosine of two noisy copies of one true vector (i.i.d. N(0, 1)
  entries, noise of fixed norm ``s``) grows toward 1 as ``d / (d + s^2)``.

Every figure computes the gated vectors with :meth:`GradientGate.combine`, batched over points.

Example::

    from lightning_gradsim.experiments import figures
    figures.proposition3("runs/figures/proposition3.png")

    gradsim figures --out runs/figures          # all three PNGs
"""

from __future__ import annotations

import argparse
import math
import os
from collections.abc import Sequence

import torch
from torch import Tensor

from ..gate import GradientGate
from ..methods import make_gate

__all__ = [
    "negative_example_trajectories",
    "negative_example",
    "line_integral",
    "proposition3_paths",
    "proposition3",
    "cosine_curves",
    "cosine_vs_dimension",
    "main",
]


def _plt():  # type: ignore[no-untyped-def]
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str) -> str:  # type: ignore[no-untyped-def]
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120)
    _plt().close(fig)
    return path


# ------------------------------------------------------------------ Appendix B: negative example
AUX_TARGET_B = 8.0


def _neg_main_loss(t: Tensor) -> Tensor:
    return torch.log1p(t[..., 0] ** 2) + t[..., 1] ** 2


def _neg_main_grad(t: Tensor) -> Tensor:
    x, y = t[..., 0], t[..., 1]
    return torch.stack([2 * x / (1 + x**2), 2 * y], -1)


def _neg_aux_grad(t: Tensor) -> Tensor:
    return torch.stack([t[..., 0] - AUX_TARGET_B, t[..., 1]], -1)


def negative_example_trajectories(
    rules: Sequence[str] = ("main_only", "unweighted", "weighted", "projection", "sum"),
    start: tuple[float, float] = (-1.0, 10.0),
    steps: int = 400,
    lr: float = 0.05,
    aux_weight: float = 1.0,
) -> dict[str, Tensor]:
    """Gradient descent on ``theta`` with each rule's update: ``{rule: (steps + 1, 2) path}``."""
    paths = {}
    for rule in rules:
        gate = make_gate(rule, aux_weight=aux_weight)
        theta = torch.tensor(start, dtype=torch.float64)
        path = [theta.clone()]
        for _ in range(steps):
            update, _ = gate.combine(_neg_main_grad(theta), {"aux": _neg_aux_grad(theta)})
            theta = theta - lr * update
            path.append(theta.clone())
        paths[rule] = torch.stack(path)
    return paths


def steps_to_reach(path: Tensor, level: float = 0.01) -> int | None:
    """First step at which the main loss of ``path`` is below ``level`` (``None`` if never)."""
    below = (_neg_main_loss(path) < level).nonzero()
    return int(below[0]) if len(below) else None


def negative_example(path: str = "figures/negative_example.png", steps: int = 400, lr: float = 0.05) -> str:
    """Draw the trajectories over the main loss and the main loss against the step."""
    plt = _plt()
    paths = negative_example_trajectories(steps=steps, lr=lr)
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    xs, ys = torch.meshgrid(torch.linspace(-2, 9, 200), torch.linspace(-1, 10.5, 160), indexing="xy")
    grid = torch.stack([xs, ys], -1).double()
    ax.contourf(xs, ys, _neg_main_loss(grid), levels=30, cmap="Greys", alpha=0.6)
    ax.plot([AUX_TARGET_B], [0], "r*", markersize=12, label="auxiliary minimum")
    ax.plot([0], [0], "k*", markersize=12, label="main minimum")
    for rule, p in paths.items():
        reached = steps_to_reach(p)
        label = f"{rule}: {'>' + str(steps) if reached is None else reached} steps to L_main<0.01"
        ax.plot(p[:, 0], p[:, 1], ".-", markersize=2, label=label)
        ax2.semilogy(_neg_main_loss(p).clamp(min=1e-12), label=rule)
    ax.set_title("Appendix B: the gate can slow convergence\nmain log(1+x^2)+y^2, aux ((x-8)^2+y^2)/2")
    ax.set_xlabel("x")
    ax.set_ylabel("y")
    ax.legend(fontsize=7, loc="upper right")
    ax2.set_xlabel("step")
    ax2.set_ylabel("main loss")
    ax2.grid(alpha=0.3)
    ax2.legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, path)


# ------------------------------------------------------------------ Proposition 3: counterexample
AUX_CENTER_P3 = (2.0, 0.0)


def _p3_fields(points: Tensor) -> tuple[Tensor, Tensor]:
    """(main gradient, gated field) at ``points`` ``(N, 2)``, the gate applied per point."""
    g_main = points
    g_aux = points - torch.tensor(AUX_CENTER_P3, dtype=points.dtype)
    gate = GradientGate(rule="unweighted", aux_weight=1.0)
    merged, _ = gate.combine(g_main, {"aux": g_aux}, batch_dims=1)
    return g_main, merged  # type: ignore[return-value]


def proposition3_paths() -> dict[str, list[tuple[float, float]]]:
    """Corner points of the two polygonal paths from ``P = (-0.5, 0)`` to ``Q = (2.5, 0)``."""
    return {
        "A": [(-0.5, 0.0), (2.5, 0.0)],
        "B": [(-0.5, 0.0), (-0.5, 1.5), (2.5, 1.5), (2.5, 0.0)],
    }


def line_integral(corners: Sequence[tuple[float, float]], per_unit: int = 4000) -> tuple[float, float]:
    """Midpoint-rule line integrals of (main gradient, gated field) along a polygonal path."""
    main_total, merged_total = 0.0, 0.0
    for a, b in zip(corners[:-1], corners[1:]):
        a_t, b_t = torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64)
        n = max(1, int(per_unit * float((b_t - a_t).norm())))
        s = (torch.arange(n, dtype=torch.float64) + 0.5) / n
        points = a_t + s[:, None] * (b_t - a_t)
        g_main, merged = _p3_fields(points)
        step = (b_t - a_t) / n
        main_total += float((g_main @ step).sum())
        merged_total += float((merged @ step).sum())
    return main_total, merged_total


def proposition3(path: str = "figures/proposition3.png") -> str:
    """Quiver plots of the main gradient field and the gated field with paths A and B."""
    plt = _plt()
    paths = proposition3_paths()
    integrals = {name: line_integral(c) for name, c in paths.items()}
    xs, ys = torch.meshgrid(torch.linspace(-1, 3, 17), torch.linspace(-1.5, 2, 15), indexing="xy")
    points = torch.stack([xs.flatten(), ys.flatten()], -1).double()
    g_main, merged = _p3_fields(points)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.6))
    for k, (ax, field, title) in enumerate(
        zip(axes, (g_main, merged), ("main gradient field g_main = theta", "gated field g_main + 1[cos>=0] g_aux"))
    ):
        ax.quiver(points[:, 0], points[:, 1], -field[:, 0], -field[:, 1], color="0.4", angles="xy")
        circle = plt.Circle((1.0, 0.0), 1.0, color="tab:red", alpha=0.12, label="gate closed (cos < 0)")
        if k == 1:
            ax.add_patch(circle)
        for name, style in (("A", "-"), ("B", "--")):
            c = torch.tensor(paths[name])
            value = integrals[name][k]
            ax.plot(c[:, 0], c[:, 1], style, linewidth=2.5, label=f"path {name}: integral = {value:.3f}")
        ax.plot([-0.5, 2.5], [0, 0], "ko")
        ax.annotate("P", (-0.5, 0), textcoords="offset points", xytext=(-12, -12))
        ax.annotate("Q", (2.5, 0), textcoords="offset points", xytext=(6, -12))
        ax.set_title(title, fontsize=10)
        ax.set_aspect("equal")
        ax.legend(fontsize=8, loc="lower left")
    fig.suptitle("Proposition 3: the gated field depends on the path, so it is not the gradient of any loss")
    fig.tight_layout()
    return _save(fig, path)


# ------------------------------------------------------------------ cosine against dimension
def _expected_abs_cosine(d: int) -> float:
    """E|cos| of two independent isotropic vectors in R^d: Gamma(d/2) / (sqrt(pi) Gamma((d+1)/2))."""
    return math.exp(math.lgamma(d / 2) - math.lgamma((d + 1) / 2)) / math.sqrt(math.pi)


def cosine_curves(
    dims: Sequence[int] = (2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000),
    trials: int = 200,
    noise_norm: float = 10.0,
    seed: int = 0,
) -> dict[str, list[float]]:
    """Mean |cos| of independent vectors and mean cos of noisy copies, per dimension, via the gate.

    Returns lists keyed ``dims``, ``independent``, ``independent_sd``, ``noisy``, ``noisy_sd``,
    ``independent_theory`` and ``noisy_theory`` (``d / (d + s^2)``, exact as ``d`` grows).
    """
    gen = torch.Generator().manual_seed(seed)
    out: dict[str, list[float]] = {
        k: []
        for k in ("dims", "independent", "independent_sd", "noisy", "noisy_sd", "independent_theory", "noisy_theory")
    }
    for d in dims:
        gate = GradientGate(rule="sum")
        a, b = torch.randn(trials, d, generator=gen), torch.randn(trials, d, generator=gen)
        _, stats = gate.combine(a, {"aux": b}, batch_dims=1)
        ind = stats.cosine[:, 0].abs()
        truth = torch.randn(trials, d, generator=gen)

        def noise() -> Tensor:
            n = torch.randn(trials, d, generator=gen)
            return noise_norm * n / n.norm(dim=-1, keepdim=True)

        gate = GradientGate(rule="sum")
        _, stats = gate.combine(truth + noise(), {"aux": truth + noise()}, batch_dims=1)
        noisy = stats.cosine[:, 0]
        out["dims"].append(d)
        out["independent"].append(float(ind.mean()))
        out["independent_sd"].append(float(ind.std()))
        out["noisy"].append(float(noisy.mean()))
        out["noisy_sd"].append(float(noisy.std()))
        out["independent_theory"].append(_expected_abs_cosine(d))
        out["noisy_theory"].append(d / (d + noise_norm**2))
    return out


def cosine_vs_dimension(path: str = "figures/cosine_vs_dimension.png", trials: int = 200) -> str:
    """Draw both curves with their theory."""
    plt = _plt()
    c = cosine_curves(trials=trials)
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    ax.errorbar(
        c["dims"],
        c["independent"],
        yerr=c["independent_sd"],
        marker="o",
        capsize=3,
        label="|cos|, two independent N(0, I) vectors",
    )
    ax.plot(c["dims"], c["independent_theory"], "k:", label="theory: Gamma(d/2) / (sqrt(pi) Gamma((d+1)/2))")
    ax.errorbar(
        c["dims"],
        c["noisy"],
        yerr=c["noisy_sd"],
        marker="s",
        capsize=3,
        label="cos, two copies of one N(0, I) vector + noise of norm 10",
    )
    ax.plot(c["dims"], c["noisy_theory"], "k--", label="theory: d / (d + 100)")
    ax.set_xscale("log")
    ax.set_xlabel("dimension d")
    ax.set_ylabel("cosine similarity")
    ax.set_ylim(-0.05, 1.05)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title("Cosine similarity against dimension")
    fig.tight_layout()
    return _save(fig, path)


FIGURES = {
    "negative_example": negative_example,
    "proposition3": proposition3,
    "cosine_vs_dimension": cosine_vs_dimension,
}


def main(argv: list[str] | None = None) -> int:
    """``gradsim figures [--out DIR] [--only NAME ...]``: write the PNGs."""
    parser = argparse.ArgumentParser(prog="gradsim figures", description="Draw the paper's remaining figures.")
    parser.add_argument("--out", default="figures", help="output folder (default: ./figures)")
    parser.add_argument("--only", nargs="*", choices=sorted(FIGURES), help="draw only these figures")
    args = parser.parse_args(argv)
    for name in args.only or FIGURES:
        print(FIGURES[name](os.path.join(args.out, f"{name}.png")))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
