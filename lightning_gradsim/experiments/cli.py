"""``gradsim fit | validate | test``: LightningCLI over any LightningModule and LightningDataModule.

Configs name the classes (``model.class_path``, ``data.class_path``). ``--config`` takes a path or
the name of a packaged config (``gradsim configs`` lists them; see :mod:`lightning_gradsim.configs`).

Example::

    gradsim fit --config rotated_90
    gradsim fit --config near_trimaran_catamaran --data.root /data/imagenet
    gradsim fit --config my_run.yaml --trainer.fast_dev_run true

Multi-process runs work with every launcher Lightning uses (see ``docs/scaling.md``, "Launching"):
its own ``strategy: ddp`` launcher starts ranks 1..N-1 by running this process's command line again
(``python /path/to/gradsim fit ...`` or ``python -m lightning_gradsim.cli fit ...``), so the command
line is left as it is and the arguments reach LightningCLI explicitly; ``ddp_spawn``, ``torchrun``
and SLURM's ``srun`` need nothing more.
"""

from __future__ import annotations

import sys
import warnings
from typing import Any

import lightning as L
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from ..cli_checks import user_errors

__all__ = ["GradSimCLI", "fit", "validate", "test", "run_cli", "relaunch_mismatch"]


def relaunch_mismatch(command: list[str], argv: list[str] | None = None) -> str | None:
    """Why re-running this process's command line would not repeat ``gradsim <command>``, or ``None``.

    Lightning's ``ddp`` launcher starts ranks 1..N-1 by running ``python <__main__> sys.argv[1:]``
    again. From a shell that is the same ``gradsim`` command; called from Python (a test, a script with
    other arguments), it is whatever that process was started with.

    >>> relaunch_mismatch(["fit", "--config", "a.yaml"], ["gradsim", "fit", "--config", "a.yaml"]) is None
    True
    >>> print(relaunch_mismatch(["fit", "--config", "a.yaml"], ["pytest", "-q"]))
    the other ranks re-run `pytest -q`, not `gradsim fit --config a.yaml`
    """
    argv = list(sys.argv if argv is None else argv)
    if argv[1:] == list(command):
        return None
    return f"the other ranks re-run `{' '.join(argv)}`, not `gradsim {' '.join(command)}`"


class GradSimCLI(LightningCLI):
    """LightningCLI with the gradsim defaults: subclass mode for model and data, logs under ``runs/``.

    ``args`` are parsed as given; ``sys.argv`` is neither read nor changed (the ``gradsim`` dispatcher
    has already taken the sub-command from it, and Lightning's ``ddp`` launcher re-runs it as it is).
    """

    def __init__(self, args: list[str], **kwargs: Any) -> None:
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        kwargs.setdefault("trainer_defaults", {"default_root_dir": "runs/fit"})
        self.command = list(args)
        super().__init__(
            L.LightningModule,
            L.LightningDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            args=args,
            **kwargs,
        )

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        """Parse ``args`` only (LightningCLI would warn that ``sys.argv`` holds arguments too: it holds these).

        ``--config NAME`` is first resolved to the packaged config's file
        (:func:`~lightning_gradsim.configs.resolve_config_args`; a path stays a path).
        """
        from ..configs import resolve_config_args

        self.config = parser.parse_args(resolve_config_args(args))

    def _warn_if_relaunch_differs(self) -> None:
        from lightning.pytorch.strategies.launchers import _SubprocessScriptLauncher

        launcher = self.trainer.strategy.launcher
        if not isinstance(launcher, _SubprocessScriptLauncher) or launcher.num_processes < 2:
            return
        environment = launcher.cluster_environment  # torchrun, SLURM...: every rank was started from outside
        if environment.creates_processes_externally or environment.local_rank() != 0:
            return
        problem = relaunch_mismatch(self.command)
        if problem is not None:
            warnings.warn(
                f"gradsim {' '.join(self.command[:1])}: Lightning's `ddp` launcher starts "
                f"{launcher.num_processes - 1} more process(es) by running this process's command line again, "
                f"and {problem}: they join this run only if that command makes the same call. Run it from a shell "
                "(`gradsim fit ...` or `python -m lightning_gradsim.cli fit ...`), use `--trainer.strategy "
                "ddp_spawn`, or start every rank yourself with torchrun.",
                stacklevel=2,
            )

    def before_fit(self) -> None:
        self._warn_if_relaunch_differs()

    def before_validate(self) -> None:
        self._warn_if_relaunch_differs()

    def before_test(self) -> None:
        self._warn_if_relaunch_differs()


def run_cli(subcommand: str, argv: list[str]) -> int:
    """Run ``subcommand`` (``fit``, ``validate``, ``test``, ``predict``) with LightningCLI arguments.

    ``--config NAME`` names a packaged config (see :class:`GradSimCLI`). ``sys.argv`` is left alone:
    Lightning's ``ddp`` launcher re-runs it for ranks 1..N-1, which resolve the same name to the same file.
    """
    from jsonargparse import ArgumentError

    from ..cli_checks import UsageError, one_line
    from ..configs import ConfigNotFoundError

    try:
        GradSimCLI([subcommand, *argv], parser_kwargs={"exit_on_error": False})
    except ConfigNotFoundError as err:
        raise UsageError(str(err)) from None
    except ArgumentError as err:  # a bad flag or config value: one line, not the usage text
        raise UsageError(f"{one_line(err)} (gradsim {subcommand} --help lists the options)") from None
    except SystemExit as exit_:
        return int(exit_.code or 0)
    return 0


@user_errors("gradsim fit")
def fit(argv: list[str]) -> int:
    """``gradsim fit --config FILE|NAME [--section.key value ...]``."""
    return run_cli("fit", argv)


@user_errors("gradsim validate")
def validate(argv: list[str]) -> int:
    """``gradsim validate --config FILE|NAME [--ckpt_path PATH]``."""
    return run_cli("validate", argv)


@user_errors("gradsim test")
def test(argv: list[str]) -> int:
    """``gradsim test --config FILE|NAME [--ckpt_path PATH]``."""
    return run_cli("test", argv)
