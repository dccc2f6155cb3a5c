"""2-D toy problems: how each rule moves the parameters (``gradsim toy``).

``gradsim toy`` has three parts:

* ``gradsim toy`` / ``gradsim toy blog`` (the default) -- the projection blog's unit-circle toy
  with the blog's own settings, Adam and gradient descent (:mod:`.toy_blog`);
* ``gradsim toy figure2`` -- the paper's Figure 2 toys and its convergence-time measure over
  random starts (:mod:`.toy_figure2`);
* ``gradsim toy trajectories --problem ...`` (or ``gradsim toy --problem ...``) -- the
  trajectories below.

Problems (``theta`` in R^2, main loss and auxiliary *update field*):

* ``paper`` -- the paper's toy: main ``|theta|^2``, auxiliary ``|theta - 1|^2`` (``1 = (1, 1)``).
  Plain summing converges to ``(0.5, 0.5)``; the gated rules reach the main minimum ``0``.
* ``paper_field`` -- the same main loss with an auxiliary vector field that is *not* the gradient of
  any loss (paper section 3): ``v(theta) = 2 (theta - 1) + 2 R (theta - 1)`` with ``R`` the 90 degree
  rotation, a spiral around ``1``. The rules only need update vectors, not losses.
* ``circle`` -- the blog's unit-circle losses from several starts: every point of the unit circle
  minimises the main loss ``(|theta| - 1)^2``; the auxiliary ``|theta - (2, 0)|^2`` prefers a point
  outside it. Gated, the auxiliary only picks *where* on the circle to land (near ``(1, 0)``).

Each rule runs gradient descent on ``theta`` from several starting points at once (the gate's
``batch_dims``: one independent gate state per start), and :func:`plot_trajectories` draws the
paths over the main loss's contours.

Example::

    paths = run_toy("paper", rules=["sum", "unweighted"], steps=200, lr=0.05)
    plot_trajectories("paper", paths, "runs/toys/paper.png")
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from ..cli_checks import check_out_dir, command_parser, float_in, int_at_least, user_errors
from ..methods import list_methods, make_gate
from .csv_rows import write_csv

__all__ = ["PROBLEMS", "run_toy", "plot_trajectories", "main"]

_R90 = torch.tensor([[0.0, -1.0], [1.0, 0.0]])


def _paper_main(t: Tensor) -> Tensor:
    return (t**2).sum(-1)


def _paper_aux(t: Tensor) -> Tensor:
    return 2 * (t - 1)


def _field_aux(t: Tensor) -> Tensor:
    d = t - 1
    return 2 * d + 2 * d @ _R90.to(d).T


def _circle_main(t: Tensor) -> Tensor:
    return (t.norm(dim=-1) - 1) ** 2


def _circle_aux(t: Tensor) -> Tensor:
    return 2 * (t - torch.tensor([2.0, 0.0], dtype=t.dtype))


def _grad(loss: Callable[[Tensor], Tensor], t: Tensor) -> Tensor:
    t = t.detach().requires_grad_(True)
    (g,) = torch.autograd.grad(loss(t).sum(), t)
    return g


#: name -> (main loss, auxiliary update field, starting points, plot limits)
PROBLEMS: dict[
    str, tuple[Callable[[Tensor], Tensor], Callable[[Tensor], Tensor], list[list[float]], tuple[float, float]]
] = {
    "paper": (_paper_main, _paper_aux, [[-1.5, 2.0], [2.0, -1.0], [-1.0, -1.5], [1.8, 1.2]], (-2.2, 2.4)),
    "paper_field": (_paper_main, _field_aux, [[-1.5, 2.0], [2.0, -1.0], [-1.0, -1.5], [1.8, 1.2]], (-2.2, 2.4)),
    "circle": (_circle_main, _circle_aux, [[-0.3, 0.2], [0.1, -1.6], [-1.5, 1.0], [0.5, 1.5]], (-2.0, 2.5)),
}


def run_toy(
    problem: str = "paper",
    rules: Sequence[str] = ("main_only", "sum", "unweighted", "weighted", "projection"),
    steps: int = 200,
    lr: float = 0.05,
    starts: Sequence[Sequence[float]] | None = None,
    **gate_kwargs: object,
) -> dict[str, Tensor]:
    """Trajectories ``(steps + 1, n_starts, 2)`` per rule (any method name), from each start."""
    if problem not in PROBLEMS:
        raise ValueError(f"Unknown toy problem {problem!r}; choose from {', '.join(PROBLEMS)}.")
    unknown = [r for r in rules if r not in list_methods()]
    if unknown:
        raise ValueError(f"Unknown rule(s) {unknown}; choose from {', '.join(list_methods())}.")
    main_loss, aux_field, default_starts, _ = PROBLEMS[problem]
    theta0 = torch.tensor(default_starts if starts is None else [list(s) for s in starts], dtype=torch.float64)
    out = {}
    for rule in rules:
        gate = make_gate(rule, **gate_kwargs).double()
        theta = theta0.clone()
        path = [theta.clone()]
        for _ in range(steps):
            update, _ = gate.combine(_grad(main_loss, theta), {"aux": aux_field(theta)}, batch_dims=1)
            assert isinstance(update, Tensor)  # combine() returns main's structure: a tensor here
            theta = theta - lr * update
            path.append(theta.clone())
        out[rule] = torch.stack(path)
    return out


def plot_trajectories(problem: str, paths: dict[str, Tensor], path: str | os.PathLike) -> str:
    """Draw each rule's trajectories over the main loss's contours; returns the PNG path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    main_loss, _, _, (lo, hi) = PROBLEMS[problem]
    grid = torch.linspace(lo, hi, 200, dtype=torch.float64)
    xx, yy = torch.meshgrid(grid, grid, indexing="xy")
    zz = main_loss(torch.stack([xx, yy], -1))
    n = len(paths)
    fig, axes = plt.subplots(1, n, figsize=(3.2 * n, 3.4), squeeze=False)
    for ax, (rule, traj) in zip(axes[0], paths.items()):
        ax.contour(xx.numpy(), yy.numpy(), zz.numpy(), levels=15, colors="0.8", linewidths=0.6)
        for s in range(traj.shape[1]):
            ax.plot(traj[:, s, 0].numpy(), traj[:, s, 1].numpy(), lw=1.2)
            ax.plot(traj[0, s, 0].item(), traj[0, s, 1].item(), "o", ms=3, color="k")
            ax.plot(traj[-1, s, 0].item(), traj[-1, s, 1].item(), "*", ms=7, color="crimson")
        ax.set_title(rule, fontsize="small")
        ax.set_xlim(lo, hi)
        ax.set_ylim(lo, hi)
        ax.set_aspect("equal")
    fig.suptitle(f"toy '{problem}': trajectories per rule (o start, * end)", fontsize="small")
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)


