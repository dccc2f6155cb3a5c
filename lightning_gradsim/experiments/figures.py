"""The paper's remaining illustrations, drawn with the library's own gate (``gradsim figures``).

* :func:`negative_example` -- Appendix B (its Figure 9, caption "Negative example optimization"):
  the paper's functions, main ``L3 = 1[t1 < 0] |t|^2 + 1[t1 >= 0] (1 - exp(-2 |t|^2))`` (flat far
  from 0 for ``t1 >= 0``; the exponent is our reading of a garbled caption) and auxiliary
  ``L4 = (t1 - 2)^2 + (t2 - 0.5)^2``, which pulls into the flat region; steepest descent, 600
  steps of 0.01, convergence = main loss below 0.1 (the captions). The starts are ours (random,
  uniform in ``[-2, 2]^2``). It compares ``main_only`` with the ``unweighted`` gate start by start
  and marks in red the runs the gate slows down (the paper's "compared on red runs").
* :func:`proposition3` -- the counterexample of Proposition 3 (A.2). The text keeps its structure:
  two paths between two points, A "up" then "right", B "right" then "up", one of them through the
  region where the gate is closed; the functions and the points are lost in our copy. We use main
  ``|t|^2 / 2``, auxiliary ``|t - (2, 0)|^2 / 2`` (the gate is closed inside the circle of
  diameter [0, (2, 0)]), ``P = (-0.5, 0)``, ``Q = (2.5, 1.5)``: the main field's line integral is
  4.125 on both paths, the gated field's 2.25 on A and 4.25 on B.
* :func:`cosine_vs_dimension` -- Appendix E: left, the cosine of two independent ``N(0, sigma^2 I_d)``
  vectors (mean 0, variance ``1/d``, ``E|cos| = Gamma(d/2) / (sqrt(pi) Gamma((d+1)/2))``); right,
  the paper's noise model ``mu ~ N(0, I_d)``, ``theta_i ~ N(mu, sigma I_d)`` (``sigma I_d`` the
  covariance), whose cosine tends to ``1 / (1 + sigma)`` as ``d`` grows, for several ``sigma``.

Every figure computes the gated vectors with :meth:`GradientGate.combine`, batched over points.

Example::

    from lightning_gradsim.experiments import figures
    figures.proposition3("runs/figures/proposition3.png")

    gradsim figures --out runs/figures          # all three PNGs

>>> [round(v, 3) for v in line_integral(proposition3_paths()["A"], per_unit=400)]
[4.125, 2.25]
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

import torch
from torch import Tensor

from ..cli_checks import check_out_dir, command_parser, user_errors
from ..core.gate import GradientGate
from .toy_figure2 import ROWS, ConvergenceResult, convergence_times, random_starts

__all__ = [
    "negative_example_runs",
    "slowed_down",
    "negative_example",
    "line_integral",
    "proposition3_paths",
    "proposition3",
    "independent_cosines",
    "noisy_copy_cosines",
    "noisy_cosine_limit",
    "cosine_curves",
    "cosine_vs_dimension",
    "main",
]


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str) -> str:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120)
    _plt().close(fig)
    return path


# ------------------------------------------------------------------ Appendix B: negative example
NEGATIVE_ROW = "L3+L4"  # the paper's negative example, a row of Figure 2 (see toy_figure2)


def negative_example_runs(
    rules: Sequence[str] = ("main_only", "unweighted", "weighted", "sum"),
    n_starts: int = 200,
    seed: int = 0,
    steps: int = 600,
    lr: float = 0.01,
    level: float = 0.1,
) -> dict[str, ConvergenceResult]:
    """Steepest descent on the paper's negative example from the same random starts, per rule."""
    starts = random_starts(n_starts, 2.0, seed)
    return {rule: convergence_times(NEGATIVE_ROW, rule, starts, steps, lr, level) for rule in rules}


def slowed_down(runs: dict[str, ConvergenceResult], rule: str = "unweighted") -> Tensor:
    """Starts where ``rule`` needs more steps than ``main_only`` (or never converges while it does)."""
    main, gated = runs["main_only"], runs[rule]
    return main.converged & (~gated.converged | (gated.steps > main.steps))


