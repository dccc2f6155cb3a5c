"""``gradsim table1`` on the command line: every argument checked before any training, the state
saved after each epoch, ``--resume`` to continue a run that stopped.

>>> build_parser().parse_args(["--angles", "0,90", "--seeds", "2"]).angles
[0.0, 90.0]
"""

from __future__ import annotations

import argparse
import os
import time

from ..cli_checks import (
    UsageError,
    angle_list,
    check_device,
    check_out_dir,
    check_path,
    command_parser,
    float_in,
    int_at_least,
    user_errors,
)
from .table1 import DEFAULT_ANGLES, DEFAULT_METHODS, Table1Config

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    """The parser of ``gradsim table1`` (every value range checked as it is parsed)."""
    p = command_parser(
        "gradsim table1", "The paper's Table 1 (rotated MNIST, section 4.2): stacked runs, table, plots."
    )
    p.add_argument("--root", help="torchvision MNIST folder (holding MNIST/raw); default $GRADSIM_MNIST_ROOT")
    p.add_argument(
        "--source", choices=["mnist", "digits"], default="mnist", help="mnist (needs --root) or digits (bundled 8x8)"
    )
    p.add_argument(
        "--angles",
        type=angle_list,
        default=",".join(f"{a:g}" for a in DEFAULT_ANGLES),
        help="counter-clockwise rotations in degrees, each in [0, 360), e.g. 0,90 (default %(default)s)",
    )
    p.add_argument(
        "--methods", default=",".join(DEFAULT_METHODS), help="methods, e.g. main_only,sum,unweighted:threshold=0.02"
    )
    p.add_argument("--seeds", type=int_at_least(1), default=10, help="number of seeds: 0..N-1 (default 10)")
    p.add_argument("--epochs", type=int_at_least(1), default=50)
    p.add_argument("--batch-size", type=int_at_least(1), default=128)
    p.add_argument(
        "--lr", type=float_in(0, low_open=True), default=1e-3, help="RMSprop learning rate (blank in the paper; 1e-3)"
    )
    p.add_argument("--aux-weight", type=float_in(0), default=1.0, help="lambda of the auxiliary task (default 1)")
    p.add_argument("--threshold", type=float_in(-1, 1), default=0.0, help="cosine threshold of the gates (default 0)")
    p.add_argument(
        "--cosine-ema", type=float_in(0, 1, high_open=True), default=0.0, help="EMA factor of the cosine, in [0, 1)"
    )
    p.add_argument("--per-layer", action="store_true", help="cosine per parameter tensor, averaged (paper D.3)")
    p.add_argument("--hidden", type=int_at_least(1), default=100)
    p.add_argument("--depth", type=int_at_least(1), default=3)
    p.add_argument(
        "--split-seed", type=int, default=0, help="seed of the fixed train/test split (10k MNIST file, digits)"
    )
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    p.add_argument("--threads", type=int_at_least(1), help="torch CPU threads (default: torch's)")
    p.add_argument("--out", default=os.path.join("runs", "table1"), help="output folder (default runs/table1)")
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue the run whose state --out holds (saved after every epoch); starts afresh if there is none",
    )
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True)
    return p


@user_errors("gradsim table1")
def main(argv: list[str] | None = None) -> int:
    """``gradsim table1 [--root DIR | --source digits] [--angles 0,90] [--methods a,b] [--seeds N] ...``"""
    import torch

    from .table1 import setup_table1, train_table1
    from .table1_resume import CHECKPOINT

    wall_start = time.perf_counter()
    args = build_parser().parse_args(argv)
    root = args.root or (os.environ.get("GRADSIM_MNIST_ROOT") if args.source == "mnist" else None)
    check_path(root, "--root" if args.root else "$GRADSIM_MNIST_ROOT", "dir")
    check_device(args.device)
    out = check_out_dir(args.out, "--out")
    checkpoint = os.path.join(out, CHECKPOINT)
    if os.path.exists(checkpoint) and not args.resume:
        raise UsageError(
            f"--out {out!r} holds an unfinished run ({CHECKPOINT}): add --resume to continue it, "
            "or give another --out (or delete the file) to start afresh."
        )
    if args.resume and not os.path.exists(checkpoint):
        print(f"gradsim table1: nothing to resume in {out} (no {CHECKPOINT}); starting from the first epoch.")
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = Table1Config(
        source=args.source,
        root=root,
        angles=args.angles,
        methods=[m for m in args.methods.split(",") if m.strip()],
        seeds=args.seeds,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        hidden=args.hidden,
        depth=args.depth,
        aux_weight=args.aux_weight,
        threshold=args.threshold,
        cosine_ema=args.cosine_ema,
        per_layer=args.per_layer,
        split_seed=args.split_seed,
        device=args.device,
        progress=args.progress,
    )
    try:  # the data and the methods: every check before the first step
        data, proto = setup_table1(cfg)
    except (ValueError, FileNotFoundError, KeyError) as err:
        raise UsageError(str(err).strip("'\"")) from None
    result = train_table1(cfg, data, proto, wall_start, out_dir=out, resume=args.resume)
    from .table1_report import write_outputs

    command = "gradsim table1 " + " ".join(argv if argv is not None else [])
    files = write_outputs(result, out, command=command.strip(), wall_start=wall_start)
    os.remove(checkpoint)  # the run is complete: its outputs replace the state kept to resume it
    print(files.pop("markdown_text"))
    print("\nfiles:")
    for key, path in files.items():
        print(f"  {key:<14} {path}")
    print(f"  {'epochs':<14} {os.path.join(out, 'epochs.csv')}")
    return 0
