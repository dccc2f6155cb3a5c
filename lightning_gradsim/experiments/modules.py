"""The LightningModule of the paper's experiments: a shared trunk, one head per task, a gate.

Batches are dicts ``{task_name: (inputs, labels)}`` with the main task under ``"main"`` (what
:class:`~lightning_gradsim.data.RotatedDigitsDataModule` and
:class:`~lightning_gradsim.data.ClassPairDataModule` deliver); validation and test batches are the
main task's ``(inputs, labels)``. Logged metrics: ``val/acc``, ``val/loss``, ``test/acc``,
``test/loss`` and, for two-class main tasks, ``val/auroc`` and ``test/auroc``.

Example::

    model = MultiTaskClassifier(tasks={"main": 10, "rotated": 10}, backbone="mlp", input_dim=64,
                                method="unweighted", optimizer="rmsprop", lr=1e-3)
    L.Trainer(max_steps=500).fit(model, RotatedDigitsDataModule(angle=90))
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics.classification import BinaryAUROC, MulticlassAccuracy

from ..baselines.cross_stitch import CrossStitchMultiHeadNet
from ..lightning.mixin import GradSimMixin
from ..methods import make_gate
from ..models import MultiHeadNet, build_trunk

__all__ = ["MultiTaskClassifier"]

_OPTIMIZERS = {
    "rmsprop": torch.optim.RMSprop,
    "adam": torch.optim.Adam,
    "sgd": torch.optim.SGD,
    "adamw": torch.optim.AdamW,
}


class MultiTaskClassifier(GradSimMixin, L.LightningModule):
    """Classify each task with its own head on a shared trunk; the gate combines the trunk's gradients.

    Args:
        tasks: task name -> number of classes; must contain ``"main"``.
        backbone: ``"mlp"`` (the paper's 3x100 ReLU MLP), ``"tiny_cnn"`` or a timm model name
            (``"resnetv2_18"`` is the paper's ResNetV2-18).
        input_dim: flattened input size for ``"mlp"`` (64 for 8x8 digits, 784 for MNIST).
        in_chans: image channels for convolutional backbones.
        hidden, depth: width and number of hidden layers of the MLP.
        pretrained: let timm download pretrained weights (off by default: nothing is fetched).
        method: a name from :func:`lightning_gradsim.methods.list_methods`.
        gate: keyword arguments of the method's gate, e.g. ``{"aux_weight": 1.0, "threshold": 0.0}``.
        optimizer: ``"rmsprop"`` (the paper's choice for digits), ``"adam"``, ``"adamw"`` or ``"sgd"``.
        lr, weight_decay, momentum: optimizer settings (``momentum`` for SGD and RMSprop).
        sync_buffers: the mixin's ``gradsim_sync_buffers``: ``"broadcast"`` copies rank 0's BatchNorm
            running statistics to every rank after each step under DDP (as DDP does in automatic
            optimisation); ``"none"`` leaves each rank its own (and warns once when BatchNorm is used).
    """

    def __init__(
        self,
        tasks: dict[str, int] | None = None,
        backbone: str = "mlp",
        input_dim: int | None = 64,
        in_chans: int = 3,
        hidden: int = 100,
        depth: int = 3,
        pretrained: bool = False,
        method: str = "unweighted",
        gate: dict[str, Any] | None = None,
        optimizer: str = "rmsprop",
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        momentum: float = 0.0,
        sync_buffers: str = "none",
    ) -> None:
        super().__init__()
        self.gradsim_sync_buffers = sync_buffers
        tasks = dict(tasks or {"main": 10, "aux": 10})
        if "main" not in tasks or len(tasks) < 2:
            raise ValueError(f"tasks must name 'main' and at least one auxiliary task, got {sorted(tasks)}.")
        if optimizer not in _OPTIMIZERS:
            raise ValueError(f"Unknown optimizer {optimizer!r}; choose from {', '.join(_OPTIMIZERS)}.")
        self.save_hyperparameters()
        trunk, dim = build_trunk(
            backbone, input_dim=input_dim, in_chans=in_chans, hidden=hidden, depth=depth, pretrained=pretrained
        )
        # CrossStitchClassifier replaces it with its cross-stitch net (same forward and shared_parameters).
        self.net: MultiHeadNet | CrossStitchMultiHeadNet = MultiHeadNet(trunk, dim, tasks)
        self.gradsim = make_gate(method, **dict(gate or {}))
        self.tasks = tasks
        num_main = tasks["main"]
        self.binary = num_main == 2
        self.val_acc = MulticlassAccuracy(num_classes=num_main, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes=num_main, average="micro")
        if self.binary:
            self.val_auroc = BinaryAUROC()
            self.test_auroc = BinaryAUROC()

    def forward(self, x: Tensor, task: str = "main") -> Tensor:
        return self.net(x, task)

    def shared_parameters(self) -> list[torch.nn.Parameter]:
        return self.net.shared_parameters()

    def task_losses(self, batch: Any, batch_idx: int) -> dict[str, Tensor]:
        if not isinstance(batch, dict):
            raise TypeError(
                "MultiTaskClassifier expects training batches {task: (inputs, labels)}; got "
                f"{type(batch).__name__}. Use a datamodule that delivers per-task batches (CombinedLoader)."
            )
        if set(batch) != set(self.tasks):
            raise KeyError(
                f"Batch tasks {sorted(batch)} differ from the model's tasks {sorted(self.tasks)}; make them match."
            )
        return {name: F.cross_entropy(self.net(x, name), y) for name, (x, y) in batch.items()}

    def _evaluate(self, batch: Any, stage: str) -> None:
        x, y = batch
        logits = self.net(x, "main")
        self.log(f"{stage}/loss", F.cross_entropy(logits, y), on_epoch=True, on_step=False, sync_dist=True)
        acc = self.val_acc if stage == "val" else self.test_acc
        acc(logits, y)
        self.log(f"{stage}/acc", acc, on_epoch=True, on_step=False, prog_bar=stage == "val")
        if self.binary:
            auroc = self.val_auroc if stage == "val" else self.test_auroc
            auroc(logits.softmax(-1)[:, 1], y)
            self.log(f"{stage}/auroc", auroc, on_epoch=True, on_step=False)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self._evaluate(batch, "val")

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self._evaluate(batch, "test")

    def configure_optimizers(self) -> torch.optim.Optimizer:
        hp = self.hparams
        kwargs: dict[str, Any] = {"lr": hp["lr"], "weight_decay": hp["weight_decay"]}
        if hp["optimizer"] in {"sgd", "rmsprop"}:
            kwargs["momentum"] = hp["momentum"]
        return _OPTIMIZERS[hp["optimizer"]](self.parameters(), **kwargs)
