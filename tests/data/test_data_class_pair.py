"""ClassPairDataModule, ImageNet class naming and downsampled ImageNet, on generated files in the real layouts."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch

from lightning_gradsim.data import (
    PAIR_PRESETS,
    ClassPairDataModule,
    DownsampledImageNet,
    balanced_negatives,
    read_label_map,
    resolve_class,
)

from .._imagenet_fixtures import (
    CATAMARAN,
    CLASSES,
    TRIMARAN,
    make_downsampled,
    make_image_folder,
    make_meta_mat,
    red_code,
)

IMAGENET_MEAN_R, IMAGENET_STD_R = 0.485, 0.229


def _red(x: torch.Tensor) -> torch.Tensor:
    """Undo the normalisation and return each image's mean red value in 0..255."""
    return ((x[:, 0] * IMAGENET_STD_R + IMAGENET_MEAN_R) * 255).mean(dim=(-2, -1))


def _codes(ds) -> list[str]:
    return [str(ds.pool.labels[i]) for i in ds.indices]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("imagenet"))


def test_resolve_class_by_wnid_index_and_name():
    assert resolve_class("n04483307") == "n04483307"
    assert resolve_class("trimaran") == "n04483307"
    assert resolve_class("Siberian husky") == "n02110185"
    assert resolve_class("alaskan_malamute") == "n02110063"
    assert resolve_class(0) == "n01440764"  # tench: the first WNID in sorted order
    assert resolve_class("0") == "n01440764"
    with pytest.raises(ValueError, match="No ImageNet class named 'trimaranx'"):
        resolve_class("trimaranx")
    with pytest.raises(ValueError, match="out of range"):
        resolve_class(1000)


def test_presets_are_the_papers_pairs():
    from lightning_gradsim.data.imagenet import class_name

    names = {k: (class_name(a), class_name(b), kind) for k, (a, b, kind) in PAIR_PRESETS.items()}
    assert names["trimaran_catamaran"] == ("trimaran", "catamaran", "near")
    assert names["husky_malamute"] == ("Siberian husky", "malamute", "near")
    assert names["swissdog_entlebucher"] == ("Greater Swiss Mountain dog", "EntleBucher", "near")
    assert names["trafficlight_rockpython"] == ("traffic light", "rock python", "far")
    assert names["hotpot_slot"] == ("hot pot", "slot", "far")
    assert names["komodo_trafficlight"] == ("Komodo dragon", "traffic light", "far")


def test_balanced_negatives_spread_evenly_and_exclude():
    labels = np.array(["a"] * 10 + ["b"] * 10 + ["c"] * 2 + ["d"] * 20 + ["e"] * 20)
    pick = balanced_negatives(labels, np.arange(len(labels)), {"a", "b"}, 11, seed=3)
    counts = Counter(labels[pick])
    assert len(pick) == len(set(pick.tolist())) == 11
    assert "a" not in counts and "b" not in counts
    assert counts["c"] == 2  # runs out; d and e fill in evenly
    assert sorted([counts["d"], counts["e"]]) == [4, 5]
    again = balanced_negatives(labels, np.arange(len(labels)), {"a", "b"}, 11, seed=3)
    assert np.array_equal(pick, again)


