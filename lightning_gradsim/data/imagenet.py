"""ImageNet class names and sources: the ImageFolder layout and downsampled ImageNet 64x64.

* Class names and WNIDs come from timm's bundled ImageNet-1k info (no download). A class is named
  by WNID (``"n04483307"``), by index in the sorted-WNID order of timm / torchvision (``914``) or
  by name (``"trimaran"``, any of the comma-separated synonyms, case-insensitive).
* :func:`scan_image_folder` lists ``<split>/<wnid>/*.JPEG`` (any image extension).
* :class:`DownsampledImageNet` reads the 64x64 pickles (``train_data_batch_1..10``, ``val_data``):
  ``data`` rows of 12288 uint8 values (all red, then green, then blue) and **1-based labels in the
  order of the devkit's ``map_clsloc.txt``** (kit fox = 1) -- not the sorted-WNID order. The
  label -> WNID mapping is always taken from the user's ``map_clsloc.txt`` (or the devkit's
  ``meta.mat``), never assumed.

Example::

    wnid = resolve_class("trimaran")                        # 'n04483307'
    ds = DownsampledImageNet("imagenet64", "val", map_file="map_clsloc.txt")
"""

from __future__ import annotations

import os
import pickle
import re
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "PAIR_PRESETS",
    "resolve_class",
    "class_name",
    "read_label_map",
    "scan_image_folder",
    "DownsampledImageNet",
]

#: The paper's class pairs (main, auxiliary) by WNID, with whether they are "near" or "far".
PAIR_PRESETS: dict[str, tuple[str, str, str]] = {
    "trimaran_catamaran": ("n04483307", "n02981792", "near"),
    "husky_malamute": ("n02110185", "n02110063", "near"),
    "swissdog_entlebucher": ("n02107574", "n02108000", "near"),
    "trafficlight_rockpython": ("n06874185", "n01744401", "far"),
    "hotpot_slot": ("n07590611", "n04243546", "far"),
    "komodo_trafficlight": ("n01695060", "n06874185", "far"),
}

_WNID = re.compile(r"^n\d{8}$")
IMAGE_EXTENSIONS = (".jpeg", ".jpg", ".png", ".bmp", ".webp")


@lru_cache(maxsize=1)
def _info() -> tuple[list[str], dict[str, str]]:
    from timm.data import ImageNetInfo

    info = ImageNetInfo()
    wnids = list(info.label_names())
    return wnids, {w: info.label_name_to_description(w) for w in wnids}


def class_name(wnid: str) -> str:
    """The first name of ``wnid`` in timm's ImageNet-1k info (the WNID itself if unknown)."""
    return _info()[1].get(wnid, wnid).split(",")[0].strip()


def resolve_class(spec: str | int) -> str:
    """A WNID from a WNID, a sorted-WNID index (0..999) or a class name; clear error otherwise."""
    wnids, desc = _info()
    if isinstance(spec, (int, np.integer)) or (isinstance(spec, str) and spec.strip().isdigit()):
        index = int(spec)
        if not 0 <= index < len(wnids):
            raise ValueError(f"Class index {index} is out of range 0..{len(wnids) - 1} (sorted-WNID order).")
        return wnids[index]
    text = str(spec).strip()
    if _WNID.match(text):
        return text  # also classes outside ImageNet-1k (e.g. a custom ImageFolder)
    if text in PAIR_PRESETS:
        raise ValueError(f"{text!r} is a pair preset; name one class, or use pair={text!r}.")
    wanted = text.lower().replace("_", " ")
    exact = [w for w in wnids if wanted in (s.strip().lower() for s in desc[w].split(","))]
    if len(exact) == 1:
        return exact[0]
    if len(exact) > 1:
        raise ValueError(f"Class name {text!r} is ambiguous: {[(w, desc[w]) for w in exact]}; name it by WNID.")
    close = [f"{w} ({desc[w]})" for w in wnids if wanted in desc[w].lower()][:8]
    hint = f" Did you mean one of: {'; '.join(close)}?" if close else ""
    raise ValueError(f"No ImageNet class named {text!r}; give a WNID like 'n04483307', an index or a name.{hint}")


