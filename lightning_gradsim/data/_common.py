"""Helpers shared by the datamodules: seeded splits, per-task loaders, paths."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from lightning.pytorch.utilities import CombinedLoader
from torch.utils.data import DataLoader, Dataset

REPO_ROOT = Path(__file__).resolve().parents[2]


def default_mnist_root() -> Path:
    """``$GRADSIM_MNIST_ROOT``, else ``<repo>/../shared/data/mnist`` (holds the real MNIST test split)."""
    env = os.environ.get("GRADSIM_MNIST_ROOT")
    return Path(env) if env else (REPO_ROOT / ".." / "shared" / "data" / "mnist").resolve()


def seeded_split(n: int, fractions: Sequence[float], seed: int) -> list[torch.Tensor]:
    """Disjoint random index sets of sizes ``round(f * n)`` (the last takes the rest)."""
    if any(f < 0 for f in fractions) or sum(fractions) > 1 + 1e-9:
        raise ValueError(f"Split fractions must be non-negative and sum to at most 1, got {list(fractions)}.")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    out, start = [], 0
    for i, f in enumerate(fractions):
        size = n - start if i == len(fractions) - 1 and sum(fractions) > 1 - 1e-9 else int(round(f * n))
        out.append(perm[start : start + size])
        start += size
    return out


def task_loaders(
    datasets: Mapping[str, Dataset],
    batch_size: int,
    num_workers: int,
    seed: int,
    mode: str = "max_size_cycle",
) -> CombinedLoader:
    """One shuffled, seeded loader per task, iterated together: batches are ``{task: batch}``.

    Lightning replaces each loader's sampler with a ``DistributedSampler`` under DDP, so every rank
    sees its own shard of every task.
    """
    loaders = {
        name: DataLoader(
            ds,
            batch_size=batch_size,
            shuffle=True,
            drop_last=len(ds) > batch_size,  # type: ignore[arg-type]
            num_workers=num_workers,
            persistent_workers=num_workers > 0,
            generator=torch.Generator().manual_seed(seed + 7919 * i),
        )
        for i, (name, ds) in enumerate(datasets.items())
    }
    return CombinedLoader(loaders, mode=mode)


def eval_loader(ds: Dataset, batch_size: int, num_workers: int) -> DataLoader:
    return DataLoader(
        ds, batch_size=batch_size, shuffle=False, num_workers=num_workers, persistent_workers=num_workers > 0
    )
