"""NDDR-CNN (Gao et al., CVPR 2019): two task columns fused layer by layer by a learned 1x1 convolution.

An :class:`NDDRUnit` ("neural discriminative dimensionality reduction") follows a stage of two
columns ``A`` (main task) and ``B`` (auxiliary task): it concatenates their ``(B, C, H, W)``
feature maps along the channels (``2C``) and maps them back to ``C`` channels with one 1x1
convolution per task, followed by BatchNorm and ReLU::

    y_A = ReLU(BN_A(W_A [x_A; x_B])),   y_B = ReLU(BN_B(W_B [x_A; x_B])),   W_t: (C, 2C)

It generalises a per-channel cross-stitch unit (where ``W_t`` is two diagonal blocks) to any
mixing of the channels. The NDDR paper initialises ``W_t`` with a diagonal block of weight
``same_weight`` on the task's own column and ``other_weight`` on the other one (its best
setting: 0.9 and 0.1, which we use), so that each task starts mostly from its own column:
``W_A = [0.9 I, 0.1 I]``, ``W_B = [0.1 I, 0.9 I]``. The convolution has no bias (the
BatchNorm's shift is one). Inputs ``(B, C)`` (MLP layers, a pooled ResNet stage) are treated as
``(B, C, 1, 1)``.

:class:`NDDRNet` is a :class:`~lightning_gradsim.baselines.cross_stitch.CrossStitchNet` with NDDR
units, so the rest is as for cross-stitch: ``forward(x)`` or ``forward(x_a, x_b)`` gives
``(features_a, features_b)``, :meth:`~NDDRNet.shared_parameters` is every parameter both tasks
reach (both columns up to the last unit and the units, but not the last unit's per-task
convolution and BatchNorm, which reach one task each: what the gate combines), and
:meth:`~NDDRNet.stitch_parameters` the units' (for their own learning rate).

>>> import torch
>>> unit = NDDRUnit(num_channels=3)
>>> unit.weight_a[:, :, 0, 0].detach()
tensor([[0.9000, 0.0000, 0.0000, 0.1000, 0.0000, 0.0000],
        [0.0000, 0.9000, 0.0000, 0.0000, 0.1000, 0.0000],
        [0.0000, 0.0000, 0.9000, 0.0000, 0.0000, 0.1000]])
>>> y_a, y_b = unit(torch.rand(4, 3, 5, 5), torch.rand(4, 3, 5, 5))
>>> tuple(y_a.shape), bool((y_b >= 0).all())
((4, 3, 5, 5), True)
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .cross_stitch import (
    CrossStitchNet,
    mlp_column,
    mlp_stitch_indices,
    resnet_column,
    resnet_stitch_indices,
)

__all__ = ["NDDRUnit", "NDDRNet", "nddr_mlp", "nddr_resnet"]


class NDDRUnit(nn.Module):
    """Fuse two columns' ``(B, C, H, W)`` (or ``(B, C)``) features: per task, concat -> 1x1 conv -> BN -> ReLU.

    Args:
        num_channels: ``C``, the channels of each column's features (dimension 1).
        same_weight: initial weight of the task's own channel (the diagonal of its own block).
        other_weight: initial weight of the same channel of the other column.
        momentum, eps: the BatchNorm's.

    Attributes:
        weight_a, weight_b: ``(C, 2C, 1, 1)`` 1x1 convolutions of task A and task B; input channels
            ``0..C-1`` are column A's, ``C..2C-1`` column B's.
        bn_a, bn_b: ``BatchNorm2d(C)`` of each task.
    """

    def __init__(
        self,
        num_channels: int,
        same_weight: float = 0.9,
        other_weight: float = 0.1,
        momentum: float = 0.1,
        eps: float = 1e-5,
    ) -> None:
        super().__init__()
        if isinstance(num_channels, bool) or not isinstance(num_channels, int) or num_channels < 1:
            raise ValueError(f"num_channels must be a positive channel count, got {num_channels!r}.")
        c = num_channels
        eye = torch.eye(c)
        self.num_channels = c
        self.weight_a = nn.Parameter(torch.cat([same_weight * eye, other_weight * eye], 1).view(c, 2 * c, 1, 1))
        self.weight_b = nn.Parameter(torch.cat([other_weight * eye, same_weight * eye], 1).view(c, 2 * c, 1, 1))
        self.bn_a = nn.BatchNorm2d(c, eps=eps, momentum=momentum)
        self.bn_b = nn.BatchNorm2d(c, eps=eps, momentum=momentum)
        self.same_weight, self.other_weight = float(same_weight), float(other_weight)

    def forward(self, x_a: Tensor, x_b: Tensor) -> tuple[Tensor, Tensor]:
        if x_a.shape != x_b.shape:
            raise ValueError(f"NDDR inputs must have the same shape, got {tuple(x_a.shape)} and {tuple(x_b.shape)}.")
        if x_a.dim() not in (2, 4) or x_a.shape[1] != self.num_channels:
            raise ValueError(
                f"This unit has num_channels={self.num_channels}; it takes (B, C, H, W) or (B, C) features, "
                f"got {tuple(x_a.shape)}."
            )
        flat = x_a.dim() == 2
        x = torch.cat([x_a, x_b], dim=1)
        if flat:
            x = x[:, :, None, None]
        y_a = F.relu(self.bn_a(F.conv2d(x, self.weight_a)))
        y_b = F.relu(self.bn_b(F.conv2d(x, self.weight_b)))
        return (y_a.flatten(1), y_b.flatten(1)) if flat else (y_a, y_b)

    def task_parameters(self, column: str) -> list[nn.Parameter]:
        """Task ``"a"``'s (``weight_a``, ``bn_a``) or task ``"b"``'s parameters of this unit."""
        if column not in ("a", "b"):
            raise ValueError(f"column must be 'a' or 'b', got {column!r}.")
        if column == "a":
            return [self.weight_a, *self.bn_a.parameters()]
        return [self.weight_b, *self.bn_b.parameters()]

    def extra_repr(self) -> str:
        return f"num_channels={self.num_channels}, same_weight={self.same_weight}, other_weight={self.other_weight}"


class NDDRNet(CrossStitchNet):
    """Two task columns of stages with an :class:`NDDRUnit` after chosen stages.

    Args:
        stages_a, stages_b, stitch_after: as :class:`~lightning_gradsim.baselines.cross_stitch.CrossStitchNet`.
        channels: per fused stage, its output channel count (NDDR units need it).
        same_weight, other_weight: initial diagonal weights of every unit (0.9 / 0.1).

    Example::

        net = nddr_mlp(64, hidden=(100, 100))
        feat_main, feat_aux = net(x)
        shared = net.shared_parameters()   # what GradSimMixin.shared_parameters() should return
    """

    def __init__(
        self,
        stages_a: Sequence[nn.Module],
        stages_b: Sequence[nn.Module],
        stitch_after: Sequence[int],
        channels: Sequence[int],
        same_weight: float = 0.9,
        other_weight: float = 0.1,
    ) -> None:
        if channels is None or any(c is None for c in channels):
            raise ValueError("NDDRNet needs the channel count of every fused stage (an NDDR unit mixes channels).")
        self.other_weight = float(other_weight)
        super().__init__(stages_a, stages_b, stitch_after, list(channels), same_weight)

    def make_unit(self, channels: int | None, same_weight: float) -> nn.Module:
        assert channels is not None  # checked in __init__
        return NDDRUnit(int(channels), same_weight, self.other_weight)

    def _last_unit(self) -> NDDRUnit | None:
        return self.units[str(self.stitch_after[-1])] if self.stitch_after else None  # type: ignore[return-value]

    def shared_parameters(self) -> list[nn.Parameter]:
        """Every parameter both tasks reach: the columns up to the last unit and the units, except
        the last unit's per-task convolution and BatchNorm (each reaches one task only)."""
        last = self._last_unit()
        if last is None:
            return []
        own = {id(p) for c in ("a", "b") for p in last.task_parameters(c)}
        return [p for p in super().shared_parameters() if id(p) not in own]

    def task_parameters(self, column: str) -> list[nn.Parameter]:
        """Reached by task ``column`` only: the last unit's convolution and BatchNorm of that task,
        and the column's stages after it."""
        last = self._last_unit()
        return ([] if last is None else last.task_parameters(column)) + super().task_parameters(column)


