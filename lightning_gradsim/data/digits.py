"""Rotated digits (paper section 4.2, Table 1): main task = digits, auxiliary = rotated digits.

Sources: ``"digits"`` -- scikit-learn's bundled 8x8 digits (1797 images, no download) -- and
``"mnist"`` -- MNIST's IDX files (torchvision layout ``MNIST/raw``, gzipped or not) in a local folder (never
downloaded): ``root``, else ``$GRADSIM_MNIST_ROOT``; ``torchvision.datasets.MNIST(root, download=True)`` fills one.

Protocol: the images are split once (``split_seed``) into train / val / test; the training images
are split again into two disjoint halves, the main task's (as they are) and the auxiliary task's
(rotated by ``angle`` degrees counter-clockwise, same 10 labels). Validation and test are the main
task's, unrotated. Training batches are ``{"main": (x, y), "rotated": (x, y)}``.

With ``reference_fraction > 0`` (``lightning_gradsim.data.REFERENCE_FRACTION``, 10%, is
ours), that part of the training images is held out *before* the halves are made, as the main task's
*reference* split (unrotated, :meth:`RotatedDigitsDataModule.reference_dataloader`): neither task trains on
it, and validation and test are untouched.

>>> from lightning_gradsim.experiments import MultiTaskClassifier
>>> dm = RotatedDigitsDataModule(angle=90, batch_size=32)
>>> model = MultiTaskClassifier(tasks=dm.tasks, backbone="mlp", input_dim=dm.input_dim)
>>> dm.tasks, dm.input_dim
({'main': 10, 'rotated': 10}, 64)
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import lightning as L
import torch
from lightning.pytorch.utilities import CombinedLoader
from torch import Tensor
from torch.utils.data import DataLoader, TensorDataset

from ._common import (
    carve_reference,
    check_reference_fraction,
    default_mnist_root,
    eval_loader,
    reference_loader,
    seeded_split,
    task_loaders,
)

if TYPE_CHECKING:
    import numpy as np

__all__ = ["RotatedDigitsDataModule", "rotate_images", "load_digits_source"]

AUX_TASK = "rotated"


def rotate_images(images: Tensor, angle: float) -> Tensor:
    """Rotate ``(N, C, H, W)`` images by ``angle`` degrees counter-clockwise (exact for multiples of 90)."""
    if angle % 90 == 0:
        return torch.rot90(images, k=int(angle // 90) % 4, dims=(-2, -1)).contiguous()
    from torchvision.transforms.functional import InterpolationMode, rotate

    return rotate(images, float(angle), interpolation=InterpolationMode.BILINEAR)


def load_digits_source(
    source: str = "digits", root: str | Path | None = None, mnist_train: bool = False
) -> tuple[Tensor, Tensor]:
    """Images ``(N, 1, H, W)`` in [0, 1] and labels ``(N,)`` of ``"digits"`` or ``"mnist"``."""
    if source == "digits":
        from sklearn.datasets import load_digits

        bunch = load_digits()
        x = torch.as_tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 16.0
        return x, torch.as_tensor(bunch.target, dtype=torch.long)
    if source == "mnist":
        path = Path(root) if root is not None else default_mnist_root()
        split = "train" if mnist_train else "t10k"
        raw = path / "MNIST" / "raw"
        images, labels = _find_idx(raw, f"{split}-images-idx3-ubyte"), _find_idx(raw, f"{split}-labels-idx1-ubyte")
        if images is None or labels is None:
            raise FileNotFoundError(
                f"No MNIST {split} files under {raw} (expected {split}-images-idx3-ubyte[.gz] and "
                f"{split}-labels-idx1-ubyte[.gz]). Point root= (or $GRADSIM_MNIST_ROOT) at the folder holding "
                "MNIST/raw; nothing is downloaded (torchvision.datasets.MNIST(root, download=True) fetches it)."
            )
        pixels = _read_idx(images)
        return torch.from_numpy(pixels).unsqueeze(1).float() / 255.0, torch.from_numpy(_read_idx(labels)).long()
    raise ValueError(
        f"Unknown digits source {source!r}; choose 'digits' (bundled, 8x8) or 'mnist' (local 28x28 files)."
    )


def _find_idx(folder: Path, stem: str) -> Path | None:
    for name in (stem, stem + ".gz"):
        if (folder / name).is_file():
            return folder / name
    return None


def _read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (MNIST's format), gzipped or not. torchvision's MNIST class insists on all four
    unpacked files, so a read-only folder with only the gzipped test split needs this."""
    import gzip

    import numpy as np

    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    magic = int.from_bytes(data[0:4], "big")
    if magic >> 8 != 0x08:  # 0x08: unsigned byte
        raise ValueError(f"{path} is not an unsigned-byte IDX file (magic {magic:#x}).")
    ndim = magic & 0xFF
    shape = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape).copy()


