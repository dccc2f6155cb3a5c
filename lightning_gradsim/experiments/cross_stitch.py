"""Cross-stitch networks in the experiments: a classifier for ``gradsim fit`` and ``compare`` setups.

* :class:`CrossStitchClassifier` -- :class:`~lightning_gradsim.experiments.MultiTaskClassifier`
  with a two-column cross-stitch network instead of a shared trunk (``backbone="mlp"``: the
  paper's MLP as two columns with a unit after every hidden layer; ``backbone="resnet18"`` (any
  torchvision ResNet): two ResNet columns with units after ``stitch_after`` stages). The main
  task reads column A, auxiliary tasks column B; works with every method.
* ``unit="nddr"``: the same two columns fused by NDDR units (Gao et al., 2019; a 1x1
  convolution per task over both columns' concatenated features, BatchNorm, ReLU), setups
  ``rotated_digits_nddr`` and ``class_pair_nddr``.
* Setups ``rotated_digits_cross_stitch`` and ``class_pair_cross_stitch`` of
  :func:`~lightning_gradsim.experiments.compare.compare` (built-in names, see
  :data:`~lightning_gradsim.experiments.registry.SETUPS`).

Example::

    from lightning_gradsim.experiments.compare import compare
    compare("rotated_digits_cross_stitch", methods=["sum", "unweighted"], seeds=[0], max_steps=200)

or in a ``gradsim fit`` config: ``model.class_path: lightning_gradsim.experiments.CrossStitchClassifier``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ..baselines.cross_stitch import CrossStitchMultiHeadNet, CrossStitchNet, cross_stitch_mlp, cross_stitch_resnet
from ..baselines.nddr import nddr_mlp, nddr_resnet
from .modules import _OPTIMIZERS, MultiTaskClassifier

__all__ = [
    "CrossStitchClassifier",
    "rotated_digits_cross_stitch",
    "class_pair_cross_stitch",
    "rotated_digits_nddr",
    "class_pair_nddr",
]
UNITS = ("cross_stitch", "nddr")


class CrossStitchClassifier(MultiTaskClassifier):
    """:class:`MultiTaskClassifier` on a cross-stitch network (Misra et al., 2016).

    Args (besides :class:`MultiTaskClassifier`'s):
        backbone: ``"mlp"`` (``depth`` x ``hidden`` columns on ``input_dim`` inputs) or a
            torchvision ResNet name (``"resnet18"``, ``"resnet50"``...; random init).
        stitch_after: MLP: hidden-layer indices (default all); ResNet: stage names among
            ``stem, layer1, layer2, layer3, layer4`` (default ``layer1, layer2, layer3``).
        same_weight: initial same-column weight of every unit (other-column weight ``1 - same_weight``).
        per_channel: one 2x2 unit per channel (default) or one per layer (cross-stitch units only).
        unit: ``"cross_stitch"`` (Misra et al.) or ``"nddr"`` (NDDR-CNN: per task a 1x1 convolution
            of both columns' concatenated features, BatchNorm, ReLU; diagonal init
            ``same_weight`` / ``1 - same_weight``, 0.9 / 0.1 as in the NDDR paper).
        small_input: ResNet stem for small images (3x3 stride 1, no max-pool).
        stitch_lr: learning rate of the units (the paper uses 10^2-10^3 times the network's);
            ``None`` uses ``lr``.

    ``shared_parameters()`` returns the units and both columns up to the last unit: everything
    both tasks reach, which the gate combines.

    >>> import torch
    >>> model = CrossStitchClassifier(tasks={"main": 10, "rotated": 10}, input_dim=64, method="pcgrad")
    >>> tuple(model(torch.zeros(3, 64), task="rotated").shape)
    (3, 10)
    """

    def __init__(
        self,
        tasks: dict[str, int] | None = None,
        backbone: str = "mlp",
        input_dim: int | None = 64,
        in_chans: int = 3,
        hidden: int = 100,
        depth: int = 3,
        method: str = "unweighted",
        gate: dict[str, Any] | None = None,
        optimizer: str = "rmsprop",
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        momentum: float = 0.0,
        stitch_after: Sequence[int] | Sequence[str] | None = None,
        same_weight: float = 0.9,
        per_channel: bool = True,
        small_input: bool = False,
        stitch_lr: float | None = None,
        sync_buffers: str = "none",
        unit: str = "cross_stitch",
    ) -> None:
        if unit not in UNITS:
            raise ValueError(f"unit must be one of {UNITS}, got {unit!r}.")
        # The parent builds a plain MLP trunk (cheap) that is replaced below.
        super().__init__(
            tasks=tasks,
            backbone="mlp",
            input_dim=input_dim or 1,
            in_chans=in_chans,
            hidden=hidden,
            depth=depth,
            method=method,
            gate=gate,
            optimizer=optimizer,
            lr=lr,
            weight_decay=weight_decay,
            momentum=momentum,
            sync_buffers=sync_buffers,
        )
        self.save_hyperparameters()
        net: CrossStitchNet  # NDDRNet is one
        if backbone == "mlp":
            if input_dim is None:
                raise ValueError("backbone='mlp' needs input_dim (64 for 8x8 digits, 784 for MNIST).")
            widths = (hidden,) * depth
            if unit == "nddr":
                net = nddr_mlp(input_dim, widths, stitch_after, same_weight, 1.0 - same_weight)  # type: ignore[arg-type]
            else:
                net = cross_stitch_mlp(input_dim, widths, stitch_after, per_channel, same_weight)  # type: ignore[arg-type]
            dim = hidden
        else:
            stages = tuple(stitch_after) if stitch_after is not None else ("layer1", "layer2", "layer3")
            if unit == "nddr":
                net = nddr_resnet(backbone, stages, in_chans, same_weight, 1.0 - same_weight, small_input)  # type: ignore[arg-type]
            else:
                net = cross_stitch_resnet(backbone, stages, in_chans, per_channel, same_weight, small_input)  # type: ignore[arg-type]
            dim = _resnet_feature_dim(net)
        self.net = CrossStitchMultiHeadNet(net, dim, self.tasks)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        hp = self.hparams
        kwargs: dict[str, Any] = {"lr": hp["lr"], "weight_decay": hp["weight_decay"]}
        if hp["optimizer"] in {"sgd", "rmsprop"}:
            kwargs["momentum"] = hp["momentum"]
        net = self.net
        assert isinstance(net, CrossStitchMultiHeadNet)  # set in __init__
        stitch = net.net.stitch_parameters()
        ids = {id(p) for p in stitch}
        rest = [p for p in self.parameters() if id(p) not in ids]
        stitch_lr = hp["stitch_lr"] if hp["stitch_lr"] is not None else hp["lr"]
        groups = [{"params": rest}, {"params": stitch, "lr": stitch_lr}]
        return _OPTIMIZERS[hp["optimizer"]](groups, **kwargs)


def _resnet_feature_dim(net) -> int:
    """Channels of the last stage before pooling (512 for resnet18/34, 2048 for resnet50+)."""
    convs = [m for m in net.column_a[-2].modules() if isinstance(m, torch.nn.Conv2d)]
    bns = [m for m in net.column_a[-2].modules() if isinstance(m, torch.nn.BatchNorm2d)]
    return int(bns[-1].num_features if bns else convs[-1].out_channels)


_MODEL_KEYS = (
    "lr",
    "optimizer",
    "hidden",
    "depth",
    "weight_decay",
    "momentum",
    "backbone",
    "stitch_after",
    "same_weight",
    "per_channel",
    "small_input",
    "stitch_lr",
    "in_chans",
    "unit",
)


def _split(options: dict[str, Any], defaults: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    model = {**defaults, **{k: options.pop(k) for k in list(options) if k in _MODEL_KEYS}}
    return model, options


def rotated_digits_cross_stitch(method: str, seed: int, gate: dict[str, Any], **options: Any):
    """``rotated_digits`` with :class:`CrossStitchClassifier` (options: those of ``rotated_digits`` plus the
    classifier's ``stitch_after``, ``same_weight``, ``per_channel``, ``stitch_lr``)."""
    from ..data.digits import RotatedDigitsDataModule

    model_kw, data_kw = _split(dict(options), {"lr": 1e-3, "optimizer": "rmsprop", "hidden": 100, "depth": 3})
    model_kw["backbone"] = "mlp"
    datamodule = RotatedDigitsDataModule(seed=seed, **data_kw)
    module = CrossStitchClassifier(
        tasks=datamodule.tasks, input_dim=datamodule.input_dim, method=method, gate=gate, **model_kw
    )
    return module, datamodule


def class_pair_cross_stitch(method: str, seed: int, gate: dict[str, Any], **options: Any):
    """``class_pair`` with :class:`CrossStitchClassifier` on torchvision ResNet columns (``backbone="resnet18"``)."""
    from ..data.class_pair import ClassPairDataModule

    model_kw, data_kw = _split(dict(options), {"lr": 1e-3, "optimizer": "adam", "backbone": "resnet18"})
    datamodule = ClassPairDataModule(seed=seed, **data_kw)
    module = CrossStitchClassifier(tasks=datamodule.tasks, input_dim=None, method=method, gate=gate, **model_kw)
    return module, datamodule


def rotated_digits_nddr(method: str, seed: int, gate: dict[str, Any], **options: Any):
    """``rotated_digits`` on two MLP columns fused by NDDR units after every hidden layer (Gao et al., 2019)."""
    return rotated_digits_cross_stitch(method, seed, gate, **{"unit": "nddr", **options})


def class_pair_nddr(method: str, seed: int, gate: dict[str, Any], **options: Any):
    """``class_pair`` on two torchvision ResNet columns fused by NDDR units (``backbone="resnet18"``)."""
    return class_pair_cross_stitch(method, seed, gate, **{"unit": "nddr", **options})