def negative_example(path: str = "figures/negative_example.png", n_starts: int = 200) -> str:
    """Trajectories of ``main_only`` and ``unweighted`` (slowed runs in red) and steps per start."""
    plt = _plt()
    runs = negative_example_runs(rules=("main_only", "unweighted"), n_starts=n_starts)
    slow = slowed_down(runs)
    main, gated = runs["main_only"], runs["unweighted"]
    n_starts = main.paths.shape[1]
    shown = min(60, n_starts)
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.8))
    xs, ys = torch.meshgrid(torch.linspace(-2.5, 3, 200), torch.linspace(-2.5, 2.5, 180), indexing="xy")
    grid = torch.stack([xs, ys], -1).double()
    main_loss = ROWS[NEGATIVE_ROW].main_loss(grid)
    for ax, rule in zip(axes[:2], ("main_only", "unweighted")):
        ax.contourf(xs, ys, main_loss, levels=20, cmap="Greys", alpha=0.5)
        ax.contour(xs, ys, main_loss, levels=[0.1], colors="k", linewidths=1)
        res = runs[rule]
        for s in range(shown):
            p = res.paths[:, s]
            ax.plot(p[:, 0], p[:, 1], color="tab:red" if slow[s] else "tab:green", lw=0.7, alpha=0.8)
        ax.plot([2.0], [0.5], "b*", markersize=11, label="auxiliary minimum (2, 0.5)")
        ax.set_title(f"{rule}: red = slowed by the gate ({shown} of {n_starts} starts)", fontsize=9)
        ax.set_aspect("equal")
        ax.legend(fontsize=7, loc="lower right")
    both = main.converged & gated.converged
    ax = axes[2]
    ax.scatter(main.steps[both], gated.steps[both], s=8, c=["tab:red" if v else "tab:green" for v in slow[both]])
    top = max(float(main.steps.max()), float(gated.steps.max()), 1.0)
    ax.plot([0, top], [0, top], "k:", lw=1)
    ax.set_xlabel("main_only: steps to main loss < 0.1")
    ax.set_ylabel("unweighted: steps")
    ax.set_title(
        f"slowed {int(slow.sum())}/{int(main.converged.sum())} converging starts; "
        f"gate-only failures {int((main.converged & ~gated.converged).sum())}",
        fontsize=9,
    )
    ax.grid(alpha=0.3)
    fig.suptitle(
        "Appendix B: the paper's negative example, main L3 (flat for t1 >= 0), auxiliary "
        "(t1-2)^2+(t2-0.5)^2; steepest descent, step 0.01, 600 steps",
        fontsize=10,
    )
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
    assert isinstance(merged, Tensor)  # combine() returns main's structure: a tensor here
    return g_main, merged


P3_START, P3_END = (-0.5, 0.0), (2.5, 1.5)


def proposition3_paths() -> dict[str, list[tuple[float, float]]]:
    """The paper's two paths from ``P`` to ``Q``: A goes up then right, B right then up (corners)."""
    (px, py), (qx, qy) = P3_START, P3_END
    return {"A": [(px, py), (px, qy), (qx, qy)], "B": [(px, py), (qx, py), (qx, qy)]}


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
        for name, style in (("A", ":"), ("B", "--")):
            c = torch.tensor(paths[name])
            value = integrals[name][k]
            ax.plot(c[:, 0], c[:, 1], style, linewidth=2.5, label=f"path {name}: integral = {value:.3f}")
        ax.plot(*P3_START, "g*", markersize=12)
        ax.plot(*P3_END, "k*", markersize=12)
        ax.annotate("P", P3_START, textcoords="offset points", xytext=(-12, -12))
        ax.annotate("Q", P3_END, textcoords="offset points", xytext=(6, -12))
        ax.set_title(title, fontsize=10)
        ax.set_aspect("equal")
        ax.legend(fontsize=8, loc="lower left")
    fig.suptitle("Proposition 3: the gated field depends on the path, so it is not the gradient of any loss")
    fig.tight_layout()
    return _save(fig, path)


# ------------------------------------------------------------------ Appendix E: cosine against dimension
#: the sigma values of the noise model (ours: the paper's are not given in our copy)
APPENDIX_E_SIGMAS = (0.25, 1.0, 4.0)
APPENDIX_E_DIMS = (2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000)


def _expected_abs_cosine(d: int) -> float:
    """E|cos| of two independent isotropic vectors in R^d: Gamma(d/2) / (sqrt(pi) Gamma((d+1)/2))."""
    return math.exp(math.lgamma(d / 2) - math.lgamma((d + 1) / 2)) / math.sqrt(math.pi)


def _gate_cosine(a: Tensor, b: Tensor) -> Tensor:
    """The gate's cosine of the rows of ``a`` and ``b`` (``combine`` with ``batch_dims=1``)."""
    _, stats = GradientGate(rule="sum").combine(a, {"aux": b}, batch_dims=1)
    return stats.cosine[:, 0]


def independent_cosines(d: int, trials: int, sigma: float = 1.0, gen: torch.Generator | None = None) -> Tensor:
    """Cosines of ``trials`` pairs of independent ``N(0, sigma^2 I_d)`` vectors (Appendix E, left)."""
    a = sigma * torch.randn(trials, d, generator=gen, dtype=torch.float64)
    b = sigma * torch.randn(trials, d, generator=gen, dtype=torch.float64)
    return _gate_cosine(a, b)


def noisy_copy_cosines(d: int, trials: int, sigma: float, gen: torch.Generator | None = None) -> Tensor:
    """Appendix E, right: ``mu ~ N(0, I_d)``, ``theta_1, theta_2 ~ N(mu, sigma I_d)``; their cosines."""
    mu = torch.randn(trials, d, generator=gen, dtype=torch.float64)
    noise = math.sqrt(sigma)
    a = mu + noise * torch.randn(trials, d, generator=gen, dtype=torch.float64)
    b = mu + noise * torch.randn(trials, d, generator=gen, dtype=torch.float64)
    return _gate_cosine(a, b)


