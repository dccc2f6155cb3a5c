"""The class-pair tasks of paper section 4.1 as in-memory tensors, from ImageNet or MNIST.

Main task "is it class ``a``?", auxiliary task "is it class ``b``?", built by
:class:`~lightning_gradsim.data.ClassPairDataModule` (the same code for ImageNet and MNIST): each
task is its class's training images (label 1) plus as many negatives (label 0) drawn evenly from
the classes that are neither ``a`` nor ``b`` (:func:`~lightning_gradsim.data.balanced_negatives`);
the two tasks have their own images. The main task's test set is built the same way from the
source's test split (ImageNet: its validation folder / file). The images are loaded once into
tensors so that many runs can draw their own batches from them.

MNIST (torchvision layout ``ROOT/MNIST/raw``, gzipped or not): the 60k training file is used for
training if present, else the 10k test file is split once, 8,000 training / 2,000 test images
(seeded), and :func:`load_mnist` says so.

``reference_fraction`` (default 0: none; 0.1, ``lightning_gradsim.data.REFERENCE_FRACTION``,
is ours) holds that part of each class's training images out as the main task's *reference* split
(:attr:`PairData.reference`), built like the main task; neither task trains on it.

Example::

    x_tr, y_tr, x_te, y_te, note = load_mnist("/data/mnist")
    pair = mnist_pair(x_tr, y_tr, x_te, y_te, "4", "9", kind="near")
    pair.main.x.shape, pair.main.y.float().mean()      # (N, 1, 28, 28), 0.5
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, TensorDataset

__all__ = ["TaskTensors", "PairData", "load_mnist", "mnist_pair", "imagenet_pair", "tensorize"]


@dataclass
class TaskTensors:
    """One binary task: images ``x`` ``(N, C, H, W)``, binary labels ``y`` ``(N,)`` and each image's
    source class ``classes`` and index ``source_index`` in its split (for checks)."""

    x: Tensor
    y: Tensor
    classes: np.ndarray
    source_index: np.ndarray

    def __len__(self) -> int:
        return len(self.y)


@dataclass
class PairData:
    """A class pair: ``kind`` (``"near"``/``"far"``), classes, display names, tasks and test set."""

    kind: str
    main_class: str
    aux_class: str
    main_name: str
    aux_name: str
    main: TaskTensors
    aux: TaskTensors
    test: TaskTensors
    #: the main task's held-out reference split (``reference_fraction > 0``), else ``None``.
    reference: TaskTensors | None = None

    @property
    def label(self) -> str:
        return f"{self.main_name} / {self.aux_name}"

    def reference_dataloader(self, batch_size: int = 64, seed: int = 0) -> DataLoader:
        """Shuffled, seeded batches ``(x, y)`` of :attr:`reference` (built with ``reference_fraction > 0``)."""
        if self.reference is None:
            raise ValueError(f"The pair {self.label} has no reference split: build it with reference_fraction > 0.")
        from ..data._common import reference_loader

        return reference_loader(TensorDataset(self.reference.x, self.reference.y), batch_size, 0, seed)


class _TensorImages(Dataset):
    """Images with torchvision-style ``targets`` and ``classes`` (the ``"dataset"`` source)."""

    def __init__(self, x: Tensor, y: Tensor) -> None:
        self.x, self.targets = x, [int(v) for v in y]
        self.classes = [str(i) for i in range(int(y.max()) + 1)]

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        return self.x[i], self.targets[i]


def _has_idx(raw: Path, stem: str) -> bool:
    return any((raw / name).is_file() for name in (stem, stem + ".gz"))


def load_mnist(root: str | Path, split_seed: int = 0) -> tuple[Tensor, Tensor, Tensor, Tensor, str]:
    """``(x_train, y_train, x_test, y_test, note)`` from a torchvision-layout MNIST folder."""
    from ..data._common import seeded_split
    from ..data.digits import load_digits_source

    raw = Path(root) / "MNIST" / "raw"
    x_te, y_te = load_digits_source("mnist", root, mnist_train=False)
    if _has_idx(raw, "train-images-idx3-ubyte") and _has_idx(raw, "train-labels-idx1-ubyte"):
        x_tr, y_tr = load_digits_source("mnist", root, mnist_train=True)
        return (
            x_tr,
            y_tr,
            x_te,
            y_te,
            f"MNIST training file ({len(y_tr)} images) for training, test file ({len(y_te)}) for test",
        )
    test_idx, train_idx = seeded_split(len(y_te), [0.2, 0.8], split_seed)
    note = (
        f"only the 10k MNIST test file is under {raw}: split once (seed {split_seed}) into "
        f"{len(train_idx)} training and {len(test_idx)} test images"
    )
    return x_te[train_idx], y_te[train_idx], x_te[test_idx], y_te[test_idx], note


def tensorize(ds: Dataset) -> TaskTensors:
    """Load a :class:`~lightning_gradsim.data.BinaryTaskDataset` into tensors."""
    items = [ds[i] for i in range(len(ds))]  # type: ignore[arg-type]
    x = torch.stack([it[0] for it in items])
    y = torch.stack([torch.as_tensor(it[1]) for it in items]).long()
    return TaskTensors(x, y, np.asarray(ds.pool.labels[ds.indices]), np.asarray(ds.indices))  # type: ignore[attr-defined]


def _from_datamodule(dm, kind: str, main_name: str, aux_name: str) -> PairData:
    dm.setup("fit")
    return PairData(
        kind,
        dm.main_class,
        dm.aux_class,
        main_name,
        aux_name,
        tensorize(dm.datasets["main"]),
        tensorize(dm.datasets["aux"]),
        tensorize(dm.datasets["test"]),
        tensorize(dm.datasets["reference"]) if "reference" in dm.datasets else None,
    )


def mnist_pair(
    x_train: Tensor,
    y_train: Tensor,
    x_test: Tensor,
    y_test: Tensor,
    a: str,
    b: str,
    kind: str,
    max_per_class: int | None = None,
    split_seed: int = 0,
    reference_fraction: float = 0.0,
) -> PairData:
    """The pair ``(a, b)`` of MNIST digits (as strings, ``"4"``) as tasks (see the module docs)."""
    from ..data.class_pair import ClassPairDataModule

    dm = ClassPairDataModule(
        source="dataset",
        train_dataset=_TensorImages(x_train, y_train),
        test_dataset=_TensorImages(x_test, y_test),
        main_class=a,
        aux_class=b,
        val_fraction=0.0,
        max_per_class=max_per_class,
        split_seed=split_seed,
        reference_fraction=reference_fraction,
    )
    return _from_datamodule(dm, kind, f"digit {a}", f"digit {b}")


def imagenet_pair(
    root: str,
    a: str,
    b: str,
    kind: str,
    source: str = "imagefolder",
    map_file: str | None = None,
    image_size: int = 64,
    max_per_class: int | None = None,
    split_seed: int = 0,
    reference_fraction: float = 0.0,
) -> PairData:
    """An ImageNet pair (WNIDs, indices or names) from the ImageFolder layout or downsampled files."""
    from ..data.class_pair import ClassPairDataModule
    from ..data.imagenet import class_name

    dm = ClassPairDataModule(
        root,
        main_class=a,
        aux_class=b,
        source=source,
        map_file=map_file,
        image_size=image_size,
        val_fraction=0.0,
        max_per_class=max_per_class,
        split_seed=split_seed,
        reference_fraction=reference_fraction,
    )
    return _from_datamodule(dm, kind, class_name(dm.main_class), class_name(dm.aux_class))
