"""Networks for the paper's experiments: a shared trunk with one head per task.

* :func:`mlp_trunk` -- the paper's 3x100 ReLU MLP for digits (section 4.2).
* :func:`timm_trunk` -- any timm backbone without its classifier (default ``resnetv2_18``, the
  paper's ResNetV2-18). Random weights unless ``pretrained=True`` is asked for explicitly.
* :class:`MultiHeadNet` -- a trunk plus one linear head per task.

Example::

    from lightning_gradsim.models import MultiHeadNet, mlp_trunk
    net = MultiHeadNet(*mlp_trunk(64), tasks={"main": 10, "rotated": 10})
    logits = net(x, task="main")
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import cast

import torch
from torch import Tensor, nn

__all__ = ["MultiHeadNet", "mlp_trunk", "timm_trunk", "tiny_cnn_trunk", "build_trunk"]


def mlp_trunk(input_dim: int, hidden: int = 100, depth: int = 3) -> tuple[nn.Module, int]:
    """A ``depth`` x ``hidden`` ReLU MLP on flattened inputs; returns ``(trunk, feature_dim)``."""
    if input_dim < 1 or hidden < 1 or depth < 1:
        raise ValueError(f"mlp_trunk needs positive input_dim, hidden and depth; got {input_dim}, {hidden}, {depth}.")
    layers: list[nn.Module] = [nn.Flatten()]
    width = input_dim
    for _ in range(depth):
        layers += [nn.Linear(width, hidden), nn.ReLU()]
        width = hidden
    return nn.Sequential(*layers), hidden


def tiny_cnn_trunk(in_chans: int = 3, width: int = 16) -> tuple[nn.Module, int]:
    """A two-conv network for tests and quick CPU runs; returns ``(trunk, feature_dim)``."""
    trunk = nn.Sequential(
        nn.Conv2d(in_chans, width, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Conv2d(width, 2 * width, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
    )
    return trunk, 2 * width


def timm_trunk(name: str = "resnetv2_18", in_chans: int = 3, pretrained: bool = False) -> tuple[nn.Module, int]:
    """A timm backbone without classifier (``num_classes=0``); returns ``(trunk, feature_dim)``.

    Weights are random unless ``pretrained=True``, which lets timm download them.
    """
    import timm

    if not timm.is_model(name):
        raise ValueError(f"Unknown timm backbone {name!r}; see timm.list_models() (e.g. 'resnetv2_18', 'resnet18').")
    trunk = timm.create_model(name, pretrained=pretrained, num_classes=0, in_chans=in_chans)
    # timm sets num_features as a plain int; nn.Module.__getattr__ types attributes as Tensor | Module.
    return trunk, int(cast(int, trunk.num_features))


def build_trunk(
    backbone: str = "mlp",
    *,
    input_dim: int | None = None,
    in_chans: int = 3,
    hidden: int = 100,
    depth: int = 3,
    pretrained: bool = False,
) -> tuple[nn.Module, int]:
    """Build a trunk by name: ``"mlp"``, ``"tiny_cnn"`` or any timm model name."""
    if backbone == "mlp":
        if input_dim is None:
            raise ValueError("backbone='mlp' needs input_dim (e.g. 64 for 8x8 digits, 784 for MNIST).")
        return mlp_trunk(input_dim, hidden, depth)
    if backbone == "tiny_cnn":
        return tiny_cnn_trunk(in_chans)
    return timm_trunk(backbone, in_chans=in_chans, pretrained=pretrained)


class MultiHeadNet(nn.Module):
    """A shared ``trunk`` and one linear head per task (``tasks``: name -> number of outputs).

    Example::

        net = MultiHeadNet(*timm_trunk("resnetv2_18"), tasks={"main": 2, "aux": 2})
        logits = net(images, task="aux")
    """

    def __init__(self, trunk: nn.Module, feature_dim: int, tasks: Mapping[str, int]) -> None:
        super().__init__()
        if not tasks:
            raise ValueError("MultiHeadNet needs at least one task, e.g. tasks={'main': 10, 'aux': 10}.")
        self.trunk = trunk
        self.heads = nn.ModuleDict({str(name): nn.Linear(feature_dim, int(n)) for name, n in tasks.items()})

    def features(self, x: Tensor) -> Tensor:
        return self.trunk(x)

    def forward(self, x: Tensor, task: str = "main") -> Tensor:
        if task not in self.heads:
            raise KeyError(f"No head for task {task!r}; heads: {sorted(self.heads)}.")
        return self.heads[task](self.trunk(x))

    def shared_parameters(self) -> list[torch.nn.Parameter]:
        return list(self.trunk.parameters())
