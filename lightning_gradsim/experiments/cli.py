"""``gradsim fit | validate | test``: LightningCLI over any LightningModule and LightningDataModule.

Configs name the classes (``model.class_path``, ``data.class_path``); see ``examples/``.

Example::

    gradsim fit --config examples/digits/rotated_90.yaml
    gradsim fit --config examples/imagenet_pairs/near_trimaran_catamaran.yaml --data.root /data/imagenet
    gradsim fit --config examples/digits/rotated_90.yaml --trainer.fast_dev_run true
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
    """Run ``subcommand`` (``fit``, ``validate``, ``test``, ``predict``) with LightningCLI arguments."""
    import sys

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
    """``gradsim fit --config FILE [--section.key value ...]``."""
    return run_cli("fit", argv)


def validate(argv: list[str]) -> int:
    """``gradsim validate --config FILE [--ckpt_path PATH]``."""
    return run_cli("validate", argv)


def test(argv: list[str]) -> int:
    """``gradsim test --config FILE [--ckpt_path PATH]``."""
    return run_cli("test", argv)
