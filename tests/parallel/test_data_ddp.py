"""Under DDP every rank sees its own shard of every task (two CPU processes, gloo)."""

from __future__ import annotations

import lightning as L
import pytest
import torch

from lightning_gradsim.data import RotatedDigitsDataModule
from lightning_gradsim.experiments import MultiTaskClassifier


class _RecordBatches(L.Callback):
    def __init__(self, folder: str) -> None:
        self.folder = folder

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        # fingerprint of every image: its pixel values
        rows = {
            task: [tuple((row * 16).round().int().tolist()) for row in x.flatten(1)] for task, (x, _) in batch.items()
        }
        torch.save(rows, f"{self.folder}/rank{trainer.global_rank}_{batch_idx}.pt")


@pytest.mark.slow
@pytest.mark.ddp
def test_each_rank_gets_its_own_shard(tmp_path):
    dm = RotatedDigitsDataModule(angle=90, batch_size=64)
    model = MultiTaskClassifier(tasks=dm.tasks, input_dim=64, method="unweighted")
    trainer = L.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp_spawn",
        max_steps=2,
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[_RecordBatches(str(tmp_path))],
    )
    trainer.fit(model, datamodule=dm)
    seen = {r: [torch.load(tmp_path / f"rank{r}_{i}.pt") for i in range(2)] for r in (0, 1)}
    for task in ("main", "rotated"):
        rank0 = {v for b in seen[0] for v in b[task]}
        rank1 = {v for b in seen[1] for v in b[task]}
        assert len(rank0) > 64 and len(rank1) > 64
        assert not rank0 & rank1  # disjoint shards
