"""CelebA for the projection blog's second experiment: "Attractive" + 5 facial landmarks.

Reads the user's copy of CelebA in torchvision's layout (``<root>/celeba/`` or ``<root>`` itself
holding ``img_align_celeba/``, ``list_attr_celeba.txt``, ``list_landmarks_align_celeba.txt`` and
``list_eval_partition.txt``). Nothing is downloaded unless ``download=True``, which calls
torchvision's ``CelebA(download=True)`` on your machine (Google Drive; it may hit quota limits).

Each item is ``(image, attractive, landmarks)``: the aligned image as a ``(1, size, size)``
grey-scale tensor in [0, 1] (40 x 40 as in the blog), the "Attractive" attribute as a float 0/1,
and the 5 landmarks (left eye, right eye, nose, left and right mouth corner; x then y) rescaled
with the image: ``x * size / width``, ``y * size / height``, then divided by ``size`` when
``normalize_landmarks`` (default) so coordinates are in [0, 1].

Example::

    dm = CelebADataModule(root="~/data", subset=10000, batch_size=64)
    dm.setup("fit")
    image, attractive, landmarks = dm.train_set[0]   # (1, 40, 40), (), (10,)
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import lightning as L
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

__all__ = [
    "CelebAMultiTask",
    "CelebADataModule",
    "find_celeba_folder",
    "read_celeba_table",
    "CELEBA_FILES",
    "SPLITS",
    "LANDMARK_NAMES",
]

CELEBA_FILES = ("list_attr_celeba.txt", "list_landmarks_align_celeba.txt", "list_eval_partition.txt")
SPLITS = {"train": 0, "valid": 1, "test": 2}
LANDMARK_NAMES = (
    "lefteye_x",
    "lefteye_y",
    "righteye_x",
    "righteye_y",
    "nose_x",
    "nose_y",
    "leftmouth_x",
    "leftmouth_y",
    "rightmouth_x",
    "rightmouth_y",
)


def find_celeba_folder(root: str | os.PathLike) -> Path:
    """The folder holding CelebA's files: ``root/celeba`` (torchvision's layout) or ``root``."""
    root = Path(os.path.expanduser(str(root)))
    for folder in (root / "celeba", root):
        if all((folder / f).is_file() for f in CELEBA_FILES) and (folder / "img_align_celeba").is_dir():
            return folder
    missing = [
        f
        for f in (*CELEBA_FILES, "img_align_celeba/")
        if not (root / "celeba" / f).exists() and not (root / f).exists()
    ]
    raise FileNotFoundError(
        f"No CelebA copy under {root} (missing {', '.join(missing)}). Point root at the folder that holds "
        "img_align_celeba/ and the list_*.txt files (or its parent, torchvision's layout), or pass "
        "download=True to let torchvision download it on this machine."
    )


def read_celeba_table(path: str | os.PathLike, header: bool = True) -> tuple[list[str], list[str], Tensor]:
    """Parse a CelebA ``list_*.txt`` file: (column names, image file names, integer values).

    With ``header`` the file starts with the row count and a line of column names (attributes,
    landmarks); ``list_eval_partition.txt`` has neither.
    """
    with open(path) as f:
        lines = [line.split() for line in f if line.strip()]
    columns: list[str] = []
    if header:
        columns, lines = lines[1], lines[2:]
    names = [row[0] for row in lines]
    values = torch.tensor([[int(v) for v in row[1:]] for row in lines], dtype=torch.long)
    if columns and values.shape[1] != len(columns):
        raise ValueError(f"{path}: {len(columns)} column names but {values.shape[1]} values per row.")
    return columns, names, values


class CelebAMultiTask(Dataset):
    """One split of CelebA as ``(image, attractive, landmarks)`` items (see the module docstring).

    Args:
        root: the user's CelebA folder (or its parent).
        split: ``"train"``, ``"valid"`` or ``"test"`` (the official partition).
        image_size: side of the square grey-scale image (40 in the blog).
        subset: keep this many images of the split (a seeded random subset); ``None`` keeps all.
        seed: seed of the subset.
        attribute: the main task's attribute (``"Attractive"``).
        normalize_landmarks: divide the rescaled coordinates by ``image_size``.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        split: str = "train",
        image_size: int = 40,
        subset: int | None = None,
        seed: int = 0,
        attribute: str = "Attractive",
        normalize_landmarks: bool = True,
    ) -> None:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {list(SPLITS)}, got {split!r}.")
        if image_size < 1:
            raise ValueError(f"image_size must be positive, got {image_size}.")
        self.folder = find_celeba_folder(root)
        self.image_size = int(image_size)
        self.normalize_landmarks = bool(normalize_landmarks)
        _, part_names, part = read_celeba_table(self.folder / "list_eval_partition.txt", header=False)
        attr_cols, attr_names, attrs = read_celeba_table(self.folder / "list_attr_celeba.txt")
        lm_cols, lm_names, landmarks = read_celeba_table(self.folder / "list_landmarks_align_celeba.txt")
        if attribute not in attr_cols:
            raise ValueError(
                f"Attribute {attribute!r} is not in list_attr_celeba.txt; choose from {', '.join(attr_cols)}."
            )
        if tuple(lm_cols) != LANDMARK_NAMES:
            raise ValueError(f"list_landmarks_align_celeba.txt has columns {lm_cols}, expected {list(LANDMARK_NAMES)}.")
        if not (part_names == attr_names == lm_names):
            raise ValueError(
                "The CelebA list files do not list the same images in the same order; is the copy complete?"
            )
        index = (part[:, 0] == SPLITS[split]).nonzero().flatten()
        if subset is not None:
            if subset < 1:
                raise ValueError(f"subset must be a positive number of images or None, got {subset}.")
            if subset < len(index):
                pick = torch.randperm(len(index), generator=torch.Generator().manual_seed(seed))[:subset]
                index = index[pick.sort().values]
        self.files = [part_names[i] for i in index.tolist()]
        self.attractive = (attrs[index, attr_cols.index(attribute)] > 0).float()
        self.raw_landmarks = landmarks[index].float()

    def __len__(self) -> int:
        return len(self.files)

    def rescale_landmarks(self, landmarks: Tensor, width: int, height: int) -> Tensor:
        """Landmarks of a ``width x height`` image in this dataset's coordinates."""
        scale = torch.tensor([self.image_size / width, self.image_size / height] * 5)
        out = landmarks * scale
        return out / self.image_size if self.normalize_landmarks else out

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor, Tensor]:
        from PIL import Image

        with Image.open(self.folder / "img_align_celeba" / self.files[i]) as img:
            width, height = img.size
            # Image.BILINEAR exists at run time but Pillow's types omit it (Image.Resampling needs Pillow>=9.1).
            bilinear = Image.BILINEAR  # type: ignore[attr-defined]
            grey = img.convert("L").resize((self.image_size, self.image_size), bilinear)
            pixels = torch.frombuffer(bytearray(grey.tobytes()), dtype=torch.uint8)
        image = pixels.reshape(1, self.image_size, self.image_size).float() / 255.0
        return image, self.attractive[i], self.rescale_landmarks(self.raw_landmarks[i], width, height)


