"""``gradsim atari``: the paper's Atari distillation experiment (4.4); ``gradsim atari teacher``: its teacher.

Example::

    gradsim atari --env breakout --frames 500000 --seeds 3 --out runs/atari           # Figure 5, MinAtar
    gradsim atari --env breakout,asterix --frames 500000 --seeds 3 --out runs/atari2  # Figure 6, MinAtar
    gradsim atari teacher --frames 60000 --seed 1000 --out teacher.pt                 # re-create the teacher
    gradsim atari --backend ale --env breakout --frames 10000000 --device cuda --teacher ale_teacher.pt --out runs/ale
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from pathlib import Path

import torch

from ...cli_checks import (
    check_device,
    check_out_dir,
    check_path,
    check_requirements,
    command_parser,
    float_in,
    int_at_least,
    user_errors,
)

__all__ = ["main", "build_parser", "build_teacher_parser", "teacher_main"]


def _add_common(p: argparse.ArgumentParser, frames: int, envs: int) -> None:
    from .learner import LearnerConfig

    d = LearnerConfig()
    p.add_argument(
        "--backend",
        choices=["minatar", "ale"],
        default="minatar",
        help="minatar: 10x10 MinAtar games on CPU (default); ale: full Atari, 84x84x4 (GPU recipe)",
    )
    p.add_argument(
        "--frames", type=int_at_least(1), default=frames, help="training frames per run (default %(default)s)"
    )
    p.add_argument(
        "--envs",
        type=int_at_least(1),
        default=envs,
        help="games per run, the batch of one unroll (default %(default)s)",
    )
    p.add_argument(
        "--unroll", type=int_at_least(1), default=20, help="unroll length T, the V-trace horizon (default %(default)s)"
    )
    p.add_argument(
        "--lr", type=float_in(0, low_open=True), default=d.lr, help="RMSprop learning rate (default %(default)s)"
    )
    p.add_argument(
        "--entropy-cost", type=float_in(0), default=d.entropy_cost, help="entropy bonus (default %(default)s)"
    )
    p.add_argument("--discount", type=float_in(0, 1), default=d.discount, help="discount (default %(default)s)")
    p.add_argument(
        "--max-grad-norm",
        type=float_in(0),
        default=d.max_grad_norm,
        help="per-run gradient clipping norm, 0: none (default %(default)s)",
    )
    p.add_argument("--device", default="cpu", help="torch device, e.g. cuda (default %(default)s)")
    p.add_argument(
        "--threads", type=int_at_least(0), default=1, help="torch CPU threads (0: torch's default; default %(default)s)"
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def build_parser() -> argparse.ArgumentParser:
    from .learner import METHODS, LearnerConfig

    d = LearnerConfig()
    p = command_parser(
        prog="gradsim atari",
        description="Distillation from a sub-optimal Breakout teacher with a V-trace actor-critic (Du et al., "
        "sec. 4.4). Writes curves.csv, curves.png, summary.csv, config.json. `gradsim atari teacher -h`: the teacher.",
    )
    p.add_argument(
        "--env",
        default="breakout",
        help="game(s), comma-separated: breakout (Figure 5) or breakout,asterix (Figure 6; ALE: breakout,ms_pacman)",
    )
    p.add_argument("--seeds", type=int_at_least(1), default=3, help="seeds per method (default %(default)s)")
    p.add_argument("--seed-offset", type=int_at_least(0), default=0, help="first seed (default %(default)s)")
    p.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset of " + ",".join(METHODS))
    p.add_argument("--out", default="runs/atari", help="output folder (default %(default)s)")
    p.add_argument("--teacher", default=None, help="teacher checkpoint (default: the packaged MinAtar Breakout one)")
    p.add_argument(
        "--aux-weight", type=float_in(0), default=d.aux_weight, help="lambda on the KL update (default %(default)s)"
    )
    p.add_argument(
        "--rule", default=d.rule, help="gate rule of rl_kl_cos (default %(default)s: KL scaled by the cosine)"
    )
    p.add_argument(
        "--threshold",
        type=float_in(-1, 1),
        default=None,
        help="gate threshold on the cosine (default: 0.02 for one game, 0.01 for several, as in D.3)",
    )
    p.add_argument(
        "--cosine-ema",
        type=float_in(0, 1, high_open=True),
        default=d.cosine_ema,
        help="EMA factor of the cosine (default %(default)s)",
    )
    p.add_argument(
        "--log-every", type=int_at_least(0), default=0, help="frames between curve points (default frames/40)"
    )
    p.add_argument(
        "--cosine-of",
        choices=["policy_gradient", "actor_critic"],
        default=d.cosine_of,
        help="what the KL gradient's cosine is measured against: the policy-gradient term alone (the text, "
        "default) or the whole RL loss (policy gradient + baseline + entropy); the update adds all terms either way",
    )
    p.add_argument(
        "--random-episodes",
        type=int_at_least(0),
        default=32,
        help="episodes of the random policy measured per game for the plots, 0: none (default %(default)s)",
    )
    _add_common(p, frames=300_000, envs=16)
    return p


def build_teacher_parser() -> argparse.ArgumentParser:
    p = command_parser(
        prog="gradsim atari teacher",
        description="Train the `rl` agent on one game, stop early, evaluate it and save it as a teacher checkpoint.",
    )
    p.add_argument("--env", default="breakout", help="the teacher's game (default %(default)s)")
    p.add_argument("--seed", type=int, default=1000, help="seed (default %(default)s, distinct from the runs' seeds)")
    p.add_argument(
        "--eval-episodes",
        type=int_at_least(1),
        default=100,
        help="episodes of the final evaluation (default %(default)s)",
    )
    p.add_argument("--out", required=True, help="checkpoint path, e.g. teacher.pt")
    _add_common(p, frames=50_000, envs=16)
    return p


def _check_common(args: argparse.Namespace) -> None:
    """What the command checks before it starts: the device, and the extra of the ALE backend."""
    check_device(args.device)
    if args.backend == "ale":
        check_requirements("atari", ["ale_py", "gymnasium"])


def _learner_config(args: argparse.Namespace, **extra):
    from .learner import LearnerConfig

    return LearnerConfig(
        lr=args.lr, entropy_cost=args.entropy_cost, discount=args.discount, max_grad_norm=args.max_grad_norm, **extra
    )


def _progress(total: int, desc: str, off: bool):
    if off:
        return None, None
    from tqdm.auto import tqdm

    bar = tqdm(total=total, desc=desc, unit="frame", unit_scale=True)
    return bar, bar.update


def teacher_main(argv: list[str]) -> int:
    """``gradsim atari teacher``: train, evaluate and save the sub-optimal teacher."""
    from .experiment import AtariConfig, run_experiment
    from .teacher import evaluate_policy, save_teacher

    args = build_teacher_parser().parse_args(argv)
    _check_common(args)
    check_out_dir(os.path.dirname(os.path.abspath(args.out)), "--out (its folder)")
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    try:
        cfg = AtariConfig(
            games=(args.env,),
            backend=args.backend,
            frames=args.frames,
            seeds=1,
            seed_offset=args.seed,
            methods=("rl",),
            envs=args.envs,
            unroll=args.unroll,
            learner=_learner_config(args),
            device=args.device,
        )
    except ValueError as err:
        print(f"gradsim atari teacher: {err}", file=sys.stderr)
        return 2
    bar, update = _progress(cfg.frames, f"teacher ({args.env})", args.no_progress)
    result = run_experiment(cfg, progress=update)
    if bar is not None:
        bar.close()
    last = [r[4] for r in result.curves if r[2] == max(c[2] for c in result.curves)]
    assert result.net is not None
    eval_return, episodes = evaluate_policy(result.net, args.backend, args.env, args.eval_episodes, seed=args.seed + 1)
    command = "gradsim atari teacher " + " ".join(shlex.quote(a) for a in argv)
    save_teacher(
        result.net,
        0,
        args.out,
        backend=args.backend,
        game=args.env,
        frames=args.frames,
        frames_trained=result.frames_total,
        train_return=float(last[0]),
        eval_return=eval_return,
        eval_episodes=episodes,
        command=command,
        seconds=round(result.seconds, 1),
    )
    print(
        f"teacher: {args.frames} frames in {result.seconds:.0f} s ({result.fps:.0f} frames/s); training return "
        f"{last[0]:.2f}; evaluation return {eval_return:.2f} over {episodes} episodes; "
        f"random {result.random_return.get(args.env, float('nan')):.2f}; saved {args.out}"
    )
    return 0


@user_errors("gradsim atari")
def main(argv: list[str] | None = None) -> int:
    """``gradsim atari``: run the methods, write curves and figures; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "teacher":
        return teacher_main(argv[1:])
    from .experiment import AtariConfig, config_dict, run_experiment, write_curves
    from .plots import plot_curves

    args = build_parser().parse_args(argv)
    _check_common(args)
    check_path(args.teacher, "--teacher")
    check_out_dir(args.out, "--out")
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    games = tuple(g.strip() for g in args.env.split(",") if g.strip())
    try:
        lcfg = _learner_config(
            args,
            aux_weight=args.aux_weight,
            rule=args.rule,
            threshold=args.threshold,
            cosine_ema=args.cosine_ema,
            cosine_of=args.cosine_of,
        )
        cfg = AtariConfig(
            games=games,
            backend=args.backend,
            frames=args.frames,
            seeds=args.seeds,
            seed_offset=args.seed_offset,
            methods=tuple(m.strip() for m in args.methods.split(",")),
            envs=args.envs,
            unroll=args.unroll,
            log_every=args.log_every,
            teacher=args.teacher,
            random_episodes=args.random_episodes,
            learner=lcfg,
            device=args.device,
        )
        from ...rules import get_rule

        get_rule(args.rule)
    except ValueError as err:
        print(f"gradsim atari: {err}", file=sys.stderr)
        return 2
    start = time.perf_counter()
    runs = len(cfg.runs)
    bar, update = _progress(cfg.frames, f"atari ({runs} runs batched)", args.no_progress)
    try:
        result = run_experiment(cfg, progress=update)
    except (ValueError, FileNotFoundError, ImportError) as err:
        print(f"gradsim atari: {err}", file=sys.stderr)
        return 2
    finally:
        if bar is not None:
            bar.close()
    out = Path(args.out)
    write_curves(result, out / "curves.csv")
    threshold = lcfg.threshold if lcfg.threshold is not None else (0.02 if len(games) == 1 else 0.01)
    teacher_ret = result.teacher_info.get("eval_return")
    plot_curves(
        result.curves,
        games,
        cfg.methods,
        out / "curves.png",
        teacher_return=teacher_ret,
        random_return=result.random_return,
        threshold=threshold,
        title=f"{'+'.join(games)} ({cfg.backend}), {cfg.seeds} seeds, {cfg.frames} frames per run",
    )
    summary = result.summary()
    with open(out / "summary.csv", "w") as f:
        f.write("method,game,early_return,final_return,final_weight,frames_to_teacher\n")
        for (meth, game), s in summary.items():
            f.write(
                f"{meth},{game},{s['early_return']:.4f},{s['final_return']:.4f},{s['final_weight']:.4f},"
                f"{s['frames_to_teacher']:.0f}\n"
            )
    elapsed = time.perf_counter() - start
    with open(out / "config.json", "w") as f:
        json.dump(
            {
                **config_dict(cfg),
                "threshold": threshold,
                "seconds": round(elapsed, 1),
                "fps": round(result.fps),
                "teacher_info": result.teacher_info,
                "random_return": result.random_return,
            },
            f,
            indent=2,
            default=str,
        )
    print(
        f"{runs} runs x {cfg.frames} frames in {result.seconds:.0f} s: {result.fps:.0f} frames/s in all "
        f"({torch.get_num_threads()} torch thread(s))"
    )
    if teacher_ret is not None:
        print(
            f"teacher return {teacher_ret:.2f}; random: "
            + ", ".join(f"{g} {v:.2f}" for g, v in result.random_return.items())
        )
    print(
        f"{'method':<10} {'game':<10} {'first quarter':>13} {'last 20%':>9} {'KL weight':>9} {'frames to teacher':>18}"
    )
    for (meth, game), s in summary.items():
        print(
            f"{meth:<10} {game:<10} {s['early_return']:>13.2f} {s['final_return']:>9.2f} {s['final_weight']:>9.3f} "
            f"{s['frames_to_teacher']:>18.0f}"
        )
    print(f"wrote {out / 'curves.csv'}, {out / 'curves.png'}, {out / 'summary.csv'} in {elapsed:.0f} s")
    return 0
