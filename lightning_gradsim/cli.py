"""``gradsim``: one command line for training, comparing and the paper's experiments.

Sub-commands are looked up in :data:`COMMANDS` and imported lazily, so ``gradsim --help`` imports
neither torch nor Lightning and each experiment's dependencies load only when it runs. Before a
command starts, the packages it needs are looked up (not imported) and a missing one is named with
the extra that installs it; a user error is one line on stderr and exit status 2
(:mod:`lightning_gradsim.cli_checks`).

>>> main(["--help"])  # doctest: +ELLIPSIS
usage: gradsim <command> [options]    (gradsim --version: the version)
<BLANKLINE>
commands:
  fit          train one run from a YAML config (LightningCLI)
...
0
>>> main(["--version"])  # doctest: +ELLIPSIS
lightning-gradsim ...
0
"""

from __future__ import annotations

import sys

from ._lazy import load_entry

#: sub-command -> ("module:function", one-line help). Each function takes argv (list[str]).
COMMANDS: dict[str, tuple[str, str]] = {
    "fit": ("lightning_gradsim.experiments.cli:fit", "train one run from a YAML config (LightningCLI)"),
    "validate": ("lightning_gradsim.experiments.cli:validate", "validate a config/checkpoint (LightningCLI)"),
    "test": ("lightning_gradsim.experiments.cli:test", "test a config/checkpoint (LightningCLI)"),
    "compare": ("lightning_gradsim.experiments.compare_cli:main", "methods x seeds on one setup: error table, plots"),
    "distances": ("lightning_gradsim.experiments.distances:main", "LCA level vs Frechet distance of class pairs"),
    "pairs": (
        "lightning_gradsim.experiments.pairs:main",
        "paper Fig. 3: single/multi-task/gate on a near and a far class pair",
    ),
    "toy": ("lightning_gradsim.experiments.toys:main", "2-D toys: blog's unit circle (default), paper's Figure 2"),
    "gridworld": ("lightning_gradsim.rl.cli:main", "RL distillation from a teacher in gridworlds: curves + figures"),
    "table1": (
        "lightning_gradsim.experiments.table1_cli:main",
        "paper Table 1 (rotated MNIST): all runs stacked, table + paired tests + plots",
    ),
    "atari": (
        "lightning_gradsim.rl.atari.cli:main",
        "Atari/MinAtar distillation from a sub-optimal teacher, V-trace (4.4)",
    ),
    "relatedness": (
        "lightning_gradsim.experiments.relatedness_cli:main",
        "blog's synthetic task-relatedness sweep: table + plot",
    ),
    "figures": (
        "lightning_gradsim.experiments.figures:main",
        "paper's Appendix B, Proposition 3, cosine-vs-dimension PNGs",
    ),
    "report": (
        "lightning_gradsim.experiments.report:main",
        "transfer report of a run's GradSimMonitor logs: cosine with its interval, a reading, a PNG",
    ),
    "configs": ("lightning_gradsim.configs:main", "list the packaged configs (--config NAME), or print one"),
}


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``gradsim`` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in {"-V", "--version"}:
        from . import __version__

        print(f"lightning-gradsim {__version__}")
        return 0
    if not argv or argv[0] in {"-h", "--help"}:
        print("usage: gradsim <command> [options]    (gradsim --version: the version)\n\ncommands:")
        for name, (_, help_) in COMMANDS.items():
            print(f"  {name:<12} {help_}")
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"gradsim: unknown command {name!r}; choose from {', '.join(COMMANDS)}.", file=sys.stderr)
        return 2
    entry = COMMANDS[name][0]
    from .cli_checks import UsageError, check_requirements

    try:
        if not {"-h", "--help"} & set(rest):
            check_requirements(name)  # the extras it needs, before anything runs
        try:
            command = load_entry(entry)
        except ModuleNotFoundError as err:
            if (err.name or "").startswith("lightning_gradsim"):
                raise
            check_requirements(name, [(err.name or "").partition(".")[0]])
            raise
        return int(command(rest) or 0)
    except UsageError as err:  # a user error: one line, status 2 (see lightning_gradsim.cli_checks)
        print(f"gradsim {name}: {err}", file=sys.stderr, flush=True)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
