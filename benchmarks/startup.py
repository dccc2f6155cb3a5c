"""Start-up time: ``import lightning_gradsim``, ``gradsim --help`` and ``gradsim compare --help``.

Each command runs in a fresh interpreter, ``--repeats`` times, interleaved with the same command on
a ``--baseline`` checkout (e.g. ``git worktree add /tmp/base <commit>``) when one is given, so both
see the same machine load; prints the median wall time of each and the ratio to the baseline.

    python benchmarks/startup.py --repeats 5 --baseline /tmp/base
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
COMMANDS = {
    "import lightning_gradsim": ["-c", "import lightning_gradsim"],
    "import + GradientGate": ["-c", "from lightning_gradsim import GradientGate"],
    "import + GradSimMixin": ["-c", "from lightning_gradsim import GradSimMixin"],
    "gradsim --help": ["-m", "lightning_gradsim.cli", "--help"],
    "gradsim compare --help": ["-m", "lightning_gradsim.cli", "compare", "--help"],
}


def _time(tree: Path, args: list[str]) -> float:
    env = {**os.environ, "PYTHONPATH": str(tree), "OMP_NUM_THREADS": "1"}
    start = time.perf_counter()
    subprocess.run([sys.executable, *args], env=env, cwd=tree, check=True, capture_output=True)
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--baseline", type=Path, help="another checkout of the repository to compare with")
    args = parser.parse_args(argv)
    trees = {"this": REPO, **({"baseline": args.baseline.resolve()} if args.baseline else {})}
    print(
        f"{'command':<26}" + "".join(f"{name + ' (s)':>16}" for name in trees) + ("   ratio" if args.baseline else "")
    )
    for label, cmd in COMMANDS.items():
        times: dict[str, list[float]] = {name: [] for name in trees}
        for _ in range(args.repeats):
            for name, tree in trees.items():
                times[name].append(_time(tree, cmd))
        med = {name: statistics.median(t) for name, t in times.items()}
        ratio = f"   {med['this'] / med['baseline']:.2f}" if args.baseline else ""
        print(f"{label:<26}" + "".join(f"{m:>16.2f}" for m in med.values()) + ratio, flush=True)
    print(f"(medians of {args.repeats} fresh interpreters, interleaved; load average {os.getloadavg()[0]:.1f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
