"""A callback the launch tests append to a user's config: what each process was and what data it saw.

Added on the command line (``--trainer.callbacks+={"class_path": "tests._launch_probe.ShardProbe", ...}``),
it writes ``<folder>/<fit|validate|test>_rank<R>.json`` per process: the rank, world size and node,
the sampler of every loader with the dataset indices it yields to this process, whether the first
training batch is exactly those indices' items, and a checksum of the weights after training.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader


def _loaders(obj: Any) -> dict[str, DataLoader]:
    if isinstance(obj, DataLoader):
        return {"0": obj}
    if isinstance(obj, dict):
        return dict(obj)
    if isinstance(obj, (list, tuple)):
        return {str(i): dl for i, dl in enumerate(obj)}
    return {}


def _describe(loader: DataLoader) -> dict[str, Any]:
    sampler = loader.sampler
    return {
        "sampler": type(sampler).__name__,
        "num_replicas": getattr(sampler, "num_replicas", None),
        "sampler_rank": getattr(sampler, "rank", None),
        "dataset_len": len(loader.dataset),  # type: ignore[arg-type]
        "indices": [int(i) for i in sampler],  # this epoch's order (DistributedSampler: set_epoch(0) is the default)
    }


class ShardProbe(L.Callback):
    """Writes what this process is and which items of each task's dataset it iterates (see module docs)."""

    def __init__(self, folder: str) -> None:
        self.folder = Path(folder)
        self.record: dict[str, Any] = {}

    def _identity(self, trainer: L.Trainer) -> dict[str, Any]:
        dist = torch.distributed
        return {
            "pid": os.getpid(),
            "global_rank": trainer.global_rank,
            "local_rank": trainer.local_rank,
            "node_rank": trainer.node_rank,
            "world_size": trainer.world_size,
            "num_nodes": trainer.num_nodes,
            "dist_world_size": dist.get_world_size() if dist.is_available() and dist.is_initialized() else None,
            "strategy": type(trainer.strategy).__name__,
            "precision": str(trainer.precision),
            "launcher": type(trainer.strategy.launcher).__name__ if trainer.strategy.launcher is not None else None,
            "cluster_environment": type(getattr(trainer.strategy, "cluster_environment", None)).__name__,
        }

    def _write(self, trainer: L.Trainer) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / f"{trainer.state.fn.value}_rank{trainer.global_rank}.json"
        path.write_text(json.dumps({**self._identity(trainer), **self.record}))

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.record["train"] = {task: _describe(dl) for task, dl in _loaders(trainer.train_dataloader).items()}

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if batch_idx != 0:
            return
        matches = {}
        for task, (x, _) in batch.items():
            loader = _loaders(trainer.train_dataloader)[task]
            first = self.record["train"][task]["indices"][: len(x)]
            expected = torch.stack([loader.dataset[i][0] for i in first])
            matches[task] = bool(torch.equal(expected, x.cpu()))
        self.record["first_batch_is_shard"] = matches

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        flat = torch.cat([p.detach().double().flatten().cpu() for p in pl_module.parameters()])
        self.record["weights"] = [float(flat.sum()), float(flat.abs().sum()), float((flat * flat).sum())]
        self.record["global_step"] = trainer.global_step
        self._write(trainer)

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.state.fn.value == "validate":
            self.record["val"] = {k: _describe(dl) for k, dl in _loaders(trainer.val_dataloaders).items()}
            self._write(trainer)

    def on_test_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.record["test"] = {k: _describe(dl) for k, dl in _loaders(trainer.test_dataloaders).items()}
        self._write(trainer)
