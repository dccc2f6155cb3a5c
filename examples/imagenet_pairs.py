"""Your own LightningModule with a gated auxiliary task: the paper's ImageNet class pairs (section 4.1).

Main task: "is it a trimaran?"; auxiliary task: "is it a catamaran?" (a near pair), each a binary
problem with its own images, on a shared timm ResNet-18 trunk with one head per task. The gate keeps
the auxiliary gradient on the trunk only while its cosine with the main one is >= 0.

    python examples/imagenet_pairs.py --root /data/imagenet                            # one GPU (or CPU)
    python examples/imagenet_pairs.py --root /data/imagenet --devices 4 --strategy ddp  # Lightning starts 3 more

``--root`` is an ImageNet folder in the ImageFolder layout (``train/<wnid>/*.JPEG``,
``val/<wnid>/*.JPEG``). Under DDP, Lightning re-runs this same command line for the other
processes; each process reads its own shard of each task's images, and the mixin averages the
per-task gradients over all of them (``gradsim_sync = "global"``: the run equals one process on
the whole batch). What it writes under ``--out``: the checkpoints (best ``val/auroc`` and the last),
``metrics.csv`` with the gate's ``gradsim/*`` metrics next to the losses, and ``gradsim.png``.
"""

from __future__ import annotations

import argparse
from typing import Any

import lightning as L
import timm
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from torch import Tensor, nn
from torchmetrics.classification import BinaryAccuracy, BinaryAUROC

from lightning_gradsim import GradientGate, GradSimMixin, GradSimMonitor
from lightning_gradsim.data import ClassPairDataModule
from lightning_gradsim.data.imagenet import PAIR_PRESETS


class PairClassifier(GradSimMixin, L.LightningModule):
    """A ResNet-18 trunk shared by two binary heads; ``self.gradsim`` gates the auxiliary task's gradient."""

    gradsim_sync_buffers = "broadcast"  # BatchNorm running statistics: rank 0's on every rank, as DDP does

    def __init__(self, lr: float = 1e-3, aux_weight: float = 1.0, threshold: float = 0.0) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.trunk = timm.create_model("resnet18", pretrained=False, num_classes=0)  # features, no classifier
        self.heads = nn.ModuleDict({task: nn.Linear(self.trunk.num_features, 2) for task in ("main", "aux")})
        self.gradsim = GradientGate(rule="unweighted", aux_weight=aux_weight, threshold=threshold)
        self.val_acc, self.val_auroc = BinaryAccuracy(), BinaryAUROC()

    def forward(self, x: Tensor, task: str = "main") -> Tensor:
        return self.heads[task](self.trunk(x))

    def shared_parameters(self) -> Any:
        return self.trunk.parameters()

    def task_losses(self, batch: dict[str, tuple[Tensor, Tensor]], batch_idx: int) -> dict[str, Tensor]:
        # the datamodule's training batches: {"main": (images, labels), "aux": (other images, labels)}
        return {task: F.cross_entropy(self(x, task), y) for task, (x, y) in batch.items()}

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        x, y = batch  # validation is the main task's
        logits = self(x)
        self.val_acc(logits.argmax(-1), y)
        self.val_auroc(logits.softmax(-1)[:, 1], y)
        self.log("val/loss", F.cross_entropy(logits, y), sync_dist=True)
        self.log_dict({"val/acc": self.val_acc, "val/auroc": self.val_auroc}, prog_bar=True)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", required=True, help="ImageNet folder (train/<wnid>/*.JPEG, val/<wnid>/*.JPEG)")
    parser.add_argument("--pair", default="trimaran_catamaran", choices=sorted(PAIR_PRESETS), help="class pair")
    parser.add_argument("--image-size", type=int, default=64, help="side of the square images (paper: 64)")
    parser.add_argument("--batch-size", type=int, default=64, help="per task and per process")
    parser.add_argument("--num-workers", type=int, default=4, help="loader workers per task loader")
    parser.add_argument("--max-per-class", type=int, default=None, help="at most this many images per class")
    parser.add_argument("--max-steps", type=int, default=20000)
    parser.add_argument("--val-every", type=int, default=500, help="validate every N training steps")
    parser.add_argument("--log-every", type=int, default=20, help="log losses and the gate's metrics every N steps")
    parser.add_argument("--lr", type=float, default=1e-3, help="Adam's learning rate")
    parser.add_argument("--aux-weight", type=float, default=1.0, help="lambda of the auxiliary task")
    parser.add_argument("--threshold", type=float, default=0.0, help="the gate's cosine threshold")
    parser.add_argument("--accelerator", default="auto", help="auto, gpu, cpu, ...")
    parser.add_argument("--devices", default="auto", help="devices per node: a number, a list or auto")
    parser.add_argument("--strategy", default="auto", help="auto, ddp, ddp_spawn, ...")
    parser.add_argument("--num-nodes", type=int, default=1)
    parser.add_argument("--precision", default="32-true", help="32-true, 16-mixed, bf16-mixed")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="runs/imagenet_pairs", help="checkpoints, metrics.csv and gradsim.png")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    L.seed_everything(args.seed, workers=True)
    data = ClassPairDataModule(
        args.root,
        pair=args.pair,
        image_size=args.image_size,
        batch_size=args.batch_size,
        num_workers=args.num_workers,
        max_per_class=args.max_per_class,
    )
    model = PairClassifier(lr=args.lr, aux_weight=args.aux_weight, threshold=args.threshold)
    devices = int(args.devices) if args.devices.isdigit() else args.devices
    trainer = L.Trainer(
        accelerator=args.accelerator,
        devices=devices,
        strategy=args.strategy,
        num_nodes=args.num_nodes,
        precision=args.precision,
        max_steps=args.max_steps,
        max_epochs=-1,
        val_check_interval=args.val_every,
        check_val_every_n_epoch=None,
        log_every_n_steps=args.log_every,
        logger=CSVLogger(args.out, name="", version=""),
        callbacks=[
            GradSimMonitor(logging_interval=args.log_every, plot=True),
            ModelCheckpoint(monitor="val/auroc", mode="max", save_last=True),
        ],
    )
    trainer.fit(model, data)


if __name__ == "__main__":
    main()