def noisy_cosine_limit(sigma: float) -> float:
    """``lim_{d -> inf} cos = E[mu.mu] / E|theta|^2 = 1 / (1 + sigma)`` for the noise model.

    >>> noisy_cosine_limit(1.0)
    0.5
    """
    return 1.0 / (1.0 + sigma)


def cosine_curves(
    dims: Sequence[int] = APPENDIX_E_DIMS,
    trials: int = 200,
    sigmas: Sequence[float] = APPENDIX_E_SIGMAS,
    seed: int = 0,
) -> dict[str, list]:
    """Per dimension: the independent pair's mean cosine, its s.d. and mean |cos| (with their exact
    values 0, ``1/sqrt(d)``, :func:`_expected_abs_cosine`), and per sigma the noise model's mean
    cosine, its s.d. and the large-d limit ``1 / (1 + sigma)``.
    """
    gen = torch.Generator().manual_seed(seed)
    out: dict[str, list] = {
        k: []
        for k in (
            "dims",
            "independent",
            "independent_sd",
            "independent_abs",
            "independent_sd_theory",
            "independent_abs_theory",
        )
    }
    for sigma in sigmas:
        out[f"noisy_{sigma:g}"], out[f"noisy_{sigma:g}_sd"] = [], []
    out["sigmas"] = list(sigmas)
    for d in dims:
        ind = independent_cosines(d, trials, 1.0, gen)
        out["dims"].append(d)
        out["independent"].append(float(ind.mean()))
        out["independent_sd"].append(float(ind.std()))
        out["independent_abs"].append(float(ind.abs().mean()))
        out["independent_sd_theory"].append(1 / math.sqrt(d))
        out["independent_abs_theory"].append(_expected_abs_cosine(d))
        for sigma in sigmas:
            c = noisy_copy_cosines(d, trials, sigma, gen)
            out[f"noisy_{sigma:g}"].append(float(c.mean()))
            out[f"noisy_{sigma:g}_sd"].append(float(c.std()))
    return out


def cosine_vs_dimension(path: str = "figures/cosine_vs_dimension.png", trials: int = 200) -> str:
    """Appendix E's two panels with their exact values and limits."""
    plt = _plt()
    c = cosine_curves(trials=trials)
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(12, 4.4))
    dims = c["dims"]
    lo = [m - s for m, s in zip(c["independent"], c["independent_sd"])]
    hi = [m + s for m, s in zip(c["independent"], c["independent_sd"])]
    ax.fill_between(dims, lo, hi, alpha=0.2, label="mean cos +- s.d. (exact s.d. 1/sqrt(d) dotted)")
    ax.plot(dims, c["independent"], "o-", ms=3)
    ax.plot(dims, c["independent_sd_theory"], "k:", lw=1)
    ax.plot(dims, [-v for v in c["independent_sd_theory"]], "k:", lw=1)
    ax.plot(dims, c["independent_abs"], "s-", ms=3, label="mean |cos|")
    ax.plot(dims, c["independent_abs_theory"], "k--", lw=1, label="exact E|cos|")
    ax.set_title("two independent N(0, sigma^2 I_d) vectors", fontsize=10)
    for sigma in c["sigmas"]:
        m, sd = c[f"noisy_{sigma:g}"], c[f"noisy_{sigma:g}_sd"]
        line = ax2.errorbar(dims, m, yerr=sd, marker="o", ms=3, capsize=2, label=f"sigma = {sigma:g}")
        ax2.axhline(noisy_cosine_limit(sigma), color=line[0].get_color(), ls=":", lw=1)
    ax2.set_title("mu ~ N(0, I_d), theta_1, theta_2 ~ N(mu, sigma I_d) (dotted: 1 / (1 + sigma))", fontsize=10)
    for a in (ax, ax2):
        a.set_xscale("log")
        a.set_xlabel("dimension d")
        a.set_ylabel("cosine similarity")
        a.grid(alpha=0.3)
        a.legend(fontsize=7)
    fig.suptitle(f"Appendix E: cosine similarity against dimension ({trials} draws per point)", fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


FIGURES = {
    "negative_example": negative_example,
    "proposition3": proposition3,
    "cosine_vs_dimension": cosine_vs_dimension,
}


@user_errors("gradsim figures")
def main(argv: list[str] | None = None) -> int:
    """``gradsim figures [--out DIR] [--only NAME ...]``: write the PNGs."""
    parser = command_parser(prog="gradsim figures", description="Draw the paper's remaining figures.")
    parser.add_argument("--out", default="figures", help="output folder (default: ./figures)")
    parser.add_argument("--only", nargs="*", choices=sorted(FIGURES), help="draw only these figures")
    args = parser.parse_args(argv)
    check_out_dir(args.out, "--out")
    for name in args.only or FIGURES:
        print(FIGURES[name](os.path.join(args.out, f"{name}.png")))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
