"""Tiny ImageNet-like files in the real layouts, for the data/CLI tests (generated, nothing downloaded)."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np

# six real ImageNet classes; each image's red channel encodes its class: 20 * (position in CLASSES + 1)
CLASSES = ["n04483307", "n02981792", "n02110185", "n02110063", "n06874185", "n01744401"]
TRIMARAN, CATAMARAN = CLASSES[0], CLASSES[1]
#: every class of the paper's pair presets
PRESET_CLASSES = CLASSES + ["n02107574", "n02108000", "n07590611", "n04243546", "n01695060"]


def red_code(wnid: str) -> int:
    return 20 * (PRESET_CLASSES.index(wnid) + 1)


def make_image_folder(
    root: Path, n_train: int = 10, n_val: int = 4, size: int = 20, classes: list[str] = CLASSES
) -> Path:
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n in (("train", n_train), ("val", n_val)):
        for wnid in classes:
            folder = root / split / wnid
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                arr = np.zeros((size, size, 3), dtype=np.uint8)
                arr[..., 0] = red_code(wnid)
                arr[..., 1] = rng.integers(0, 255)  # flat colours survive JPEG; red encodes the class
                Image.fromarray(arr).save(folder / f"{wnid}_{split}_{i}.JPEG", quality=100, subsampling=0)
    (root / "train" / "README.txt").write_text("not a class folder")
    return root


def make_downsampled(root: Path, n_per_class: int = 8, side: int = 8, seed: int = 0) -> tuple[Path, dict[int, str]]:
    """Downsampled-ImageNet pickles with labels in a *shuffled* map_clsloc order; returns (root, label map)."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    order = list(rng.permutation(len(CLASSES)))
    # deliberately neither sorted-WNID nor CLASSES order
    label_of = {CLASSES[j]: k + 1 for k, j in enumerate(order)}
    assert [w for w, _ in sorted(label_of.items(), key=lambda kv: kv[1])] != sorted(CLASSES)
    lines = [f"{w} {label_of[w]} name_{label_of[w]}" for w in CLASSES]
    rng.shuffle(lines)
    (root / "map_clsloc.txt").write_text("\n".join(lines) + "\n")

    def batch(n: int) -> dict:
        data, labels = [], []
        for wnid in CLASSES:
            for _ in range(n):
                img = rng.integers(0, 255, (3, side, side), dtype=np.uint8)
                img[0] = red_code(wnid)  # all red values first, then green, then blue
                data.append(img.reshape(-1))
                labels.append(label_of[wnid])
        perm = rng.permutation(len(labels))
        return {"data": np.stack(data)[perm], "labels": [labels[i] for i in perm], "mean": None}

    for name, n in (
        ("train_data_batch_1", n_per_class // 2),
        ("train_data_batch_2", n_per_class - n_per_class // 2),
        ("val_data", 3),
    ):
        with open(root / name, "wb") as f:
            pickle.dump(batch(n), f)
    return root, {v: k for k, v in label_of.items()}


# entity -> boat -> {trimaran, catamaran}; entity -> animal -> dog -> {husky, malamute};
# entity -> traffic light; entity -> catamaran (a second parent: the DAG case)
IS_A = [
    ("n00001740", "n02858304"),  # entity -> boat
    ("n02858304", "n04483307"),  # boat -> trimaran
    ("n02858304", "n02981792"),  # boat -> catamaran
    ("n00001740", "n00015388"),  # entity -> animal
    ("n00015388", "n02084071"),  # animal -> dog
    ("n02084071", "n02110185"),  # dog -> husky
    ("n02084071", "n02110063"),  # dog -> malamute
    ("n00001740", "n06874185"),  # entity -> traffic light
    ("n00001740", "n02981792"),  # entity -> catamaran (second parent)
]


def make_is_a(path: Path) -> Path:
    path.write_text("\n".join(f"{p} {c}" for p, c in IS_A) + "\n")
    return path


def make_meta_mat(path: Path) -> Path:
    from scipy.io import savemat

    wnids = [
        "n04483307",
        "n02981792",
        "n02110185",
        "n02110063",
        "n06874185",  # leaves: IDs 1..5
        "n02858304",
        "n00015388",
        "n02084071",
        "n00001740",
    ]  # inner: IDs 6..9
    ident = {w: i + 1 for i, w in enumerate(wnids)}
    kids: dict[str, list[int]] = {w: [] for w in wnids}
    for p, c in IS_A:
        kids[p].append(ident[c])
    dtype = [("ILSVRC2012_ID", "O"), ("WNID", "O"), ("words", "O"), ("num_children", "O"), ("children", "O")]
    arr = np.zeros((len(wnids),), dtype=dtype)
    for i, w in enumerate(wnids):
        arr[i] = (
            np.array([[ident[w]]], dtype=np.uint16),
            w,
            w,
            np.array([[len(kids[w])]], dtype=np.uint16),
            np.array(kids[w], dtype=np.uint16).reshape(1, -1) if kids[w] else np.zeros((1, 0), dtype=np.uint16),
        )
    savemat(str(path), {"synsets": arr.reshape(-1, 1)})
    return path
