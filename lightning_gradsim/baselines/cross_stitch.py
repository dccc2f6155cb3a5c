"""Cross-stitch networks (Misra et al., CVPR 2016): two task columns that learn how much to share.

A :class:`CrossStitchUnit` mixes the activations of two columns ``A`` (main task) and ``B``
(auxiliary task) after a layer::

    [y_A]   [a_AA  a_AB] [x_A]
    [y_B] = [a_BA  a_BB] [x_B]

with one 2x2 matrix per unit (or per channel). The paper initialises the units with
``a_same + a_other = 1`` (its best setting ``(0.9, 0.1)``) and trains them with a learning rate
10^2-10^3 times the network's (use an optimizer parameter group for :meth:`CrossStitchNet.stitch_parameters`).

With the gate (any rule) the *shared* parameters of a cross-stitch net are everything both tasks
reach: the stitch units **and** every column layer up to the last unit (after a unit, column
``A``'s earlier layers also feed task ``B``). :meth:`CrossStitchNet.shared_parameters` returns
exactly these; the layers after the last unit are task-specific.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

__all__ = ["CrossStitchUnit", "CrossStitchNet", "CrossStitchMultiHeadNet", "cross_stitch_mlp", "cross_stitch_resnet"]


class CrossStitchUnit(nn.Module):
    """Learnable 2x2 mixing of two columns' activations (Misra et al., 2016).

    Args:
        num_channels: ``None`` for one 2x2 matrix for the whole activation, or the number of
            channels (dimension 1 of the activations) for one matrix per channel.
        same_weight: initial ``a_AA = a_BB``; the other-task weights start at ``1 - same_weight``.

    Attributes:
        alpha: ``(2, 2)`` or ``(C, 2, 2)`` parameter; ``alpha[..., t, s]`` is the weight of source
            column ``s`` in output column ``t`` (0 = A, 1 = B).

    Example::

        unit = CrossStitchUnit(num_channels=64, same_weight=0.9)
        y_a, y_b = unit(x_a, x_b)   # y_a = 0.9 x_a + 0.1 x_b at initialisation
    """

    def __init__(self, num_channels: int | None = None, same_weight: float = 0.9) -> None:
        super().__init__()
        if not 0.0 <= same_weight <= 1.0:
            raise ValueError(f"same_weight must be in [0, 1] (the other weight is 1 - same_weight), got {same_weight}.")
        if num_channels is not None and num_channels < 1:
            raise ValueError(f"num_channels must be a positive channel count or None, got {num_channels}.")
        other = 1.0 - same_weight
        init = torch.tensor([[same_weight, other], [other, same_weight]])
        if num_channels is not None:
            init = init.expand(num_channels, 2, 2).clone()
        self.num_channels = num_channels
        self.alpha = nn.Parameter(init)

    def forward(self, x_a: Tensor, x_b: Tensor) -> tuple[Tensor, Tensor]:
        if x_a.shape != x_b.shape:
            raise ValueError(
                f"Cross-stitch inputs must have the same shape, got {tuple(x_a.shape)} and {tuple(x_b.shape)}."
            )
        if self.num_channels is None:
            a = self.alpha
            return a[0, 0] * x_a + a[0, 1] * x_b, a[1, 0] * x_a + a[1, 1] * x_b
        if x_a.dim() < 2 or x_a.shape[1] != self.num_channels:
            raise ValueError(
                f"This unit has num_channels={self.num_channels} but the activations have shape {tuple(x_a.shape)} "
                "(channels are dimension 1); build the unit with the layer's channel count."
            )
        view = (1, self.num_channels) + (1,) * (x_a.dim() - 2)
        a = self.alpha
        return (
            a[:, 0, 0].reshape(view) * x_a + a[:, 0, 1].reshape(view) * x_b,
            a[:, 1, 0].reshape(view) * x_a + a[:, 1, 1].reshape(view) * x_b,
        )

    def extra_repr(self) -> str:
        return f"num_channels={self.num_channels}"


class CrossStitchNet(nn.Module):
    """Two task columns of stages, with a :class:`CrossStitchUnit` after chosen stages.

    Args:
        stages_a: column A's stages (main task), applied in order.
        stages_b: column B's stages (auxiliary task); same count, same output shapes as A's.
        stitch_after: indices of the stages after which a unit mixes the columns.
        channels: per stitched stage, its output channel count for per-channel units, or
            ``None`` for scalar units (default: scalar units everywhere).
        same_weight: initial same-task weight of every unit.

    ``forward(x)`` (one input for both columns) or ``forward(x_a, x_b)`` (a batch per task)
    returns ``(features_a, features_b)``; put the main head on A and the auxiliary head on B.

    Example::

        net = cross_stitch_mlp(64, hidden=(100, 100))
        feat_main, feat_aux = net(x)
        shared = net.shared_parameters()   # what GradSimMixin.shared_parameters() should return
    """

    def __init__(
        self,
        stages_a: Sequence[nn.Module],
        stages_b: Sequence[nn.Module],
        stitch_after: Sequence[int],
        channels: Sequence[int | None] | None = None,
        same_weight: float = 0.9,
    ) -> None:
        super().__init__()
        if len(stages_a) != len(stages_b) or not stages_a:
            raise ValueError(
                f"Both columns need the same, non-zero number of stages; got {len(stages_a)} and {len(stages_b)}."
            )
        n = len(stages_a)
        stitch_after = sorted({int(i) for i in stitch_after})
        bad = [i for i in stitch_after if not 0 <= i < n]
        if bad:
            raise ValueError(f"stitch_after has stage indices {bad} outside 0..{n - 1}.")
        if channels is None:
            channels = [None] * len(stitch_after)
        if len(channels) != len(stitch_after):
            raise ValueError(f"channels has {len(channels)} entries but there are {len(stitch_after)} stitched stages.")
        self.column_a = nn.ModuleList(stages_a)
        self.column_b = nn.ModuleList(stages_b)
        self.stitch_after = list(stitch_after)
        self.units = nn.ModuleDict({str(i): self.make_unit(c, same_weight) for i, c in zip(stitch_after, channels)})

    def make_unit(self, channels: int | None, same_weight: float) -> nn.Module:
        """The unit after a stitched stage: ``unit(h_a, h_b) -> (h_a, h_b)`` (subclasses use other units)."""
        return CrossStitchUnit(channels, same_weight)

    def forward(self, x_a: Tensor, x_b: Tensor | None = None) -> tuple[Tensor, Tensor]:
        h_a, h_b = x_a, (x_a if x_b is None else x_b)
        for i, (stage_a, stage_b) in enumerate(zip(self.column_a, self.column_b)):
            h_a, h_b = stage_a(h_a), stage_b(h_b)
            unit = self.units[str(i)] if str(i) in self.units else None
            if unit is not None:
                h_a, h_b = unit(h_a, h_b)
        return h_a, h_b

    def stitch_parameters(self) -> list[nn.Parameter]:
        """The units' mixing weights (give them a higher learning rate, as the paper does)."""
        return [p for u in self.units.values() for p in u.parameters()]  # each unit's only parameter: alpha

    def shared_parameters(self) -> list[nn.Parameter]:
        """Every parameter both tasks reach: the units and both columns' stages up to the last unit."""
        if not self.stitch_after:
            return []
        last = self.stitch_after[-1]
        params: list[nn.Parameter] = []
        for i in range(last + 1):
            params += list(self.column_a[i].parameters()) + list(self.column_b[i].parameters())
        return params + self.stitch_parameters()

    def task_parameters(self, column: str) -> list[nn.Parameter]:
        """Column ``"a"``'s or ``"b"``'s stages after the last unit (reached by one task only)."""
        if column not in ("a", "b"):
            raise ValueError(f"column must be 'a' or 'b', got {column!r}.")
        stages = self.column_a if column == "a" else self.column_b
        start = self.stitch_after[-1] + 1 if self.stitch_after else 0
        return [p for s in list(stages)[start:] for p in s.parameters()]


