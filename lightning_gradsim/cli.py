"""``gradsim``: one command line for training, comparing and the paper's experiments.

Sub-commands are looked up in :data:`COMMANDS` and imported lazily, so ``gradsim --help`` stays
fast and each experiment's dependencies load only when it runs.
"""

from __future__ import annotations

import importlib
import sys

#: sub-command -> ("module:function", one-line help). Each function takes argv (list[str]).
COMMANDS: dict[str, tuple[str, str]] = {
    "fit": ("lightning_gradsim.experiments.cli:fit", "train one run from a YAML config (LightningCLI)"),
    "validate": ("lightning_gradsim.experiments.cli:validate", "validate a config/checkpoint (LightningCLI)"),
    "test": ("lightning_gradsim.experiments.cli:test", "test a config/checkpoint (LightningCLI)"),
    "compare": ("lightning_gradsim.experiments.compare:main", "methods x seeds on one setup: error table, plots"),
    "distances": ("lightning_gradsim.experiments.distances:main", "LCA level vs Frechet distance of class pairs"),
    "toy": ("lightning_gradsim.experiments.toys:main", "2-D toy problems: trajectories per rule as a PNG"),
    "gridworld": ("lightning_gradsim.rl.cli:main", "RL distillation from a teacher in gridworlds: curves + figures"),
    "atari": ("lightning_gradsim.rl.atari.cli:main", "Atari/MinAtar distillation from a sub-optimal teacher, V-trace (4.4)"),
    "relatedness": ("lightning_gradsim.experiments.relatedness:main", "blog's synthetic task-relatedness sweep: table + plot"),
    "figures": ("lightning_gradsim.experiments.figures:main", "paper's Appendix B, Proposition 3, cosine-vs-dimension PNGs"),
}


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``gradsim`` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in {"-h", "--help"}:
        print("usage: gradsim <command> [options]\n\ncommands:")
        for name, (_, help_) in COMMANDS.items():
            print(f"  {name:<12} {help_}")
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"gradsim: unknown command {name!r}; choose from {', '.join(COMMANDS)}.", file=sys.stderr)
        return 2
    module_name, func_name = COMMANDS[name][0].split(":")
    func = getattr(importlib.import_module(module_name), func_name)
    result = func(rest)
    return int(result or 0)


if __name__ == "__main__":
    raise SystemExit(main())