def _trajectories_main(argv: list[str]) -> int:
    parser = command_parser(
        prog="gradsim toy trajectories", description="Trajectories of each rule on a 2-D toy problem, as PNGs."
    )
    parser.add_argument("--problem", default="all", choices=[*PROBLEMS, "all"])
    parser.add_argument("--rules", nargs="+", default=["main_only", "sum", "unweighted", "weighted", "projection"])
    parser.add_argument("--steps", type=int_at_least(1), default=200)
    parser.add_argument("--lr", type=float_in(0, low_open=True), default=0.05)
    parser.add_argument("--out-dir", default=os.path.join("runs", "toys"))
    args = parser.parse_args(argv)
    check_out_dir(args.out_dir, "--out-dir")
    problems = list(PROBLEMS) if args.problem == "all" else [args.problem]
    try:
        for problem in problems:
            paths = run_toy(problem, args.rules, args.steps, args.lr)
            png = plot_trajectories(problem, paths, os.path.join(args.out_dir, f"{problem}.png"))
            ends = ", ".join(f"{r}: ({p[-1, 0, 0]:.3f}, {p[-1, 0, 1]:.3f})" for r, p in paths.items())
            print(f"{problem}: {png}\n  end from start 1 -> {ends}")
    except ValueError as err:
        print(f"gradsim toy: {err}")
        return 2
    return 0