class CrossStitchMultiHeadNet(nn.Module):
    """A :class:`CrossStitchNet` with one linear head per task, interchangeable with ``models.MultiHeadNet``.

    ``forward(x, task)`` runs both columns on ``x`` (each task has its own batch) and reads the
    ``"main"`` head from column A and every other task's head from column B.
    :meth:`shared_parameters` is :meth:`CrossStitchNet.shared_parameters` (units + stitched stages).

    Example::

        net = CrossStitchMultiHeadNet(cross_stitch_mlp(64), 100, tasks={"main": 10, "rotated": 10})
        logits = net(x, task="rotated")
    """

    def __init__(self, net: CrossStitchNet, feature_dim: int, tasks: Mapping[str, int]) -> None:
        super().__init__()
        if "main" not in tasks or len(tasks) < 2:
            raise ValueError(f"tasks must contain 'main' and at least one auxiliary task, got {sorted(tasks)}.")
        self.net = net
        self.heads = nn.ModuleDict({str(name): nn.Linear(feature_dim, int(n)) for name, n in tasks.items()})

    def features(self, x: Tensor, task: str = "main") -> Tensor:
        feat_a, feat_b = self.net(x)
        return feat_a if task == "main" else feat_b

    def forward(self, x: Tensor, task: str = "main") -> Tensor:
        if task not in self.heads:
            raise KeyError(f"No head for task {task!r}; heads: {sorted(self.heads)}.")
        return self.heads[task](self.features(x, task))

    def shared_parameters(self) -> list[nn.Parameter]:
        return self.net.shared_parameters()


