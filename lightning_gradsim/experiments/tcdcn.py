"""A TCDCN-style network (Zhang et al. 2014) for CelebA: "Attractive" main task, landmarks auxiliary.

The trunk follows TCDCN on 40 x 40 grey-scale faces: four convolutions (20, 48, 64, 80 channels;
5x5, 5x5, 3x3, 2x2) with 2x2 max-pooling after the first three, then a shared 256-unit
fully-connected layer; one linear head per task (1 logit for "Attractive", 10 landmark
coordinates). ReLU activations (TCDCN uses absolute tanh). Trained with Adam; early stopping on the
main task's validation loss; logs ``val/acc``, ``val/auroc``, ``test/acc`` and ``test/auroc``
(the blog's Figures 8-9 report the test AUC), so it plugs into ``gradsim compare --setup celeba``.
Train it with ``L.Trainer(max_epochs=30).fit(model, CelebADataModule(root="~/data"))``.

>>> import torch
>>> model = CelebATCDCN(method="projection", aux_weight=1.0)
>>> [tuple(out.shape) for out in model(torch.zeros(2, 1, 40, 40))]
[(2,), (2, 10)]
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch import Callback
from lightning.pytorch.callbacks import EarlyStopping
from torch import Tensor, nn
from torchmetrics.classification import BinaryAccuracy, BinaryAUROC

from ..lightning.mixin import GradSimMixin
from ..methods import make_gate

__all__ = ["TCDCNTrunk", "CelebATCDCN", "celeba_setup"]


class TCDCNTrunk(nn.Module):
    """Conv trunk + shared fully-connected layer: ``(N, 1, 40, 40) -> (N, features)``."""

    def __init__(self, image_size: int = 40, features: int = 256) -> None:
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv2d(1, 20, 5),
            nn.ReLU(),
            nn.MaxPool2d(2, ceil_mode=True),
            nn.Conv2d(20, 48, 5),
            nn.ReLU(),
            nn.MaxPool2d(2, ceil_mode=True),
            nn.Conv2d(48, 64, 3),
            nn.ReLU(),
            nn.MaxPool2d(2, ceil_mode=True),
            nn.Conv2d(64, 80, 2),
            nn.ReLU(),
        )
        with torch.no_grad():
            flat = self.conv(torch.zeros(1, 1, image_size, image_size)).numel()
        self.fc = nn.Sequential(nn.Flatten(), nn.Linear(flat, features), nn.ReLU())

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.conv(x))


class CelebATCDCN(GradSimMixin, L.LightningModule):
    """TCDCN-style multi-task model for CelebA, gated by ``make_gate(method, aux_weight=..., **gate)``.

    Args:
        method: a method name (``gradsim compare --list``), e.g. ``"projection"``.
        aux_weight: lambda, the landmark task's weight.
        gate: other gate arguments (``threshold``, ``main_grad_ema``...).
        lr: Adam's learning rate.
        patience: early stopping after this many validations without a lower main validation loss
            (``0`` disables it).
        image_size: side of the input images.
    """

    def __init__(
        self,
        method: str = "unweighted",
        aux_weight: float = 1.0,
        gate: Mapping[str, Any] | None = None,
        lr: float = 1e-3,
        patience: int = 5,
        image_size: int = 40,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.trunk = TCDCNTrunk(image_size)
        self.main_head = nn.Linear(256, 1)
        self.aux_head = nn.Linear(256, 10)
        self.gradsim = make_gate(method, **{"aux_weight": aux_weight, **dict(gate or {})})
        self.lr = lr
        self.patience = patience
        self.val_acc, self.test_acc = BinaryAccuracy(), BinaryAccuracy()
        self.val_auroc, self.test_auroc = BinaryAUROC(), BinaryAUROC()

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``(attractive logit (N,), landmarks (N, 10))``."""
        h = self.trunk(x)
        return self.main_head(h).squeeze(-1), self.aux_head(h)

    def shared_parameters(self) -> Iterable[Tensor]:
        return self.trunk.parameters()

    def task_losses(self, batch: Any, batch_idx: int) -> dict[str, Tensor]:
        x, attractive, landmarks = batch
        logit, coords = self(x)
        return {
            "main": F.binary_cross_entropy_with_logits(logit, attractive),
            "landmarks": F.mse_loss(coords, landmarks),
        }

    def _evaluate(self, batch: Any, stage: str) -> None:
        x, attractive, landmarks = batch
        logit, coords = self(x)
        acc, auroc = (self.val_acc, self.val_auroc) if stage == "val" else (self.test_acc, self.test_auroc)
        prob = torch.sigmoid(logit)
        acc.update(prob, attractive.long())
        auroc.update(prob, attractive.long())
        main_loss = F.binary_cross_entropy_with_logits(logit, attractive)
        self.log(f"{stage}/loss_main", main_loss, prog_bar=stage == "val", sync_dist=True)
        self.log(f"{stage}/loss_landmarks", F.mse_loss(coords, landmarks), sync_dist=True)
        self.log(f"{stage}/acc", acc, on_epoch=True)
        self.log(f"{stage}/auroc", auroc, on_epoch=True)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self._evaluate(batch, "val")

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self._evaluate(batch, "test")

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.lr)

    def configure_callbacks(self) -> list[Callback]:
        callbacks = list(super().configure_callbacks())
        if self.patience > 0:
            callbacks.append(EarlyStopping(monitor="val/loss_main", mode="min", patience=self.patience))
        return callbacks


def celeba_setup(
    method: str, seed: int, gate: dict[str, Any], **options: Any
) -> tuple[CelebATCDCN, L.LightningDataModule]:
    """Factory of the ``celeba`` setup of ``gradsim compare``.

    Options: ``lam`` (lambda, default 1.0; sweep it with ``variants: {lam: [...]}``), ``lr``
    (1e-3), ``patience`` (5), and those of :class:`~lightning_gradsim.data.celeba.CelebADataModule`
    (``root``, ``subset``, ``batch_size``, ``image_size``, ``num_workers``, ``download``...).
    """
    from ..data.celeba import CelebADataModule

    options = dict(options)
    lam = float(options.pop("lam", gate.get("aux_weight", 1.0)))
    model_kw = {k: options.pop(k) for k in ("lr", "patience") if k in options}
    gate = {k: v for k, v in gate.items() if k != "aux_weight"}
    datamodule = CelebADataModule(seed=seed, **options)
    module = CelebATCDCN(method=method, aux_weight=lam, gate=gate, image_size=datamodule.image_size, **model_kw)
    return module, datamodule
