"""Built-in setups of :func:`lightning_gradsim.experiments.compare.compare` (named in
:data:`lightning_gradsim.experiments.registry.SETUPS`).

* ``rotated_digits`` -- paper section 4.2: digits main task, rotated digits auxiliary task, the
  3x100 ReLU MLP with one 10-way head per task, RMSprop. Options: those of
  :class:`~lightning_gradsim.data.RotatedDigitsDataModule` (``angle``, ``source``, ``root``,
  ``batch_size``, ``max_images``, ...) plus ``lr`` (1e-3), ``optimizer`` (``rmsprop``),
  ``hidden`` (100), ``depth`` (3).
* ``class_pair`` -- the paper's ImageNet class pairs: options of
  :class:`~lightning_gradsim.data.ClassPairDataModule` (``root``, ``main_class``, ``aux_class``,
  ``source``...) plus ``backbone`` (``resnetv2_18``), ``lr``, ``optimizer`` (``adam``).
"""

from __future__ import annotations

from typing import Any

from .modules import MultiTaskClassifier

_MODEL_KEYS = ("lr", "optimizer", "hidden", "depth", "weight_decay", "momentum", "backbone", "pretrained")


def _split(options: dict[str, Any], defaults: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    model = {**defaults, **{k: options.pop(k) for k in list(options) if k in _MODEL_KEYS}}
    return model, options


def rotated_digits(method: str, seed: int, gate: dict[str, Any], **options: Any):
    """Digits main task + rotated digits auxiliary task (paper section 4.2)."""
    from ..data.digits import RotatedDigitsDataModule

    model_kw, data_kw = _split(dict(options), {"lr": 1e-3, "optimizer": "rmsprop", "hidden": 100, "depth": 3})
    model_kw.pop("backbone", None)
    datamodule = RotatedDigitsDataModule(seed=seed, **data_kw)
    module = MultiTaskClassifier(
        tasks=datamodule.tasks, backbone="mlp", input_dim=datamodule.input_dim, method=method, gate=gate, **model_kw
    )
    return module, datamodule


def class_pair(method: str, seed: int, gate: dict[str, Any], **options: Any):
    """ImageNet class pair (paper section 4.1)."""
    from ..data.class_pair import ClassPairDataModule

    model_kw, data_kw = _split(dict(options), {"lr": 1e-3, "optimizer": "adam", "backbone": "resnetv2_18"})
    model_kw.pop("hidden", None), model_kw.pop("depth", None)
    datamodule = ClassPairDataModule(seed=seed, **data_kw)
    module = MultiTaskClassifier(tasks=datamodule.tasks, input_dim=None, method=method, gate=gate, **model_kw)
    return module, datamodule
