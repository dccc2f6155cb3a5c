"""``ClassPairDataModule``: the paper's class-pair tasks -- main "is it class a?", auxiliary "is it class b?".

Each task is a binary problem of its own: the class's images (positives) against a balanced,
seeded sample of the *other* classes (negatives; by default neither ``a`` nor ``b``, so the two tasks
differ only in their positive class). Training batches are ``{"main": (x, y), "aux": (x, y)}``,
with different images per task, as in the paper. Validation is carved per class out of the source's
training split (``val_fraction``, seeded by ``split_seed``); test is the source's validation split;
no image is in two splits. Validation and test are the main task's.

With ``reference_fraction > 0`` (``lightning_gradsim.data.REFERENCE_FRACTION``, 10%, is
ours), that part of each class's training images (after validation is carved) is held out before
the tasks are built: the main task's *reference* split (its class against balanced negatives, as
the main task; :meth:`ClassPairDataModule.reference_dataloader`), on which neither task trains.

Sources (``source=``):

* ``"imagefolder"`` -- ``root/train/<wnid>/*.JPEG`` and ``root/val/<wnid>/*.JPEG``;
* ``"downsampled"`` -- downsampled ImageNet (``train_data_batch_1..10``, ``val_data``) plus the
  devkit's ``map_clsloc.txt`` or ``meta.mat`` as ``map_file`` (labels are 1-based in that file's
  order; never assumed). To keep memory small, only classes ``a`` and ``b`` and a few seeded images
  per other class and file are kept;
* ``"dataset"`` -- any labelled datasets given as ``train_dataset`` / ``test_dataset`` with
  torchvision-style ``targets`` and ``classes``; classes are then named as in ``classes``.

Classes are named by WNID, by index (sorted-WNID order) or by name (see
:func:`~lightning_gradsim.data.imagenet.resolve_class`), or as a preset ``pair=`` from
:data:`~lightning_gradsim.data.imagenet.PAIR_PRESETS`. Works with ``num_workers`` and under DDP
(Lightning gives each task's loader a ``DistributedSampler``: every rank its own shard).

Example::

    dm = ClassPairDataModule("/data/imagenet", pair="trimaran_catamaran", image_size=64)
    model = MultiTaskClassifier(tasks=dm.tasks, backbone="resnetv2_18")
"""

from __future__ import annotations

import math
import os
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.utilities import CombinedLoader
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from ._common import check_reference_fraction, eval_loader, reference_loader, task_loaders
from .imagenet import PAIR_PRESETS, DownsampledImageNet, resolve_class, scan_image_folder