def test_image_folder_tasks_splits_and_labels(folder):
    dm = ClassPairDataModule(
        str(folder), main_class="trimaran", aux_class=CATAMARAN, image_size=16, val_fraction=0.2, batch_size=4
    )
    dm.setup("fit")
    d = dm.datasets
    # positives are exactly the class's images; negatives balanced over the 4 other classes, never a or b
    for name, cls in (("main", TRIMARAN), ("aux", CATAMARAN)):
        labels = Counter(_codes(d[name]))
        assert labels[cls] == 8 and sum(d[name].targets) == 8
        others = {k: v for k, v in labels.items() if k != cls}
        assert set(others) <= set(CLASSES[2:]) and sum(others.values()) == 8
        assert max(others.values()) - min(others.values()) <= 1
    assert Counter(_codes(d["val"]))[TRIMARAN] == 2
    assert Counter(_codes(d["test"]))[TRIMARAN] == 4
    # no leak: validation images are never training images, test images come from val/
    train_paths = {d["main"].pool.paths[i] for k in ("main", "aux") for i in d[k].indices}
    val_paths = {d["val"].pool.paths[i] for i in d["val"].indices}
    assert not train_paths & val_paths
    assert all("/val/" in d["test"].pool.paths[i] for i in d["test"].indices)
    # per-task batches, different images per task; each label matches the image's encoded class
    batch, _, _ = next(iter(dm.train_dataloader()))
    assert set(batch) == {"main", "aux"}
    for name, cls in (("main", TRIMARAN), ("aux", CATAMARAN)):
        x, y = batch[name]
        assert x.shape == (4, 3, 16, 16)
        is_pos = (_red(x) - red_code(cls)).abs() < 4
        assert torch.equal(is_pos, y.bool())
    assert dm.tasks == {"main": 2, "aux": 2}


def test_pair_preset_and_include_pair_in_negatives(folder):
    dm = ClassPairDataModule(
        str(folder), pair="trimaran_catamaran", exclude_pair_from_negatives=False, val_fraction=0.0, negative_ratio=2.0
    )
    dm.setup()
    labels = Counter(_codes(dm.datasets["main"]))
    assert labels[TRIMARAN] == 10 and labels[CATAMARAN] == 4 and sum(labels.values()) == 30


def test_class_pair_errors(folder, tmp_path):
    with pytest.raises(ValueError, match="map_file"):
        ClassPairDataModule(str(folder), source="downsampled")
    with pytest.raises(ValueError, match="same class"):
        ClassPairDataModule(str(folder), main_class="trimaran", aux_class="n04483307")
    with pytest.raises(ValueError, match="Unknown pair preset"):
        ClassPairDataModule(str(folder), pair="nope")
    dm = ClassPairDataModule(str(folder), main_class="tench", aux_class=CATAMARAN)
    with pytest.raises(ValueError, match="No image of class n01440764"):
        dm.setup()
    with pytest.raises(FileNotFoundError, match="ImageFolder layout"):
        ClassPairDataModule(str(tmp_path / "missing")).setup()


def test_downsampled_uses_the_users_label_map(tmp_path):
    root, label_to_wnid = make_downsampled(tmp_path / "ds64", n_per_class=8, side=8)
    assert read_label_map(root / "map_clsloc.txt") == label_to_wnid
    ds = DownsampledImageNet(root, "train", root / "map_clsloc.txt")
    assert ds.data.shape == (48, 3, 8, 8)
    # every row's red plane (the first 64 values) matches the class its mapped WNID encodes
    for wnid, img in zip(ds.wnids, ds.data):
        assert (img[0] == red_code(str(wnid))).all()
    dm = ClassPairDataModule(
        str(root),
        pair="trimaran_catamaran",
        source="downsampled",
        map_file=str(root / "map_clsloc.txt"),
        image_size=8,
        val_fraction=0.25,
        batch_size=4,
    )
    dm.setup()
    assert Counter(_codes(dm.datasets["main"]))[TRIMARAN] == 6
    assert Counter(_codes(dm.datasets["test"]))[TRIMARAN] == 3
    x, y = next(iter(dm.train_dataloader()))[0]["aux"]
    assert torch.equal((_red(x) - red_code(CATAMARAN)).abs() < 2, y.bool())


def test_downsampled_label_map_from_meta_mat(tmp_path):
    mat = make_meta_mat(tmp_path / "meta.mat")
    mapping = read_label_map(mat)
    assert mapping == {1: "n04483307", 2: "n02981792", 3: "n02110185", 4: "n02110063", 5: "n06874185"}


