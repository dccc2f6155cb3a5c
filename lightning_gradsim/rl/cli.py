"""``gradsim gridworld``: the paper's cross-environment distillation experiment in one command.

Example::

    gradsim gridworld --envs 200 --steps 10000 --seed 0 --out runs/gridworld
    gradsim gridworld --transfer same --out runs/gridworld-same   # Figure 4's bottom row
    gradsim gridworld --transfer both --out runs/gridworld-both   # both rows in one run
    gradsim gridworld --envs 1000 --out runs/gridworld-1000   # the paper's size
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from ..cli_checks import check_out_dir, command_parser, float_in, int_at_least, user_errors

__all__ = ["main", "build_parser"]


def build_parser() -> argparse.ArgumentParser:
    from .experiment import METHOD_ALIASES, METHODS, REMOVED_CODES, ExperimentConfig

    d = ExperimentConfig()
    p = command_parser(
        prog="gradsim gridworld",
        description="Distillation from a Q-learning teacher in partially observable gridworlds (Du et al., sec. 4.3, "
        "Figure 4). Writes curves.csv, gate.csv, summary.csv, claims.md, curves.png, gate.png and layout.png.",
    )
    p.add_argument(
        "--envs",
        type=int_at_least(1),
        default=d.envs,
        help="number of gridworlds (default %(default)s; the paper: 1000)",
    )
    p.add_argument(
        "--steps", type=int_at_least(1), default=d.steps, help="training steps per student (default %(default)s)"
    )
    p.add_argument(
        "--seed", type=int, default=d.seed, help="seed of layouts, teachers and episodes (default %(default)s)"
    )
    p.add_argument("--out", default="runs/gridworld", help="output folder (default %(default)s)")
    p.add_argument(
        "--transfer",
        choices=["cross", "same", "both"],
        default="cross",
        help="cross: the student's task has the teacher's rewards removed (Figure 4, top row); same: the "
        "student learns the teacher's own task (bottom row); both: the two in one run (default %(default)s)",
    )
    p.add_argument(
        "--remove",
        choices=list(REMOVED_CODES),
        default=d.remove,
        help="positive rewards the cross task removes: goal (the teacher's kind; gems still reward) or "
        "all (no positive reward left) (default %(default)s)",
    )
    p.add_argument(
        "--rewards",
        choices=["paper3", "legacy"],
        default="paper3",
        help="reward values (GOAL, GEM, PIT, MUD): paper3 = 10, 5, -10, -1 (a main-task return of about 3, the "
        "paper's D.2 number, is reachable; the values are not given in the paper) or legacy = 1, 0.5, -1, -0.1 "
        "(default %(default)s)",
    )
    p.add_argument(
        "--temperatures",
        type=float_in(0),
        nargs="+",
        default=list(d.temperatures),
        help="teacher temperatures, one column each (default %(default)s)",
    )
    p.add_argument(
        "--methods",
        nargs="+",
        default=list(METHODS),
        choices=list(METHODS) + list(METHOD_ALIASES),
        metavar="METHOD",
        help=f"methods to run: {', '.join(METHODS)} (aliases: "
        + ", ".join(f"{a}={m}" for a, m in METHOD_ALIASES.items())
        + ")",
    )
    p.add_argument(
        "--eval-every",
        type=int_at_least(1),
        default=d.eval_every,
        help="steps between evaluations (default %(default)s)",
    )
    p.add_argument(
        "--lr", type=float_in(0, low_open=True), default=d.lr, help="students' learning rate (default %(default)s)"
    )
    p.add_argument("--aux-weight", type=float_in(0), default=d.aux_weight, help="lambda of the distillation update")
    p.add_argument(
        "--gamma",
        type=float_in(0, 1),
        default=d.gamma,
        help="discount of the students and the teacher (default %(default)s)",
    )
    p.add_argument(
        "--teacher-steps", type=int_at_least(1), default=d.teacher_steps, help="Q-learning steps per gridworld"
    )
    p.add_argument(
        "--threads",
        type=int_at_least(0),
        default=1,
        help="torch CPU threads (default %(default)s: the per-step tensors are small; 0 leaves torch's default)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


@user_errors("gradsim gridworld")
def main(argv: list[str] | None = None) -> int:
    """Run the experiment and write its files; returns the exit code."""
    from .claims import assess_claims, claims_markdown
    from .experiment import ExperimentConfig, run_experiment
    from .report import write_outputs

    args = build_parser().parse_args(argv)
    check_out_dir(args.out, "--out")
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    try:
        cfg = ExperimentConfig(
            envs=args.envs,
            steps=args.steps,
            seed=args.seed,
            temperatures=tuple(args.temperatures),
            methods=tuple(args.methods),
            eval_every=args.eval_every,
            lr=args.lr,
            aux_weight=args.aux_weight,
            teacher_steps=args.teacher_steps,
            gamma=args.gamma,
            remove=args.remove,
            rewards=args.rewards,
            transfers=("cross", "same") if args.transfer == "both" else (args.transfer,),
        )
    except ValueError as err:
        print(f"gradsim gridworld: {err}", file=sys.stderr)
        return 2
    start = time.perf_counter()
    bar = None
    if not args.no_progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=cfg.steps, desc=f"gridworld ({cfg.envs} envs)", unit="step")
    result = run_experiment(cfg, progress=bar.update if bar is not None else None)
    if bar is not None:
        bar.close()
    paths = write_outputs(result, args.out)
    elapsed = time.perf_counter() - start
    final = result.final_returns()
    reach = result.steps_to_reach("reward")
    for tr in cfg.transfers:
        print(f"[{tr}] random policy: {float(result.random_return[tr].mean()):.3f}")
        for t in cfg.temperatures:
            line = ", ".join(f"{m} {final[(tr, m, t)]:.3f}" for m in cfg.methods)
            print(f"[{tr}] T={t:g}: teacher {float(result.teacher_return[(tr, t)].mean()):.3f} | final: {line}")
            if "reward" in cfg.methods:
                print(
                    f"[{tr}]        steps to reach reward's final return: "
                    + ", ".join(f"{m} {reach[(tr, m, t)]}" for m in cfg.methods)
                )
    print(claims_markdown(assess_claims(result)))
    print(f"wrote {', '.join(str(p) for p in paths.values())} in {elapsed:.0f} s")
    with open(paths["curves.csv"].parent / "config.json", "w") as f:
        json.dump({**cfg.as_dict(), "seconds": round(elapsed, 1)}, f, indent=2)
    return 0