__all__ = ["ClassPairDataModule", "BinaryTaskDataset", "balanced_negatives"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def balanced_negatives(labels: np.ndarray, candidates: np.ndarray, exclude: set[Any], n: int, seed: int) -> np.ndarray:
    """``n`` indices from ``candidates`` whose label is not in ``exclude``, spread evenly over classes.

    Round-robin over the classes (in a seeded order), each class's images in a seeded order, so every
    class contributes ``n // C`` or one more image unless it runs out (then others fill in).
    """
    rng = np.random.default_rng(seed)
    cand = candidates[~np.isin(labels[candidates], list(exclude))] if exclude else candidates
    if n <= 0 or len(cand) == 0:
        return cand[:0]
    cand = cand[rng.permutation(len(cand))]
    classes, inverse = np.unique(labels[cand], return_inverse=True)
    class_rank = rng.permutation(len(classes))[inverse]
    order = np.argsort(inverse, kind="stable")
    within = np.empty(len(cand), np.int64)
    counts = np.bincount(inverse)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    within[order] = np.arange(len(cand)) - np.repeat(starts, counts)
    pick = np.lexsort((class_rank, within))[: min(n, len(cand))]
    return np.sort(cand[pick])


#: The label given to an image file that cannot be decoded: no task draws it (see ``_Pool.unreadable``).
#: Empty: no class is named so, and it fits the fixed-width string array of the labels.
UNREADABLE = ""


class _Pool:
    """Images of one source split with a label per image."""

    labels: np.ndarray

    def load(self, index: int) -> Tensor:  # (3, H, W) float in [0, 1]
        raise NotImplementedError

    def unreadable(self, indices: np.ndarray) -> list[int]:
        """Those of ``indices`` whose image cannot be decoded (none: the data are in memory)."""
        return []


class _FolderPool(_Pool):
    def __init__(self, root: str, image_size: int) -> None:
        self.paths, labels = scan_image_folder(root)
        self.labels = np.asarray(labels)
        self.image_size = image_size
        self._checked: set[int] = set()

    def unreadable(self, indices: np.ndarray) -> list[int]:
        """Decode each file once, at the reduced size JPEG allows (``draft``: a fraction of a full decode),
        so that a garbage or truncated file is found at setup and never in the middle of an epoch."""
        from PIL import Image

        bad = []
        for i in (int(i) for i in indices):
            if i in self._checked:
                continue
            self._checked.add(i)
            try:
                with Image.open(self.paths[i]) as img:
                    img.draft("RGB", (self.image_size, self.image_size))
                    img.load()
            except (OSError, SyntaxError, ValueError, Image.DecompressionBombError):
                bad.append(i)
        return bad

    def load(self, index: int) -> Tensor:
        from PIL import Image
        from torchvision.transforms.functional import center_crop, pil_to_tensor, resize

        with Image.open(self.paths[index]) as img:
            x = pil_to_tensor(img.convert("RGB"))
        x = center_crop(resize(x, self.image_size, antialias=True), [self.image_size, self.image_size])
        return x.float() / 255.0


class _ArrayPool(_Pool):
    def __init__(self, data: np.ndarray, labels: np.ndarray, image_size: int) -> None:
        self.data, self.labels, self.image_size = data, labels, image_size

    def load(self, index: int) -> Tensor:
        x = torch.from_numpy(np.ascontiguousarray(self.data[index])).float() / 255.0
        if x.shape[-1] != self.image_size:
            from torchvision.transforms.functional import resize

            x = resize(x, [self.image_size, self.image_size], antialias=True)
        return x


class _DatasetPool(_Pool):
    def __init__(self, dataset: Any) -> None:
        if not hasattr(dataset, "targets") or not hasattr(dataset, "classes"):
            raise TypeError(
                f"{type(dataset).__name__} needs torchvision-style `targets` and `classes` attributes to be used "
                "as a class-pair source."
            )
        self.dataset = dataset
        classes = list(dataset.classes)
        self.labels = np.asarray([str(classes[int(t)]) for t in dataset.targets])

    def load(self, index: int) -> Tensor:
        x = self.dataset[index][0]
        if not isinstance(x, Tensor):
            from torchvision.transforms.functional import pil_to_tensor

            x = pil_to_tensor(x.convert("RGB")).float() / 255.0
        return x


class BinaryTaskDataset(Dataset):
    """``(normalised image, 1 if its class is positive else 0)`` for the given pool indices."""

    def __init__(self, pool: _Pool, indices: np.ndarray, positive: str, normalize: bool = True) -> None:
        self.pool, self.indices, self.positive, self.normalize = pool, np.asarray(indices), positive, normalize
        self.targets = (pool.labels[self.indices] == positive).astype(np.int64)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        x = self.pool.load(int(self.indices[i]))
        if self.normalize and x.shape[0] == 3:
            mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
            std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
            x = (x - mean) / std
        return x, torch.tensor(self.targets[i])


class ClassPairDataModule(L.LightningDataModule):
    """Two binary tasks from a labelled image dataset: main "is it ``main_class``?", aux "is it ``aux_class``?".

    Args:
        root: dataset folder (ImageFolder root with ``train``/``val``, or the downsampled files' folder).
        main_class, aux_class: WNID, index or name (see module docs); ignored when ``pair`` is given.
        pair: a preset of :data:`~lightning_gradsim.data.imagenet.PAIR_PRESETS`, e.g. ``"trimaran_catamaran"``.
        source: ``"imagefolder"``, ``"downsampled"`` or ``"dataset"``.
        map_file: ``map_clsloc.txt`` or ``meta.mat`` (required for ``"downsampled"``).
        train_dataset, test_dataset: labelled datasets for ``source="dataset"``.
        train_dir, test_dir: sub-folders of ``root`` for the ImageFolder layout.
        image_size: side of the (square) images fed to the network.
        negative_ratio: negatives per positive in every task and split.
        exclude_pair_from_negatives: draw negatives from classes other than ``a`` and ``b``.
        val_fraction: part of each class's training images held out for validation (0: no validation).
        max_per_class: use at most this many images per class (seeded), for quick runs.
        batch_size: per task; num_workers: loader workers per task loader.
        split_seed: seed of splits and negative samples; seed: seed of the shuffling.
        reference_fraction: part of each class's training images held out as the main task's
            reference split (seeded by ``split_seed``). 0, the default: none, today's splits exactly.
    """

    def __init__(
        self,
        root: str | None = None,
        main_class: str | int = "n04483307",
        aux_class: str | int = "n02981792",
        pair: str | None = None,
        source: str = "imagefolder",
        map_file: str | None = None,
        train_dataset: Any = None,
        test_dataset: Any = None,
        train_dir: str = "train",
        test_dir: str = "val",
        image_size: int = 64,
        negative_ratio: float = 1.0,
        exclude_pair_from_negatives: bool = True,
        val_fraction: float = 0.1,
        max_per_class: int | None = None,
        batch_size: int = 64,
        num_workers: int = 0,
        split_seed: int = 0,
        seed: int = 0,
        reference_fraction: float = 0.0,
    ) -> None:
        super().__init__()
        check_reference_fraction(reference_fraction)
        if source not in {"imagefolder", "downsampled", "dataset"}:
            raise ValueError(f"source must be 'imagefolder', 'downsampled' or 'dataset', got {source!r}.")
        if source != "dataset" and root is None:
            raise ValueError(f"source={source!r} needs root=<dataset folder>.")
        if source == "downsampled" and map_file is None:
            raise ValueError(
                "source='downsampled' needs map_file=<map_clsloc.txt or meta.mat>: its 1-based labels follow the "
                "ILSVRC devkit's order (kit fox = 1), not the sorted-WNID order."
            )
        if source == "dataset" and (train_dataset is None or test_dataset is None):
            raise ValueError("source='dataset' needs train_dataset= and test_dataset= (with targets and classes).")
        if pair is not None:
            if pair not in PAIR_PRESETS:
                raise ValueError(f"Unknown pair preset {pair!r}; choose from {', '.join(PAIR_PRESETS)}.")
            main_class, aux_class = PAIR_PRESETS[pair][:2]
        resolve = (lambda c: str(c)) if source == "dataset" else resolve_class
        self.main_class, self.aux_class = resolve(main_class), resolve(aux_class)
        if self.main_class == self.aux_class:
            raise ValueError(f"main_class and aux_class are the same class ({self.main_class}); pick two classes.")
        if not 0.0 <= val_fraction < 1.0 or negative_ratio <= 0:
            raise ValueError(
                f"Need 0 <= val_fraction < 1 and negative_ratio > 0; got {val_fraction}, {negative_ratio}."
            )
        self.save_hyperparameters(ignore=["train_dataset", "test_dataset"])
        self.root, self.source, self.map_file = root, source, map_file
        self.train_dataset, self.test_dataset = train_dataset, test_dataset
        self.train_dir, self.test_dir = train_dir, test_dir
        self.image_size, self.negative_ratio = image_size, negative_ratio
        self.exclude_pair = exclude_pair_from_negatives
        self.val_fraction, self.max_per_class = val_fraction, max_per_class
        self.batch_size, self.num_workers = batch_size, num_workers
        self.split_seed, self.seed = split_seed, seed
        self.reference_fraction = float(reference_fraction)
        self.datasets: dict[str, BinaryTaskDataset] = {}
        #: image files found unreadable at setup and skipped (the tasks drew other images instead)
        self.skipped_files: list[str] = []

    @property
    def tasks(self) -> dict[str, int]:
        return {"main": 2, "aux": 2}

    # ------------------------------------------------------------------ building
    def _pools(self) -> tuple[_Pool, _Pool]:
        if self.source == "imagefolder":
            root = str(self.root)
            return (
                _FolderPool(os.path.join(root, self.train_dir), self.image_size),
                _FolderPool(os.path.join(root, self.test_dir), self.image_size),
            )
        if self.source == "dataset":
            return _DatasetPool(self.train_dataset), _DatasetPool(self.test_dataset)
        pair = {self.main_class, self.aux_class}
        cap = 2 + math.ceil(self.negative_ratio)
        if self.max_per_class is not None:
            cap = min(cap, self.max_per_class)
        rng = np.random.default_rng(self.split_seed)

        def keep(wnids: np.ndarray) -> np.ndarray:
            # every image of a and b; `cap` seeded images of each other class per file
            mask = np.isin(wnids, list(pair))
            order = rng.permutation(len(wnids))
            seen: dict[str, int] = {}
            for i in order:
                w = wnids[i]
                if not mask[i] and seen.get(w, 0) < cap:
                    seen[w] = seen.get(w, 0) + 1
                    mask[i] = True
            return mask

        pools = []
        for split in ("train", "val"):
            ds = DownsampledImageNet(str(self.root), split, str(self.map_file), keep=keep)
            pools.append(_ArrayPool(ds.data, ds.wnids, self.image_size))
        return pools[0], pools[1]

    def _cap(self, labels: np.ndarray, seed: int) -> np.ndarray:
        idx = np.arange(len(labels))
        if self.max_per_class is None:
            return idx
        rng = np.random.default_rng(seed)
        kept = [rng.permutation(idx[labels == c])[: self.max_per_class] for c in np.unique(labels)]
        return np.sort(np.concatenate(kept))

    def _task(self, pool: _Pool, candidates: np.ndarray, positive: str, seed: int) -> BinaryTaskDataset:
        """The task's images, every one decodable: an unreadable file is labelled ``UNREADABLE`` (so that no
        task draws it) and the draw is made again; counted in ``self.skipped_files``."""
        while True:
            task = self._draw_task(pool, candidates, positive, seed)
            bad = pool.unreadable(task.indices)
            if not bad:
                return task
            pool.labels[bad] = UNREADABLE
            paths = getattr(pool, "paths", None)
            self.skipped_files += [paths[i] if paths is not None else str(i) for i in bad]

    def _draw_task(self, pool: _Pool, candidates: np.ndarray, positive: str, seed: int) -> BinaryTaskDataset:
        positives = candidates[pool.labels[candidates] == positive]
        if len(positives) == 0:
            raise ValueError(
                f"No image of class {positive} in this split of {self.root or 'the dataset'}; check the class "
                f"(WNID/name) and that the folder or label map holds it."
            )
        exclude = {self.main_class, self.aux_class} if self.exclude_pair else {positive}
        exclude.add(UNREADABLE)
        n_neg = int(round(self.negative_ratio * len(positives)))
        negatives = balanced_negatives(pool.labels, candidates, exclude, n_neg, seed)
        if len(negatives) == 0:
            raise ValueError(f"No negative images for class {positive}: the source holds no other class.")
        return BinaryTaskDataset(pool, np.sort(np.concatenate([positives, negatives])), positive)

    def setup(self, stage: str | None = None) -> None:
        if self.datasets:
            return
        self.skipped_files = []
        train_pool, test_pool = self._pools()
        train_all = self._cap(train_pool.labels, self.split_seed)
        rng = np.random.default_rng(self.split_seed + 1)
        val_parts, ref_parts, train_parts = [], [], []
        for c in np.unique(train_pool.labels[train_all]):
            members = rng.permutation(train_all[train_pool.labels[train_all] == c])
            n_val = int(round(self.val_fraction * len(members)))
            n_ref = int(round(self.reference_fraction * (len(members) - n_val)))
            val_parts.append(members[:n_val])
            ref_parts.append(members[n_val : n_val + n_ref])
            train_parts.append(members[n_val + n_ref :])
        train_idx = np.sort(np.concatenate(train_parts))
        ref_idx = np.sort(np.concatenate(ref_parts))
        val_idx = np.sort(np.concatenate(val_parts))
        test_idx = self._cap(test_pool.labels, self.split_seed + 2)
        s = self.split_seed * 1000
        self.datasets = {
            "main": self._task(train_pool, train_idx, self.main_class, s + 11),
            "aux": self._task(train_pool, train_idx, self.aux_class, s + 13),
            "test": self._task(test_pool, test_idx, self.main_class, s + 19),
        }
        if len(val_idx):
            self.datasets["val"] = self._task(train_pool, val_idx, self.main_class, s + 17)
        if self.reference_fraction > 0:
            self.datasets["reference"] = self._task(train_pool, ref_idx, self.main_class, s + 23)
        if self.skipped_files:
            from lightning.pytorch.utilities import rank_zero_warn

            rank_zero_warn(
                f"ClassPairDataModule: {len(self.skipped_files)} image file(s) under {self.root} cannot be decoded "
                f"and are skipped (e.g. {self.skipped_files[0]}); the tasks drew other images in their place. "
                "The full list is in `datamodule.skipped_files`."
            )

    def train_dataloader(self) -> CombinedLoader:
        return task_loaders(
            {k: self.datasets[k] for k in ("main", "aux")}, self.batch_size, self.num_workers, self.seed
        )

    def reference_dataloader(self) -> DataLoader:
        """The main task's held-out reference batches ``(x, y)`` (needs ``reference_fraction > 0``)."""
        if self.reference_fraction <= 0:
            raise ValueError("ClassPairDataModule has no reference split: pass reference_fraction > 0 (e.g. 0.1).")
        self.setup("fit")  # a no-op once set up
        return reference_loader(self.datasets["reference"], self.batch_size, self.num_workers, self.seed)

    def val_dataloader(self) -> DataLoader | list[DataLoader]:
        if "val" not in self.datasets:  # val_fraction=0: no validation
            return []
        return eval_loader(self.datasets["val"], self.batch_size, self.num_workers)

    def test_dataloader(self) -> DataLoader:
        return eval_loader(self.datasets["test"], self.batch_size, self.num_workers)