def test_downsampled_errors(tmp_path):
    root, _ = make_downsampled(tmp_path / "ds", n_per_class=2)
    (tmp_path / "short_map.txt").write_text("n04483307 1 trimaran\n")
    with pytest.raises(ValueError, match="missing from the label map"):
        DownsampledImageNet(root, "train", tmp_path / "short_map.txt")
    with pytest.raises(FileNotFoundError, match="map_clsloc"):
        DownsampledImageNet(root, "train", tmp_path / "none.txt")
    with pytest.raises(FileNotFoundError, match="train_data_batch"):
        DownsampledImageNet(tmp_path, "train", root / "map_clsloc.txt")


def test_generic_labelled_dataset_source():
    class Tiny(torch.utils.data.Dataset):
        classes = ["cat", "dog", "car", "bus"]

        def __init__(self, n):
            self.targets = [i % 4 for i in range(n)]

        def __len__(self):
            return len(self.targets)

        def __getitem__(self, i):
            return torch.full((3, 4, 4), float(self.targets[i]) / 4), self.targets[i]

    dm = ClassPairDataModule(
        source="dataset", train_dataset=Tiny(40), test_dataset=Tiny(12), main_class="cat", aux_class="dog", batch_size=5
    )
    dm.setup()
    assert Counter(_codes(dm.datasets["main"])) == Counter({"cat": 9, "car": 5, "bus": 4}) or Counter(
        _codes(dm.datasets["main"])
    ) == Counter({"cat": 9, "car": 4, "bus": 5})
    assert Counter(_codes(dm.datasets["test"]))["cat"] == 3


def test_unreadable_images_are_found_at_setup_skipped_and_counted(tmp_path):
    """A garbage and a truncated .JPEG in the folder: found when the tasks are drawn (a cheap decode at
    reduced size), replaced by other images, warned about once with their count; every item then loads."""
    import warnings

    root = make_image_folder(tmp_path / "imagenet", n_train=10, n_val=4, size=32)
    garbage = root / "train" / TRIMARAN / f"{TRIMARAN}_train_0.JPEG"
    garbage.write_bytes(b"not a JPEG at all" * 10)
    other = sorted(c for c in CLASSES if c not in (TRIMARAN, CATAMARAN))[0]
    truncated = root / "train" / other / f"{other}_train_1.JPEG"
    truncated.write_bytes(truncated.read_bytes()[: truncated.stat().st_size // 2])
    kw = dict(main_class=TRIMARAN, aux_class=CATAMARAN, image_size=16, negative_ratio=3.0)
    clean = ClassPairDataModule(str(make_image_folder(tmp_path / "clean", n_train=10, n_val=4, size=32)), **kw)
    clean.setup()

    dm = ClassPairDataModule(str(root), **kw)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dm.setup()
    ours = [w for w in caught if "cannot be decoded" in str(w.message)]
    assert len(ours) == 1 and "2 image file(s)" in str(ours[0].message)
    assert sorted(dm.skipped_files) == sorted([str(garbage), str(truncated)])
    for name, ds in dm.datasets.items():
        paths = {ds.pool.paths[i] for i in ds.indices}
        assert str(garbage) not in paths and str(truncated) not in paths, name
        for i in range(len(ds)):  # every item decodes: nothing can fail in the middle of an epoch
            x, _ = ds[i]
            assert x.shape == (3, 16, 16)
    # one trimaran fewer (in the main task's training or validation part); other images replace the
    # truncated negative, so the auxiliary task keeps its size
    positives = {k: int(ds.targets.sum()) for k, ds in dm.datasets.items() if k in ("main", "val")}
    clean_positives = {k: int(ds.targets.sum()) for k, ds in clean.datasets.items() if k in ("main", "val")}
    assert sum(positives.values()) == sum(clean_positives.values()) - 1
    assert len(dm.datasets["aux"]) == len(clean.datasets["aux"])
