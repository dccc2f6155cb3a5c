"""How much does ``gradsim table1`` cost per run-step, in plain single-task steps?

Runs the whole command in this process (Python start-up, imports, data, training, test, outputs
included), then measures the unit in the same process: one step of the *stacked single-task*
model of the same shape (same runs, batch and input size; ``main_only`` without an auxiliary task:
batch gather, forward, backward, RMSprop). Prints

    ratio = command time / (training steps x unit step time)

for wall-clock time and for CPU time (the process's user+system time, steadier on a loaded
machine). A gated step is two tasks' work, so the floor is about 1.7-2; the target is 2.5.

Usage::

    OMP_NUM_THREADS=2 python benchmarks/table1_speed.py                       # the README's main job (digits)
    OMP_NUM_THREADS=2 python benchmarks/table1_speed.py --root ../shared/data/mnist --epochs 3
    python benchmarks/table1_speed.py --epochs 5 --seeds 4 -- --methods main_only,unweighted
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import os
import statistics
import sys
import tempfile
import time

CPU0 = time.process_time()


def _process_age() -> float:
    with open("/proc/self/stat") as f:
        start_ticks = float(f.read().rsplit(")", 1)[1].split()[19])
    with open("/proc/uptime") as f:
        return float(f.read().split()[0]) - start_ticks / os.sysconf("SC_CLK_TCK")


def unit_step_times(
    data, runs: int, batch: int, hidden: int, depth: int, repeats: int = 5, steps: int = 10
) -> tuple[float, float]:
    """Median (wall, cpu) seconds of one stacked single-task step of ``runs`` runs."""
    import torch

    from lightning_gradsim.data.table1 import rotated_views, task_batch
    from lightning_gradsim.experiments.stacked_mlp import StackedMLP
    from lightning_gradsim.experiments.stacked_training import RunOrder, StackedTrainer

    seeds = [r % 10 for r in range(runs)]
    model = StackedMLP(seeds, data.input_dim, hidden, depth, num_tasks=1)
    trainer = StackedTrainer(model, lr=1e-3)
    views = rotated_views(data.train_x, [0.0])
    task_view = torch.zeros(runs, 1, dtype=torch.long)
    idx = RunOrder(seeds, len(data.train_y)).epoch()
    per = math.ceil(len(data.train_y) / batch)

    def step(k: int) -> None:
        k %= per
        trainer.step(*task_batch(views, data.train_y, task_view, idx[:, k * batch : (k + 1) * batch]))

    for k in range(3):
        step(k)
    walls, cpus = [], []
    for _ in range(repeats):
        w, c = time.perf_counter(), time.process_time()
        for k in range(steps):
            step(k)
        walls.append((time.perf_counter() - w) / steps)
        cpus.append((time.process_time() - c) / steps)
    return statistics.median(walls), statistics.median(cpus)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--source", default=None, help="digits (default without --root) or mnist")
    parser.add_argument("--root", default=None)
    parser.add_argument("--epochs", type=int, default=50)
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads (default: $OMP_NUM_THREADS or torch's)"
    )
    parser.add_argument("--out", default=None, help="keep the command's outputs here (default: a temporary folder)")
    parser.add_argument("rest", nargs="*", help="more gradsim table1 flags, after --")
    args = parser.parse_args()
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from lightning_gradsim.data.table1 import load_table1_data
    from lightning_gradsim.experiments import table1

    source = args.source or ("mnist" if args.root else "digits")
    argv = ["--source", source, "--epochs", str(args.epochs), "--seeds", str(args.seeds), "--no-progress", *args.rest]
    if args.root:
        argv += ["--root", args.root]
    with tempfile.TemporaryDirectory() as tmp:
        out = args.out or tmp
        with contextlib.redirect_stdout(io.StringIO()):  # the command as users run it
            rc = table1.main(argv + ["--out", out])
        if rc != 0:
            print(f"gradsim table1 failed with exit code {rc}", file=sys.stderr)
            return rc
        with open(os.path.join(out, "result.json")) as f:
            result = json.load(f)  # the run's shape, as the command wrote it
    wall_cmd, cpu_cmd = _process_age(), time.process_time() - CPU0
    cfg, runs, steps = result["config"], len(result["rows"]), result["steps"]
    data = load_table1_data(cfg["source"], cfg["root"], cfg["split_seed"])
    unit_wall, unit_cpu = unit_step_times(data, runs, cfg["batch_size"], cfg["hidden"], cfg["depth"])
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"gradsim table1 {' '.join(argv)}" + (f" --out {args.out}" if args.out else ""))
    print(
        f"  runs stacked: {runs}  steps: {steps}  threads: {torch.get_num_threads()}  load average (1 min): {load:.1f}"
    )
    print(f"  command: wall {wall_cmd:.1f} s (training {result['seconds']:.1f} s), CPU {cpu_cmd:.1f} s")
    print(f"  unit (stacked single-task step, {runs} runs): wall {1e3 * unit_wall:.1f} ms, CPU {1e3 * unit_cpu:.1f} ms")
    print(
        f"  ratio (command / (steps x unit)): wall {wall_cmd / (steps * unit_wall):.2f}, "
        f"CPU {cpu_cmd / (steps * unit_cpu):.2f}"
        "   (target <= 2.5; a gated step is two tasks' work, floor ~1.7-2)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