def cross_stitch_mlp(
    in_features: int,
    hidden: Sequence[int] = (100, 100),
    stitch_after: Sequence[int] | None = None,
    per_channel: bool = True,
    same_weight: float = 0.9,
) -> CrossStitchNet:
    """Two MLP columns (Linear + ReLU stages) with units after every hidden layer by default.

    Example::

        net = cross_stitch_mlp(64, hidden=(100, 100))   # sklearn digits: 8x8 = 64 inputs
        feat_a, feat_b = net(x.flatten(1))               # (N, 100) each
    """
    idx = mlp_stitch_indices(hidden, stitch_after)
    channels = [hidden[i] if per_channel else None for i in idx]
    return CrossStitchNet(mlp_column(in_features, hidden), mlp_column(in_features, hidden), idx, channels, same_weight)


def mlp_column(in_features: int, hidden: Sequence[int]) -> list[nn.Module]:
    """One MLP column: a ``Linear + ReLU`` stage per hidden width (the first flattens its input)."""
    if not hidden:
        raise ValueError("hidden must list at least one layer width.")
    sizes = [in_features] + list(hidden)
    stages: list[nn.Module] = []
    for i in range(len(hidden)):
        layers: list[nn.Module] = [nn.Linear(sizes[i], sizes[i + 1]), nn.ReLU()]
        if i == 0:  # accept (N, 8, 8) digits as well as (N, 64)
            layers.insert(0, nn.Flatten())
        stages.append(nn.Sequential(*layers))
    return stages


def mlp_stitch_indices(hidden: Sequence[int], stitch_after: Sequence[int] | None) -> list[int]:
    """The hidden layers followed by a unit: all by default; checked against ``hidden``."""
    if not hidden:
        raise ValueError("hidden must list at least one layer width.")
    idx = list(range(len(hidden))) if stitch_after is None else sorted({int(i) for i in stitch_after})
    bad = [i for i in idx if not 0 <= i < len(hidden)]
    if bad:
        raise ValueError(f"stitch_after has layer indices {bad} outside 0..{len(hidden) - 1} (one per hidden layer).")
    return idx


def cross_stitch_resnet(
    arch: str = "resnet18",
    stitch_after: Sequence[str] = ("layer1", "layer2", "layer3"),
    in_chans: int = 3,
    per_channel: bool = True,
    same_weight: float = 0.9,
    small_input: bool = False,
) -> CrossStitchNet:
    """Two torchvision ResNet trunks (random init, nothing downloaded) stitched after chosen stages.

    Stages are ``stem, layer1, layer2, layer3, layer4, pool`` (``pool`` = global average pool +
    flatten); ``stitch_after`` names stages. ``small_input=True`` uses a 3x3 stride-1 stem without
    max-pool (CIFAR/MNIST-sized images). Returns ``(N, C)`` features per column.

    Example::

        net = cross_stitch_resnet("resnet18", stitch_after=("layer1", "layer2"), in_chans=1, small_input=True)
        feat_a, feat_b = net(images)   # (N, 512) each
    """
    idx = resnet_stitch_indices(stitch_after)
    stages_a, widths = resnet_column(arch, in_chans, small_input)
    stages_b, _ = resnet_column(arch, in_chans, small_input)
    channels = [widths[i] if per_channel else None for i in idx]
    return CrossStitchNet(stages_a, stages_b, idx, channels, same_weight)


RESNET_STAGES = ("stem", "layer1", "layer2", "layer3", "layer4", "pool")


def resnet_stitch_indices(stitch_after: Sequence[str]) -> list[int]:
    """Stage names (:data:`RESNET_STAGES`) -> sorted stage indices."""
    unknown = [s for s in stitch_after if s not in RESNET_STAGES]
    if unknown:
        raise ValueError(f"Unknown ResNet stage(s) {unknown}; choose from {list(RESNET_STAGES)}.")
    return sorted(RESNET_STAGES.index(s) for s in set(stitch_after))


def resnet_column(arch: str, in_chans: int = 3, small_input: bool = False) -> tuple[list[nn.Module], list[int]]:
    """One torchvision ResNet (random init) as stages ``stem .. pool``, and each stage's output channels."""
    import torchvision

    if not hasattr(torchvision.models, arch):
        raise ValueError(f"Unknown torchvision architecture {arch!r}, e.g. 'resnet18' or 'resnet50'.")
    m = getattr(torchvision.models, arch)(weights=None)
    if small_input:
        stem = nn.Sequential(nn.Conv2d(in_chans, 64, 3, 1, 1, bias=False), m.bn1, m.relu)
    else:
        conv = m.conv1 if in_chans == 3 else nn.Conv2d(in_chans, 64, 7, 2, 3, bias=False)
        stem = nn.Sequential(conv, m.bn1, m.relu, m.maxpool)
    stages = [stem, m.layer1, m.layer2, m.layer3, m.layer4, nn.Sequential(m.avgpool, nn.Flatten(1))]
    widths = [64] + [_stage_width(layer) for layer in (m.layer1, m.layer2, m.layer3, m.layer4)] + [m.fc.in_features]
    return stages, widths


def _stage_width(layer: nn.Module) -> int:
    last_block = list(layer.children())[-1]
    for attr in ("bn3", "bn2"):
        if hasattr(last_block, attr):
            return getattr(last_block, attr).num_features
    raise ValueError("Cannot infer the stage's channel count.")
