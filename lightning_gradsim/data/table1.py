"""Table 1's data (paper section 4.2): images, and the *same* images rotated, as two tasks.

The main task classifies the original images; the auxiliary task classifies all of the same
images rotated by an angle (same labels, same indices). Only the main task is tested.

Sources (nothing is ever downloaded):

* ``"mnist"`` -- MNIST's IDX files in a torchvision folder (``ROOT/MNIST/raw``, gzipped or not).
  With the training file (``train-images-idx3-ubyte``) and the test file (``t10k-...``): the
  paper's 60,000 training / 10,000 test images. With only the 10k test file: it is split
  8,000 training / 2,000 test with a fixed seed, and :attr:`Table1Data.note` says so.
* ``"digits"`` -- scikit-learn's bundled 8x8 digits (1,797 images): a fixed seeded split of
  1,437 training / 360 test images (our choice; the paper uses MNIST).

``reference_fraction > 0`` holds that part of the *training* images out (seeded by ``split_seed``)
as the main task's held-out reference split (:attr:`Table1Data.reference_x`), for the gates that
measure the cosine on held-out data; both tasks then train on the rest (they share images). 10%
(``lightning_gradsim.data.REFERENCE_FRACTION``) is ours, not the paper's. The default, 0,
leaves the data exactly as before.

Example:

>>> data = load_table1_data("digits")
>>> tuple(data.train_x.shape), tuple(data.test_x.shape)
((1437, 1, 8, 8), (360, 1, 8, 8))
>>> held = load_table1_data("digits", reference_fraction=0.1)
>>> len(held.train_y), len(held.reference_y), bool((held.test_x == data.test_x).all())
(1293, 144, True)
>>> views = rotated_views(data.train_x, [0, 90])
>>> tuple(views.shape), bool((views[1, 0] == data.train_x[0, 0].rot90(1).flatten()).all())
((2, 1437, 64), True)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import Tensor
from torch.utils.data import DataLoader, TensorDataset

from ._common import carve_reference, check_reference_fraction, reference_loader
from .digits import load_digits_source, rotate_images

__all__ = [
    "Table1Data",
    "load_table1_data",
    "rotated_views",
    "task_batch",
    "split_test_file",
    "DIGITS_TEST_SIZE",
    "MNIST_10K_TRAIN",
]

#: test images of the bundled digits (the rest, 1,437, are training images).
DIGITS_TEST_SIZE = 360
#: training images when only MNIST's 10k test file is available (the other 2,000 are the test set).
MNIST_10K_TRAIN = 8000


@dataclass(frozen=True)
class Table1Data:
    """Training and test images ``(N, 1, H, W)`` in [0, 1] with labels, and where they come from."""

    train_x: Tensor
    train_y: Tensor
    test_x: Tensor
    test_y: Tensor
    source: str
    #: one line for tables: what the training and test images are.
    description: str
    #: set when the data differs from the paper's (e.g. the 10k file split 8,000/2,000).
    note: str | None = None
    #: the held-out reference split of the training images (``reference_fraction > 0``), else ``None``.
    reference_x: Tensor | None = None
    reference_y: Tensor | None = None

    @property
    def input_dim(self) -> int:
        return int(self.train_x[0].numel())

    def reference_dataloader(self, batch_size: int = 128, seed: int = 0) -> DataLoader:
        """Shuffled, seeded batches ``(x, y)`` of the reference images (unrotated: the main task's)."""
        if self.reference_x is None or self.reference_y is None:
            raise ValueError("This Table1Data has no reference split: load it with reference_fraction > 0.")
        return reference_loader(TensorDataset(self.reference_x, self.reference_y), batch_size, 0, seed)


def split_test_file(n: int, n_train: int, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Fixed, disjoint ``(train_idx, test_idx)`` of ``range(n)``: ``n_train`` and ``n - n_train`` indices.

    >>> tr, te = split_test_file(10, 8, seed=0)
    >>> len(tr), len(te), sorted(tr.tolist() + te.tolist()) == list(range(10))
    (8, 2, True)
    """
    if not 0 < n_train < n:
        raise ValueError(f"n_train must be in (0, {n}), got {n_train}.")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return perm[:n_train].sort().values, perm[n_train:].sort().values


def _has_idx(raw: Path, stem: str) -> bool:
    return any((raw / name).is_file() for name in (stem, stem + ".gz"))


def load_table1_data(
    source: str = "mnist", root: str | Path | None = None, split_seed: int = 0, reference_fraction: float = 0.0
) -> Table1Data:
    """Load Table 1's images from ``source`` (``"mnist"`` needs ``root``; ``"digits"`` is bundled).

    ``split_seed`` fixes the split of the 10k MNIST file (8,000/2,000) and of the digits, and the
    reference split; ``reference_fraction``: part of the training images held out as the reference
    (module docs; 0: none).
    """
    check_reference_fraction(reference_fraction)
    data = _load(source, root, split_seed)
    if reference_fraction == 0:
        return data
    keep, ref = carve_reference(len(data.train_y), reference_fraction, split_seed)
    desc = (
        f"{data.description}; {len(ref):,} of the training images held out as the reference split "
        f"({reference_fraction:.0%}, seed {split_seed}), {len(keep):,} trained on"
    )
    return replace(
        data,
        train_x=data.train_x[keep],
        train_y=data.train_y[keep],
        reference_x=data.train_x[ref],
        reference_y=data.train_y[ref],
        description=desc,
    )


def _load(source: str, root: str | Path | None, split_seed: int) -> Table1Data:
    if source == "digits":
        x, y = load_digits_source("digits")
        train_idx, test_idx = split_test_file(len(y), len(y) - DIGITS_TEST_SIZE, split_seed)
        desc = (
            f"scikit-learn digits (8x8): {len(train_idx):,} training / {len(test_idx):,} test images, "
            f"fixed split (seed {split_seed})"
        )
        note = "bundled 8x8 digits instead of MNIST (the paper's 60,000/10,000 28x28 images)"
        return Table1Data(x[train_idx], y[train_idx], x[test_idx], y[test_idx], "digits", desc, note)
    if source != "mnist":
        raise ValueError(f"Unknown source {source!r}; choose 'mnist' (with --root) or 'digits' (bundled 8x8 digits).")
    if root is None:
        raise ValueError(
            "source 'mnist' needs a folder: pass --root DIR (a torchvision MNIST folder holding MNIST/raw), "
            "or set $GRADSIM_MNIST_ROOT; or use --source digits (bundled, no files needed)."
        )
    raw = Path(root) / "MNIST" / "raw"
    has_test = _has_idx(raw, "t10k-images-idx3-ubyte") and _has_idx(raw, "t10k-labels-idx1-ubyte")
    has_train = _has_idx(raw, "train-images-idx3-ubyte") and _has_idx(raw, "train-labels-idx1-ubyte")
    if not has_test:
        raise FileNotFoundError(
            f"No MNIST test files under {raw} (expected t10k-images-idx3-ubyte[.gz] and t10k-labels-idx1-ubyte[.gz]"
            + (", the training files alone are not enough" if has_train else "")
            + "). Point --root at the folder holding MNIST/raw; nothing is downloaded."
        )
    test_x, test_y = load_digits_source("mnist", root, mnist_train=False)
    if has_train:
        train_x, train_y = load_digits_source("mnist", root, mnist_train=True)
        desc = f"MNIST: {len(train_y):,} training / {len(test_y):,} test images (the paper's split)"
        return Table1Data(train_x, train_y, test_x, test_y, "mnist", desc, None)
    train_idx, test_idx = split_test_file(len(test_y), MNIST_10K_TRAIN, split_seed)
    desc = (
        f"MNIST's 10k test file only: split {len(train_idx):,} training / {len(test_idx):,} test images "
        f"(fixed seed {split_seed})"
    )
    note = (
        f"only MNIST's 10k test file was found under {raw}: it is split {len(train_idx):,}/{len(test_idx):,} "
        "(not the paper's 60,000 training / 10,000 test images)"
    )
    return Table1Data(test_x[train_idx], test_y[train_idx], test_x[test_idx], test_y[test_idx], "mnist", desc, note)


def rotated_views(images: Tensor, angles: Sequence[float]) -> Tensor:
    """``(A, N, H*W)``: ``images`` ``(N, 1, H, W)`` rotated counter-clockwise by each angle, flattened.

    Multiples of 90 degrees are exact (``torch.rot90``); other angles are bilinear with zero fill
    (:func:`~lightning_gradsim.data.digits.rotate_images`).
    """
    n = images.shape[0]
    return torch.stack([rotate_images(images, float(a)).reshape(n, -1) for a in angles])


def task_batch(
    views: Tensor, labels: Tensor, task_view: Tensor, idx: Tensor, out: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Every run's batch of every task: ``x`` ``(R, T, B, D)`` and ``y`` ``(R, T, B)``.

    ``views``: ``(V, N, D)`` from :func:`rotated_views`; ``task_view``: ``(R, T)`` which view each
    run's task reads; ``idx``: ``(R, B)`` each run's image indices. Every task of a run sees the
    same images (and labels), each in its own view. ``out``: an ``(R, T, B, D)`` buffer to fill.

    >>> views = torch.arange(12.0).view(2, 3, 2)            # 2 views of 3 images
    >>> x, y = task_batch(views, torch.tensor([7, 8, 9]), torch.tensor([[0, 1]]), torch.tensor([[2, 0]]))
    >>> x[0, 0].tolist(), x[0, 1].tolist(), y.tolist()
    ([[4.0, 5.0], [0.0, 1.0]], [[10.0, 11.0], [6.0, 7.0]], [[[9, 7], [9, 7]]])
    """
    num_views, n, d = views.shape
    r, t = task_view.shape
    flat = (task_view.unsqueeze(-1) * n + idx.unsqueeze(1)).reshape(-1)
    target = None if out is None else out.view(-1, d)
    x = (
        torch.index_select(views.reshape(num_views * n, d), 0, flat, out=target)
        if target is not None
        else views.reshape(num_views * n, d)[flat]
    )
    y = labels[idx].unsqueeze(1).expand(-1, t, -1)
    return x.view(r, t, idx.shape[1], d), y
