"""Helpers shared by the datamodules: seeded splits, per-task loaders, paths."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Literal

import torch
from lightning.pytorch.utilities import CombinedLoader
from torch.utils.data import DataLoader, Dataset

#: environment variable naming the MNIST folder when no ``root`` is passed.
MNIST_ROOT_ENV = "GRADSIM_MNIST_ROOT"

#: The held-out *reference* split's share of the training images, for the gates that measure the
#: cosine against the main task's gradient on held-out data (issue 23). Ours, not given in the paper;
#: fixed at 10% before any held-out result was seen. The datamodules' default stays 0 (no split).
REFERENCE_FRACTION = 0.1
#: added to ``split_seed`` to seed the reference carve, so it is not the same permutation as a split.
_REFERENCE_SEED_OFFSET = 1_000_003


def check_reference_fraction(fraction: float) -> float:
    """``fraction`` as a float if it is in ``[0, 1)``, else ``ValueError``."""
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"reference_fraction must be in [0, 1), got {fraction}.")
    return float(fraction)


def carve_reference(n: int, fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(keep, reference)``: disjoint positions of ``range(n)``, ``round(fraction * n)`` of them the reference.

    Seeded by ``seed`` (the split seed: the same reference for every training seed); ``keep`` is in
    increasing order, so the kept images keep their order.

    >>> keep, ref = carve_reference(10, 0.2, seed=0)
    >>> len(keep), len(ref), sorted(keep.tolist() + ref.tolist()) == list(range(10))
    (8, 2, True)
    >>> carve_reference(5, 0.0, seed=0)[0].tolist()
    [0, 1, 2, 3, 4]
    """
    n_ref = int(round(check_reference_fraction(fraction) * n))
    if fraction > 0 and not 0 < n_ref < n:
        raise ValueError(f"reference_fraction={fraction} of {n} training images leaves no reference or no training.")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed + _REFERENCE_SEED_OFFSET))
    return perm[n_ref:].sort().values, perm[:n_ref].sort().values


def reference_loader(ds: Dataset, batch_size: int, num_workers: int, seed: int) -> DataLoader:
    """The reference split's loader: shuffled with its own seeded generator, full batches when it can.

    Not sharded under DDP (Lightning adds a ``DistributedSampler`` only to the loaders its hooks return):
    every rank draws the same batches unless the caller shards them.
    """
    return DataLoader(
        ds,
        batch_size=batch_size,
        shuffle=True,
        drop_last=len(ds) > batch_size,  # type: ignore[arg-type]
        num_workers=num_workers,
        persistent_workers=num_workers > 0,
        generator=torch.Generator().manual_seed(seed + _REFERENCE_SEED_OFFSET),
    )


def default_mnist_root() -> Path:
    """The MNIST folder (holding ``MNIST/raw``) named by ``$GRADSIM_MNIST_ROOT``; there is no other default.

    >>> import os
    >>> from unittest import mock
    >>> with mock.patch.dict(os.environ, {"GRADSIM_MNIST_ROOT": "/data/mnist"}):
    ...     default_mnist_root()
    PosixPath('/data/mnist')
    >>> with mock.patch.dict(os.environ, {"GRADSIM_MNIST_ROOT": ""}):
    ...     default_mnist_root()  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ValueError: No MNIST folder given: pass root=... or set the environment variable GRADSIM_MNIST_ROOT ...
    """
    env = os.environ.get(MNIST_ROOT_ENV)
    if not env:
        raise ValueError(
            f"No MNIST folder given: pass root=... (--data.root in gradsim fit, --set root=... in gradsim compare) "
            f"or set the environment variable {MNIST_ROOT_ENV} to a folder holding MNIST/raw. This package never "
            "downloads; to get MNIST there once, use torchvision's own download: "
            "python -c \"from torchvision.datasets import MNIST; MNIST('FOLDER', train=False, download=True)\"."
        )
    return Path(env)


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
    mode: Literal["min_size", "max_size_cycle", "max_size", "sequential"] = "max_size_cycle",
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