def _blog_main(argv: list[str]) -> int:
    from .toy_blog import (
        BLOG_RULES,
        OPTIMIZERS,
        BlogCircle,
        blog_circle_report,
        plot_blog_circle,
        run_blog_circle,
    )

    d = BlogCircle()
    parser = command_parser(
        prog="gradsim toy blog",
        description="The projection blog's unit-circle toy with its settings: L_primary = (|theta| - 1)^2, "
        "L_aux = |theta - (2, 0)|^2, start (0, 2), lambda 0.1, Adam and gradient descent at lr 0.01.",
    )
    parser.add_argument("--optimizers", default=",".join(OPTIMIZERS), help="comma-separated subset of adam,gd")
    parser.add_argument("--rules", nargs="+", default=list(BLOG_RULES))
    parser.add_argument("--steps", type=int_at_least(1), default=d.steps, help=f"steps per run (ours: {d.steps})")
    parser.add_argument(
        "--random-starts",
        type=int_at_least(0),
        default=d.random_starts,
        help=f"extra random starts in [-{d.box:g}, {d.box:g}]^2 (ours: {d.random_starts})",
    )
    parser.add_argument("--out-dir", default=os.path.join("runs", "toys"))
    args = parser.parse_args(argv)
    check_out_dir(args.out_dir, "--out-dir")
    import time

    settings = BlogCircle(steps=args.steps, random_starts=args.random_starts)
    start = time.perf_counter()
    try:
        paths = {opt: run_blog_circle(opt, args.rules, settings) for opt in args.optimizers.split(",") if opt}
    except ValueError as err:
        print(f"gradsim toy: {err}")
        return 2
    report = blog_circle_report(paths, settings)
    os.makedirs(args.out_dir, exist_ok=True)
    png = plot_blog_circle(paths, os.path.join(args.out_dir, "blog_circle.png"))
    with open(os.path.join(args.out_dir, "blog_circle.md"), "w") as f:
        f.write(report)
    print(report)
    print(f"{time.perf_counter() - start:.1f} s; wrote {png} and {os.path.join(args.out_dir, 'blog_circle.md')}")
    return 0


def _figure2_main(argv: list[str]) -> int:
    from .toy_figure2 import FIGURE2_RULES, PAPER, ROWS, figure2_markdown, figure2_table, plot_figure2

    parser = command_parser(
        prog="gradsim toy figure2",
        description="The paper's Figure 2 toys: convergence time (steps until the main loss stays below the "
        "level) over random starts, per row (main + auxiliary) and rule.",
    )
    parser.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated subset of {','.join(ROWS)}")
    parser.add_argument("--rules", nargs="+", default=list(FIGURE2_RULES))
    parser.add_argument("--starts", type=int_at_least(1), default=500, help="random starts per cell (ours: 500)")
    parser.add_argument(
        "--box", type=float_in(0, low_open=True), default=2.0, help="starts uniform in [-box, box]^2 (ours: 2)"
    )
    parser.add_argument("--steps", type=int_at_least(1), default=PAPER["steps"])
    parser.add_argument("--lr", type=float_in(0, low_open=True), default=PAPER["lr"])
    parser.add_argument("--level", type=float_in(0, low_open=True), default=PAPER["level"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out-dir", default=os.path.join("runs", "toys"))
    args = parser.parse_args(argv)
    check_out_dir(args.out_dir, "--out-dir")
    import time

    start = time.perf_counter()
    try:
        table, raw = figure2_table(
            [r for r in args.rows.split(",") if r],
            args.rules,
            args.starts,
            args.steps,
            args.lr,
            args.level,
            args.box,
            args.seed,
        )
    except ValueError as err:
        print(f"gradsim toy: {err}")
        return 2
    os.makedirs(args.out_dir, exist_ok=True)
    text = figure2_markdown(table, args.steps, args.level)
    with open(os.path.join(args.out_dir, "figure2.md"), "w") as f:
        f.write(text)
    write_csv(os.path.join(args.out_dir, "figure2.csv"), table)
    png = plot_figure2(raw, os.path.join(args.out_dir, "figure2.png"), args.level, box=args.box)
    print(text)
    print(f"{time.perf_counter() - start:.1f} s; wrote {png}, figure2.md and figure2.csv in {args.out_dir}")
    return 0


_PARTS = {"blog": _blog_main, "figure2": _figure2_main, "trajectories": _trajectories_main}


@user_errors("gradsim toy")
def main(argv: list[str] | None = None) -> int:
    """``gradsim toy [blog|figure2|trajectories] [options]`` (default ``blog``; ``--problem ...`` means
    ``trajectories``, as before)."""
    import sys

    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in _PARTS:
        return _PARTS[argv[0]](argv[1:])
    if argv and argv[0] in {"-h", "--help"}:
        print(
            "usage: gradsim toy [blog|figure2|trajectories] [options]\n\n"
            "  blog          the blog's unit-circle toy, its settings, Adam and gradient descent (default)\n"
            "  figure2       the paper's Figure 2 convergence times over random starts\n"
            "  trajectories  trajectories per rule on the 2-D problems (--problem paper|paper_field|circle|all)\n\n"
            "`gradsim toy PART --help` lists each part's options."
        )
        return 0
    if any(a == "--problem" or a.startswith("--problem=") for a in argv):
        return _trajectories_main(argv)
    return _blog_main(argv)
