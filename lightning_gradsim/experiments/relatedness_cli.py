"""``gradsim relatedness``: the command line of the task-relatedness sweep.

It runs :func:`lightning_gradsim.experiments.relatedness.run_sweep` and writes ``runs.csv``,
``summary.csv``, ``table.md``, ``relatedness.png`` and the third claim's verdict ``claim3.md``::

    gradsim relatedness --seeds 3 --lambdas 0.3,1,3 --out relatedness_out
    gradsim relatedness --full --out relatedness_full
"""

from __future__ import annotations

import argparse
import os
import time
from dataclasses import replace

import torch

from ..cli_checks import check_out_dir, command_parser, float_in, int_at_least, user_errors
from . import relatedness
from .relatedness import SweepConfig, run_sweep
from .relatedness_claims import claim3_markdown
from .relatedness_report import markdown_table, summarize, write_outputs
from .relatedness_setup import CLAIM3_METHODS, METHODS

__all__ = ["main"]


def _floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers like 0.1,1,3, got {text!r}") from None


def _names(text: str) -> tuple[str, ...]:
    return tuple(v.strip() for v in text.split(",") if v.strip())


@user_errors("gradsim relatedness")
def main(argv: list[str] | None = None) -> int:
    """``gradsim relatedness``: run the sweep and write the table and the figure."""
    parser = command_parser(prog="gradsim relatedness", description=(relatedness.__doc__ or "").split("\n\n")[0])
    parser.add_argument(
        "--seeds", type=int_at_least(1), default=None, help="number of seeds (default 3; 10 with --full)"
    )
    parser.add_argument("--lambdas", type=_floats, default=None, help="comma-separated lambdas (default 0.3,1,3)")
    parser.add_argument(
        "--methods",
        type=_names,
        default=None,
        help=f"comma-separated subset of {','.join(METHODS)}, or 'all' "
        f"(default: the blog's third-claim comparison {','.join(CLAIM3_METHODS)})",
    )
    parser.add_argument(
        "--relatedness", type=_names, default=None, help="comma-separated subset of same,similar,unrelated"
    )
    parser.add_argument(
        "--full", action="store_true", help="the complete sweep (10 seeds, 6 lambdas, lr 1e-3, up to 150 epochs)"
    )
    parser.add_argument("--max-epochs", type=int_at_least(1), default=None)
    parser.add_argument("--patience", type=int_at_least(0), default=None)
    parser.add_argument("--lr", type=float_in(0, low_open=True), default=None)
    parser.add_argument("--batch-size", type=int_at_least(1), default=None)
    parser.add_argument(
        "--n-train", type=int_at_least(1), default=None, help="training vectors per task (default 1000)"
    )
    parser.add_argument(
        "--n-val", type=int_at_least(1), default=None, help="main-task validation vectors (default 1000)"
    )
    parser.add_argument("--n-test", type=int_at_least(1), default=None, help="main-task test vectors (default 10000)")
    parser.add_argument(
        "--threads", type=int_at_least(1), default=None, help="torch.set_num_threads (default: torch's)"
    )
    parser.add_argument("--out", default="relatedness_out", help="output folder")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    check_out_dir(args.out, "--out")
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = SweepConfig.full() if args.full else SweepConfig()
    overrides: dict[str, object] = {}
    if args.seeds is not None:
        if args.seeds < 1:
            parser.error(f"--seeds must be at least 1, got {args.seeds}")
        overrides["seeds"] = tuple(range(args.seeds))
    for name in (
        "lambdas",
        "methods",
        "relatedness",
        "max_epochs",
        "patience",
        "lr",
        "batch_size",
        "n_train",
        "n_val",
        "n_test",
    ):
        value = getattr(args, name)
        if value is not None:
            overrides[name] = tuple(METHODS) if name == "methods" and value == ("all",) else value
    overrides["progress"] = not args.no_progress
    cfg = replace(cfg, **overrides)  # type: ignore[arg-type]
    try:
        cfg.validate()
    except ValueError as err:
        parser.error(str(err))
    start = time.perf_counter()
    results = run_sweep(cfg)
    paths = write_outputs(results, args.out)
    print(markdown_table(summarize(results)))
    claim = claim3_markdown(results)
    if "###" in claim:  # the sweep has the methods the claim needs
        paths["claim3.md"] = os.path.join(args.out, "claim3.md")
        with open(paths["claim3.md"], "w") as f:
            f.write(claim)
        print(claim)
    print(f"{len(results)} runs in {time.perf_counter() - start:.0f} s; wrote {', '.join(paths.values())}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