class RotatedDigitsDataModule(L.LightningDataModule):
    """Digits as the main task and digits rotated by ``angle`` as the auxiliary task.

    Args:
        angle: rotation of the auxiliary task's images, in degrees (the paper uses 0, 45, 90, 135, 180).
        source: ``"digits"`` (scikit-learn, bundled) or ``"mnist"`` (local files under ``root``).
        root: MNIST folder (contains ``MNIST/raw``); default ``$GRADSIM_MNIST_ROOT`` (one of the
            two is required for ``source="mnist"``).
        mnist_train: use MNIST's training split file instead of the 10k test split file.
        val_fraction, test_fraction: parts of the images held out for validation and test.
        main_fraction: part of the remaining training images given to the main task; the rest,
            rotated, is the auxiliary task's (disjoint images).
        max_images: use only this many images of the source (after a seeded shuffle); ``None`` for all.
        batch_size: per task (each step sees ``batch_size`` main and ``batch_size`` auxiliary images).
        split_seed: seed of the splits (fixed across training seeds); seed: seed of the shuffling.
        reference_fraction: part of the training images held out as the main task's reference
            split (seeded by ``split_seed``; both tasks' halves shrink). 0, the default: no
            reference, today's splits exactly.
    """

    def __init__(
        self,
        angle: float = 90.0,
        source: str = "digits",
        root: str | None = None,
        mnist_train: bool = False,
        val_fraction: float = 0.1,
        test_fraction: float = 0.2,
        main_fraction: float = 0.5,
        max_images: int | None = None,
        batch_size: int = 32,
        num_workers: int = 0,
        split_seed: int = 0,
        seed: int = 0,
        reference_fraction: float = 0.0,
    ) -> None:
        super().__init__()
        check_reference_fraction(reference_fraction)
        if not 0.0 < main_fraction < 1.0:
            raise ValueError(f"main_fraction must be in (0, 1) so both tasks get images, got {main_fraction}.")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
        self.save_hyperparameters()
        self.angle = float(angle)
        self.source, self.root, self.mnist_train = source, root, mnist_train
        self.val_fraction, self.test_fraction, self.main_fraction = val_fraction, test_fraction, main_fraction
        self.max_images = max_images
        self.batch_size, self.num_workers = batch_size, num_workers
        self.split_seed, self.seed = split_seed, seed
        self.reference_fraction = float(reference_fraction)
        self.datasets: dict[str, TensorDataset] = {}

    @property
    def tasks(self) -> dict[str, int]:
        """Task name -> number of classes, for :class:`~lightning_gradsim.experiments.MultiTaskClassifier`."""
        return {"main": 10, AUX_TASK: 10}

    @property
    def input_dim(self) -> int:
        return 64 if self.source == "digits" else 784

    def setup(self, stage: str | None = None) -> None:
        if self.datasets:
            return
        x, y = load_digits_source(self.source, self.root, self.mnist_train)
        if self.max_images is not None:
            keep = torch.randperm(len(y), generator=torch.Generator().manual_seed(self.split_seed))[: self.max_images]
            x, y = x[keep], y[keep]
        test_idx, val_idx, train_idx = seeded_split(
            len(y),
            [self.test_fraction, self.val_fraction, 1.0 - self.test_fraction - self.val_fraction],
            self.split_seed,
        )
        ref_idx = None
        if self.reference_fraction > 0:
            keep, ref = carve_reference(len(train_idx), self.reference_fraction, self.split_seed)
            train_idx, ref_idx = train_idx[keep], train_idx[ref]
        n_main = int(round(self.main_fraction * len(train_idx)))
        main_idx, aux_idx = train_idx[:n_main], train_idx[n_main:]
        self.datasets = {
            "main": TensorDataset(x[main_idx], y[main_idx]),
            AUX_TASK: TensorDataset(rotate_images(x[aux_idx], self.angle), y[aux_idx]),
            "val": TensorDataset(x[val_idx], y[val_idx]),
            "test": TensorDataset(x[test_idx], y[test_idx]),
        }
        self.split_indices = {"main": main_idx, AUX_TASK: aux_idx, "val": val_idx, "test": test_idx}
        if ref_idx is not None:
            self.datasets["reference"] = TensorDataset(x[ref_idx], y[ref_idx])
            self.split_indices["reference"] = ref_idx

    def train_dataloader(self) -> CombinedLoader:
        return task_loaders(
            {k: self.datasets[k] for k in ("main", AUX_TASK)}, self.batch_size, self.num_workers, self.seed
        )

    def reference_dataloader(self) -> DataLoader:
        """The main task's held-out reference batches ``(x, y)`` (needs ``reference_fraction > 0``)."""
        if self.reference_fraction <= 0:
            raise ValueError("RotatedDigitsDataModule has no reference split: pass reference_fraction > 0 (e.g. 0.1).")
        self.setup("fit")  # a no-op once set up
        return reference_loader(self.datasets["reference"], self.batch_size, self.num_workers, self.seed)

    def val_dataloader(self) -> DataLoader:
        return eval_loader(self.datasets["val"], 256, self.num_workers)

    def test_dataloader(self) -> DataLoader:
        return eval_loader(self.datasets["test"], 256, self.num_workers)