class CelebADataModule(L.LightningDataModule):
    """Train/valid/test loaders of :class:`CelebAMultiTask` (official partition, optional subsets).

    Batches are ``(images, attractive, landmarks)``; both tasks read the same images.

    Example::

        dm = CelebADataModule(root="~/data/celeba", subset=10000)   # the blog: 10000 per split
    """

    def __init__(
        self,
        root: str | os.PathLike = "data",
        image_size: int = 40,
        subset: int | None = 10000,
        batch_size: int = 64,
        num_workers: int = 0,
        seed: int = 0,
        attribute: str = "Attractive",
        normalize_landmarks: bool = True,
        download: bool = False,
    ) -> None:
        super().__init__()
        self.root = root
        self.image_size = image_size
        self.subset = subset
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.seed = seed
        self.attribute = attribute
        self.normalize_landmarks = normalize_landmarks
        self.download = download
        self.sets: dict[str, CelebAMultiTask] = {}

    def prepare_data(self) -> None:
        if self.download:
            from torchvision.datasets import CelebA

            CelebA(str(self.root), split="all", target_type=["attr", "landmarks"], download=True)
        else:
            find_celeba_folder(self.root)  # fail early with a clear message

    def _make(self, split: str) -> CelebAMultiTask:
        if split not in self.sets:
            self.sets[split] = CelebAMultiTask(
                self.root,
                split,
                self.image_size,
                self.subset,
                self.seed + SPLITS[split],
                self.attribute,
                self.normalize_landmarks,
            )
        return self.sets[split]

    def setup(self, stage: str | None = None) -> None:
        splits: Sequence[str] = {"fit": ("train", "valid"), "validate": ("valid",), "test": ("test",)}.get(
            stage or "", ("train", "valid", "test")
        )
        for split in splits:
            self._make(split)

    @property
    def train_set(self) -> CelebAMultiTask:
        return self._make("train")

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        return DataLoader(
            self._make(split),
            batch_size=self.batch_size,
            shuffle=shuffle,
            num_workers=self.num_workers,
            generator=torch.Generator().manual_seed(self.seed) if shuffle else None,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("valid", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)
