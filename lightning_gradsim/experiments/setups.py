"""Built-in setups of :func:`lightning_gradsim.experiments.compare.compare`.

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

from .compare import register_setup
from .modules import MultiTaskClassifier

_MODEL_KEYS = ("lr", "optimizer", "hidden", "depth", "weight_decay", "momentum", "backbone", "pretrained")


def _split(options: dict[str, Any], defaults: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    model = {**defaults, **{k: options.pop(k) for k in list(options) if k in _MODEL_KEYS}}
    return model, options


@register_setup("rotated_digits", "digits main task + rotated digits auxiliary task, 3x100 MLP, RMSprop (paper 4.2)")
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


@register_setup("class_pair", "ImageNet class pair: 'is it a?' main, 'is it b?' auxiliary, timm backbone (paper 4.1)")
def class_pair(method: str, seed: int, gate: dict[str, Any], **options: Any):
    """ImageNet class pair (paper section 4.1)."""
    from ..data.class_pair import ClassPairDataModule

    model_kw, data_kw = _split(dict(options), {"lr": 1e-3, "optimizer": "adam", "backbone": "resnetv2_18"})
    model_kw.pop("hidden", None), model_kw.pop("depth", None)
    datamodule = ClassPairDataModule(seed=seed, **data_kw)
    module = MultiTaskClassifier(tasks=datamodule.tasks, input_dim=None, method=method, gate=gate, **model_kw)
    return module, datamodule


@register_setup("celeba", "CelebA: 'Attractive' main, 5 facial landmarks auxiliary, TCDCN-style CNN, Adam (blog)")
def celeba(method: str, seed: int, gate: dict[str, Any], **options: Any):
    """CelebA attractiveness with landmarks (the projection blog); options: ``lam``, ``root``, ``subset``..."""
    from ..models_tcdcn import celeba_setup

    return celeba_setup(method, seed, gate, **options)
