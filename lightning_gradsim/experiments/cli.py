"""``gradsim fit | validate | test``: LightningCLI over any LightningModule and LightningDataModule.

Configs name the classes (``model.class_path``, ``data.class_path``). ``--config`` takes a path or
the name of a packaged config (``gradsim configs`` lists them; see :mod:`lightning_gradsim.configs`).

Example::

    gradsim fit --config rotated_90
    gradsim fit --config near_trimaran_catamaran --data.root /data/imagenet
    gradsim fit --config my_run.yaml --trainer.fast_dev_run true
"""

from __future__ import annotations

from typing import Any

import lightning as L
from lightning.pytorch.cli import LightningCLI

__all__ = ["GradSimCLI", "fit", "validate", "test", "run_cli"]


class GradSimCLI(LightningCLI):
    """LightningCLI with the gradsim defaults: subclass mode for model and data, logs under ``runs/``."""

    def __init__(self, args: list[str], **kwargs: Any) -> None:
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        kwargs.setdefault("trainer_defaults", {"default_root_dir": "runs/fit"})
        super().__init__(
            L.LightningModule,
            L.LightningDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            args=args,
            **kwargs,
        )


def run_cli(subcommand: str, argv: list[str]) -> int:
    """Run ``subcommand`` (``fit``, ``validate``, ``test``, ``predict``) with LightningCLI arguments.

    ``--config NAME`` is resolved to the packaged config's file first
    (:func:`~lightning_gradsim.configs.resolve_config_args`).
    """
    import sys

    from ..configs import ConfigNotFoundError, resolve_config_args

    try:
        argv = resolve_config_args(argv)
    except ConfigNotFoundError as err:
        print(f"gradsim {subcommand}: {err}", file=sys.stderr)
        return 2
    saved = sys.argv
    sys.argv = saved[:1]  # LightningCLI reads only `args`; don't let it see the outer command line
    try:
        GradSimCLI([subcommand, *argv])
    except SystemExit as exit_:
        return int(exit_.code or 0)
    finally:
        sys.argv = saved
    return 0


def fit(argv: list[str]) -> int:
    """``gradsim fit --config FILE|NAME [--section.key value ...]``."""
    return run_cli("fit", argv)


def validate(argv: list[str]) -> int:
    """``gradsim validate --config FILE|NAME [--ckpt_path PATH]``."""
    return run_cli("validate", argv)


def test(argv: list[str]) -> int:
    """``gradsim test --config FILE|NAME [--ckpt_path PATH]``."""
    return run_cli("test", argv)