def read_label_map(path: str | os.PathLike) -> dict[int, str]:
    """1-based label -> WNID from the devkit's ``map_clsloc.txt`` (``"<wnid> <label> <name>"``) or ``meta.mat``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"No label map at {path}: downsampled ImageNet labels follow the ILSVRC devkit's map_clsloc.txt "
            "(kit fox = 1); pass map_file=<path to map_clsloc.txt or meta.mat>."
        )
    mapping: dict[int, str] = {}
    if path.suffix.lower() == ".mat":
        from scipy.io import loadmat

        from .hierarchy import _as_iter

        mat = loadmat(str(path), squeeze_me=True, struct_as_record=False)
        for s in _as_iter(mat["synsets"]):
            if len(_as_iter(s.children)) == 0 or int(getattr(s, "num_children", 0)) == 0:
                ident = int(s.ILSVRC2012_ID)
                if ident <= 1000:
                    mapping[ident] = str(s.WNID)
    else:
        with open(path) as f:
            for lineno, line in enumerate(f, 1):
                parts = line.split()
                if not parts:
                    continue
                if len(parts) < 2 or not _WNID.match(parts[0]) or not parts[1].isdigit():
                    raise ValueError(
                        f"{path}:{lineno}: expected '<wnid> <1-based label> <name>', got {line.strip()!r}."
                    )
                mapping[int(parts[1])] = parts[0]
    if not mapping:
        raise ValueError(f"{path} maps no label to a WNID.")
    return mapping


def scan_image_folder(root: str | os.PathLike) -> tuple[list[str], list[str]]:
    """``(paths, wnids)`` of every image under ``root/<wnid>/`` (sorted, so the order is stable)."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"No folder {root}; expected the ImageFolder layout {root}/<wnid>/*.JPEG.")
    paths: list[str] = []
    labels: list[str] = []
    for entry in sorted(os.scandir(root), key=lambda e: e.name):
        if not entry.is_dir():
            continue
        for name in sorted(os.listdir(entry.path)):
            if name.lower().endswith(IMAGE_EXTENSIONS):
                paths.append(os.path.join(entry.path, name))
                labels.append(entry.name)
    if not paths:
        raise FileNotFoundError(f"No images under {root}/<wnid>/ (extensions {IMAGE_EXTENSIONS}).")
    return paths, labels


class DownsampledImageNet:
    """The downsampled ImageNet (64x64, also 32x32/16x16) pickles of one split, with WNID labels.

    Args:
        root: folder with ``train_data_batch_1..10`` and ``val_data`` (optionally ``.pkl``/``.npz``-less names).
        split: ``"train"`` or ``"val"``.
        map_file: the devkit's ``map_clsloc.txt`` (or ``meta.mat``) giving label -> WNID.
        keep: if given, a function ``(wnids: np.ndarray) -> bool mask`` selecting rows to keep in memory.

    Attributes: ``wnids`` (``np.ndarray`` of str per kept row), ``data`` (uint8 ``(N, 3, S, S)``).
    """

    def __init__(self, root: str | os.PathLike, split: str, map_file: str | os.PathLike, keep=None) -> None:
        root = Path(root)
        label_map = read_label_map(map_file)
        files = self.split_files(root, split)
        wnids, data = [], []
        for file in files:
            with open(file, "rb") as f:
                batch = pickle.load(f, encoding="latin1")
            if "data" not in batch or "labels" not in batch:
                raise ValueError(f"{file} is not a downsampled-ImageNet batch (needs 'data' and 'labels').")
            labels = np.asarray(batch["labels"], dtype=np.int64)
            unknown = sorted(set(np.unique(labels).tolist()) - set(label_map))
            if unknown:
                raise ValueError(
                    f"{file} has labels {unknown[:5]} missing from the label map {map_file}; the labels are 1-based "
                    "indices of map_clsloc.txt."
                )
            row_wnids = np.asarray([label_map[int(i)] for i in labels])
            mask = np.ones(len(labels), bool) if keep is None else np.asarray(keep(row_wnids), bool)
            rows = np.asarray(batch["data"])[mask]
            side = int(round((rows.shape[1] // 3) ** 0.5)) if rows.size else 64
            wnids.append(row_wnids[mask])
            data.append(rows.reshape(-1, 3, side, side))
        self.wnids = np.concatenate(wnids)
        self.data = np.concatenate(data)

    @staticmethod
    def split_files(root: Path, split: str) -> list[Path]:
        if split == "train":
            files = sorted(
                (p for p in root.glob("train_data_batch_*") if p.is_file()),
                key=lambda p: int(re.sub(r"\D", "", p.name.split("batch_")[1]) or 0),
            )
        elif split == "val":
            files = [p for p in (root / "val_data", root / "val_data.pkl") if p.is_file()][:1]
        else:
            raise ValueError(f"split must be 'train' or 'val', got {split!r}.")
        if not files:
            raise FileNotFoundError(
                f"No downsampled-ImageNet {split} files under {root} (expected train_data_batch_1..10 and val_data)."
            )
        return files

    def __len__(self) -> int:
        return len(self.wnids)

    def image(self, index: int) -> Tensor:
        return torch.from_numpy(self.data[index].astype(np.float32) / 255.0)
