"""The held-out *reference* split of the training data (issue 23): disjoint from everything trained on,
its size, determinism, and the default (no reference) exactly as before.

Images are "ID-coded" where it matters: image ``i`` is a constant image of value ``i``, so any batch
says which source images it holds (a rotation keeps a constant image constant)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lightning_gradsim.data import REFERENCE_FRACTION, ClassPairDataModule, RotatedDigitsDataModule
from lightning_gradsim.data._common import carve_reference, seeded_split
from lightning_gradsim.data.digits import load_digits_source
from lightning_gradsim.data.table1 import load_table1_data, split_test_file
from lightning_gradsim.experiments.pairs_data import _TensorImages, mnist_pair

N = 600


def id_images(n=N, side=4):
    x = torch.arange(n, dtype=torch.float32).view(n, 1, 1, 1).expand(n, 1, side, side).contiguous()
    y = torch.arange(n) % 10
    return x, y


def ids(x):
    """Source ids of a batch of ID-coded images (any shape (B, ...))."""
    flat = x.reshape(len(x), -1)
    assert bool((flat == flat[:, :1]).all())
    return set(flat[:, 0].round().long().tolist())


def test_reference_fraction_is_fixed_at_ten_percent():
    assert REFERENCE_FRACTION == 0.1  # chosen before any held-out result; changing it needs a new issue


def test_carve_reference_disjoint_sized_deterministic():
    keep, ref = carve_reference(1437, 0.1, seed=0)
    assert len(ref) == 144 and len(keep) == 1293  # round(143.7)
    assert set(keep.tolist()).isdisjoint(ref.tolist()) and len(set(keep.tolist()) | set(ref.tolist())) == 1437
    assert torch.equal(ref, carve_reference(1437, 0.1, seed=0)[1])
    assert not torch.equal(ref, carve_reference(1437, 0.1, seed=1)[1])
    assert bool((keep[1:] > keep[:-1]).all())  # the kept images keep their order
    for bad in (-0.1, 1.0):
        with pytest.raises(ValueError, match="reference_fraction"):
            carve_reference(10, bad, 0)


# ---------------------------------------------------------------- Table 1 data
def test_table1_default_is_the_old_split_and_reference_is_carved_from_training(monkeypatch):
    # default: exactly the split made before the reference existed (reconstructed here from its parts)
    x, y = load_digits_source("digits")
    tr, te = split_test_file(len(y), len(y) - 360, 0)
    data = load_table1_data("digits")
    assert torch.equal(data.train_x, x[tr]) and torch.equal(data.test_x, x[te]) and torch.equal(data.train_y, y[tr])
    assert data.reference_x is None and data.reference_y is None
    with pytest.raises(ValueError, match="no reference split"):
        data.reference_dataloader()

    monkeypatch.setattr("lightning_gradsim.data.table1.load_digits_source", lambda *a, **k: id_images(1797, 8))
    plain = load_table1_data("digits")
    held = load_table1_data("digits", reference_fraction=0.1)
    train, ref, test = ids(held.train_x), ids(held.reference_x), ids(held.test_x)
    assert len(ref) == round(0.1 * 1437) and len(train) == 1437 - len(ref)
    assert train.isdisjoint(ref) and ref <= ids(plain.train_x) and test == ids(plain.test_x)
    assert train | ref == ids(plain.train_x)
    assert torch.equal(held.reference_y, held.reference_x[:, 0, 0, 0].long() % 10)  # labels travel with images
    again = load_table1_data("digits", reference_fraction=0.1)
    assert torch.equal(again.reference_x, held.reference_x) and torch.equal(again.train_x, held.train_x)
    assert ids(load_table1_data("digits", split_seed=1, reference_fraction=0.1).reference_x) != ref
    batches = list(held.reference_dataloader(batch_size=32, seed=0))
    assert all(len(b[0]) == 32 for b in batches) and len(batches) == len(ref) // 32
    seen = set().union(*(ids(b[0]) for b in batches))
    assert seen <= ref and len(seen) == 32 * len(batches)
    assert [ids(b[0]) for b in held.reference_dataloader(32, seed=0)] == [ids(b[0]) for b in batches]


# ---------------------------------------------------------------- rotated digits datamodule
def test_rotated_digits_reference_is_disjoint_from_the_batches_trained_on(monkeypatch):
    monkeypatch.setattr("lightning_gradsim.data.digits.load_digits_source", lambda *a, **k: id_images())
    plain = RotatedDigitsDataModule(angle=90, batch_size=16)
    plain.setup()
    # default: the old split, reconstructed
    test_idx, val_idx, train_idx = seeded_split(N, [0.2, 0.1, 0.7], 0)
    n_main = round(0.5 * len(train_idx))
    assert torch.equal(plain.split_indices["main"], train_idx[:n_main])
    assert torch.equal(plain.split_indices["rotated"], train_idx[n_main:])
    assert "reference" not in plain.datasets
    with pytest.raises(ValueError, match="no reference split"):
        plain.reference_dataloader()

    dm = RotatedDigitsDataModule(angle=90, batch_size=16, reference_fraction=0.1)
    dm.setup()
    ref = set(dm.split_indices["reference"].tolist())
    assert len(ref) == round(0.1 * len(train_idx))
    trained = set()
    for batch, _, _ in dm.train_dataloader():
        trained |= ids(batch["main"][0]) | ids(batch["rotated"][0])
    assert trained and trained.isdisjoint(ref)
    assert trained <= set(train_idx.tolist())
    for split in ("val", "test"):
        assert torch.equal(dm.split_indices[split], plain.split_indices[split])
    union = set(dm.split_indices["main"].tolist()) | set(dm.split_indices["rotated"].tolist()) | ref
    assert union == set(train_idx.tolist())
    loaded = set().union(*(ids(x) for x, _ in dm.reference_dataloader()))
    assert loaded <= ref and len(loaded) == 16 * (len(ref) // 16)
    again = RotatedDigitsDataModule(angle=90, batch_size=16, reference_fraction=0.1)
    again.setup()
    assert torch.equal(again.split_indices["reference"], dm.split_indices["reference"])


# ---------------------------------------------------------------- class pairs
def pair_module(fraction, **kw):
    x, y = id_images()
    xt, yt = id_images(200)
    return ClassPairDataModule(
        source="dataset",
        train_dataset=_TensorImages(x, y),
        test_dataset=_TensorImages(xt, yt),
        main_class="4",
        aux_class="9",
        val_fraction=0.1,
        batch_size=8,
        reference_fraction=fraction,
        **kw,
    )


def test_class_pair_default_is_the_old_split():
    dm = pair_module(0.0)
    dm.setup()
    labels = np.asarray([str(int(v)) for v in id_images()[1]])
    rng = np.random.default_rng(0 + 1)
    train, val = [], []
    for c in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == c))
        n_val = int(round(0.1 * len(members)))
        val.append(members[:n_val])
        train.append(members[n_val:])
    train_idx = np.sort(np.concatenate(train))
    pool = dm.datasets["main"].pool
    assert np.array_equal(dm.datasets["main"].indices, dm._task(pool, train_idx, "4", 11).indices)
    assert np.array_equal(dm.datasets["aux"].indices, dm._task(pool, train_idx, "9", 13).indices)
    val_idx = np.sort(np.concatenate(val))
    assert np.array_equal(dm.datasets["val"].indices, dm._task(pool, val_idx, "4", 17).indices)
    assert "reference" not in dm.datasets


def test_class_pair_reference_is_held_out_of_training():
    plain, dm = pair_module(0.0), pair_module(0.1)
    plain.setup()
    dm.setup()
    reference = dm.datasets["reference"]
    ref = set(reference.indices.tolist())
    labels = reference.pool.labels
    # per class, 10% of the images left after validation (60 per class here: 6 to validation, 5 or 6 held out)
    positives = {i for i in ref if labels[i] == "4"}
    assert len(positives) == round(0.1 * (60 - 6)) and reference.targets.sum() == len(positives)
    assert len(ref) == 2 * len(positives)  # as the main task: as many negatives as positives
    assert all(labels[i] not in ("4", "9") for i in ref - positives)
    trained = set()
    for batch, _, _ in dm.train_dataloader():
        trained |= ids(batch["main"][0]) | ids(batch["aux"][0])
    assert trained.isdisjoint(ref)
    main_pos = {i for i in dm.datasets["main"].indices.tolist() if labels[i] == "4"}
    plain_pos = {i for i in plain.datasets["main"].indices.tolist() if labels[i] == "4"}
    assert main_pos | positives == plain_pos and main_pos.isdisjoint(positives)
    for split in ("val", "test"):
        assert np.array_equal(dm.datasets[split].indices, plain.datasets[split].indices)
    loaded = set().union(*(ids(x) for x, _ in dm.reference_dataloader()))
    assert loaded <= ref
    other = pair_module(0.1)
    other.setup()
    assert np.array_equal(other.datasets["reference"].indices, reference.indices)


def test_pairs_data_reference_tensors():
    x, y = id_images()
    xt, yt = id_images(200)
    plain = mnist_pair(x, y, xt, yt, "4", "9", kind="near")
    zero = mnist_pair(x, y, xt, yt, "4", "9", kind="near", reference_fraction=0.0)
    assert plain.reference is None and torch.equal(plain.main.x, zero.main.x) and torch.equal(plain.aux.y, zero.aux.y)
    held = mnist_pair(x, y, xt, yt, "4", "9", kind="near", reference_fraction=0.1)
    ref = set(held.reference.source_index.tolist())
    assert ids(held.reference.x) == ref
    assert ref.isdisjoint(held.main.source_index.tolist()) and ref.isdisjoint(held.aux.source_index.tolist())
    assert int(held.reference.y.sum()) == round(0.1 * 60) and torch.equal(held.test.x, plain.test.x)
    assert set().union(*(ids(b[0]) for b in held.reference_dataloader(batch_size=4))) <= ref


def test_table1_mnist_reference_sizes(mnist_root):
    import os

    if not os.path.isdir(os.path.join(mnist_root, "MNIST", "raw")):
        pytest.skip(f"no MNIST files under {mnist_root}")
    plain = load_table1_data("mnist", mnist_root)
    held = load_table1_data("mnist", mnist_root, reference_fraction=0.1)
    n = len(plain.train_y)  # 8,000 from the 10k file, or the 60,000 training images
    assert len(held.reference_y) == round(0.1 * n) and len(held.train_y) == n - round(0.1 * n)
    assert torch.equal(held.test_x, plain.test_x) and "held out as the reference split" in held.description
