"""Uneven batch counts across the ranks (``use_distributed_sampler=False``, 56 vs 45 items) are refused
before the first step with a message that says what happened and how to fix it (issue 25, item 8), instead
of a gloo "Connection closed by peer" mid-run."""

from __future__ import annotations

import os
import warnings

import pytest
import torch.multiprocessing as mp

from .._spawn import free_port
from ..scale_utils import BatchList, TinyNet, join_as_torchrun, make_batches

pytestmark = pytest.mark.ddp


def worker(rank: int, world: int, port: int, out_dir: str, sizes: list[int]) -> None:
    import lightning as L
    from lightning.pytorch.strategies import DDPStrategy

    join_as_torchrun(rank, world, port)
    batches = make_batches(sizes[rank], 4, seed=rank)  # this rank's own, uneven, list of batches
    trainer = L.Trainer(
        accelerator="cpu",
        devices=world,
        strategy=DDPStrategy(process_group_backend="gloo"),
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        use_distributed_sampler=False,
    )
    model = TinyNet("unweighted", "sgd")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trainer.fit(model, train_dataloaders=BatchList(batches))
        message = f"finished after {trainer.global_step} steps"
    except RuntimeError as err:
        message = f"{type(err).__name__}: {err} | steps {trainer.global_step}"
    with open(os.path.join(out_dir, f"rank{rank}.txt"), "w") as f:
        f.write(message)


@pytest.mark.slow
def test_uneven_batch_counts_are_refused_before_the_first_step(tmp_path):
    mp.spawn(worker, args=(2, free_port(), str(tmp_path), [14, 11]), nprocs=2, join=True)
    for rank in range(2):
        text = (tmp_path / f"rank{rank}.txt").read_text()
        assert "different numbers of training batches per epoch (rank 0: 14, rank 1: 11)" in text, text
        assert "use_distributed_sampler=True" in text and text.endswith("steps 0"), text