def nddr_mlp(
    in_features: int,
    hidden: Sequence[int] = (100, 100),
    stitch_after: Sequence[int] | None = None,
    same_weight: float = 0.9,
    other_weight: float = 0.1,
) -> NDDRNet:
    """Two MLP columns (Linear + ReLU stages) with an NDDR unit after every hidden layer by default.

    >>> net = nddr_mlp(64, hidden=(100, 100))
    >>> [tuple(f.shape) for f in net(torch.zeros(5, 8, 8))]
    [(5, 100), (5, 100)]
    """
    idx = mlp_stitch_indices(hidden, stitch_after)
    stages_a, stages_b = mlp_column(in_features, hidden), mlp_column(in_features, hidden)
    return NDDRNet(stages_a, stages_b, idx, [hidden[i] for i in idx], same_weight, other_weight)


def nddr_resnet(
    arch: str = "resnet18",
    stitch_after: Sequence[str] = ("layer1", "layer2", "layer3"),
    in_chans: int = 3,
    same_weight: float = 0.9,
    other_weight: float = 0.1,
    small_input: bool = False,
) -> NDDRNet:
    """Two torchvision ResNet trunks (random init) fused by NDDR units after chosen stages
    (``stem, layer1, layer2, layer3, layer4, pool``); ``(N, C)`` features per column.

    Example::

        net = nddr_resnet("resnet18", stitch_after=("layer1", "layer2"), in_chans=1, small_input=True)
        feat_a, feat_b = net(images)   # (N, 512) each
    """
    idx = resnet_stitch_indices(stitch_after)
    stages_a, widths = resnet_column(arch, in_chans, small_input)
    stages_b, _ = resnet_column(arch, in_chans, small_input)
    return NDDRNet(stages_a, stages_b, idx, [widths[i] for i in idx], same_weight, other_weight)
