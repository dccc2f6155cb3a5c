"""Rotated digits: rotation by hand, splits, per-task batches, and the real MNIST test split."""

from __future__ import annotations

import pytest
import torch

from lightning_gradsim.data import RotatedDigitsDataModule, rotate_images
from lightning_gradsim.data.digits import load_digits_source


def test_rotate_by_hand():
    img = torch.tensor([[1.0, 2.0], [3.0, 4.0]]).view(1, 1, 2, 2)
    # 90 degrees counter-clockwise: the right column becomes the top row
    assert torch.equal(rotate_images(img, 90)[0, 0], torch.tensor([[2.0, 4.0], [1.0, 3.0]]))
    assert torch.equal(rotate_images(img, 180)[0, 0], torch.tensor([[4.0, 3.0], [2.0, 1.0]]))
    assert torch.equal(rotate_images(img, 0), img)
    # 45 degrees keeps a centred disc's mass roughly and moves an off-centre pixel
    x = torch.zeros(1, 1, 9, 9)
    x[0, 0, 4, 8] = 1.0  # right of centre
    r = rotate_images(x, 45)
    assert r[0, 0, 4, 8] < 0.5 and r[0, 0, :4, 5:].sum() > 0.5  # moved up-right (counter-clockwise)


def test_digits_splits_and_batches():
    dm = RotatedDigitsDataModule(angle=90, batch_size=16)
    dm.setup()
    idx = dm.split_indices
    sizes = {k: len(v) for k, v in idx.items()}
    assert sum(sizes.values()) == 1797
    all_idx = torch.cat(list(idx.values()))
    assert len(torch.unique(all_idx)) == 1797  # disjoint
    assert sizes["test"] == round(0.2 * 1797) and sizes["val"] == round(0.1 * 1797)
    x, y = load_digits_source("digits")
    aux_x, aux_y = dm.datasets["rotated"].tensors
    assert torch.equal(aux_x, torch.rot90(x[idx["rotated"]], 1, dims=(-2, -1)))
    assert torch.equal(aux_y, y[idx["rotated"]])
    assert torch.equal(dm.datasets["test"].tensors[0], x[idx["test"]])  # test is unrotated
    batch, _, _ = next(iter(dm.train_dataloader()))
    assert set(batch) == {"main", "rotated"} and batch["main"][0].shape == (16, 1, 8, 8)
    assert dm.tasks == {"main": 10, "rotated": 10} and dm.input_dim == 64
    # the split does not depend on the training seed; the shuffling does
    other = RotatedDigitsDataModule(angle=90, seed=5)
    other.setup()
    assert all(torch.equal(idx[k], other.split_indices[k]) for k in idx)


def test_digits_errors(tmp_path):
    with pytest.raises(ValueError, match="main_fraction"):
        RotatedDigitsDataModule(main_fraction=1.0)
    with pytest.raises(ValueError, match="Unknown digits source"):
        load_digits_source("svhn")
    with pytest.raises(FileNotFoundError, match="nothing is downloaded"):
        RotatedDigitsDataModule(source="mnist", root=str(tmp_path)).setup()


def test_mnist_root_comes_from_the_caller_or_the_environment(monkeypatch, tmp_path):
    # no package default: without root= and without $GRADSIM_MNIST_ROOT the error names both
    monkeypatch.delenv("GRADSIM_MNIST_ROOT", raising=False)
    with pytest.raises(ValueError, match=r"root=.*GRADSIM_MNIST_ROOT.*torchvision"):
        load_digits_source("mnist")
    with pytest.raises(ValueError, match="GRADSIM_MNIST_ROOT"):
        RotatedDigitsDataModule(source="mnist").setup()
    # the environment variable is read when root is not given
    monkeypatch.setenv("GRADSIM_MNIST_ROOT", str(tmp_path / "from_env"))
    with pytest.raises(FileNotFoundError, match="from_env"):
        load_digits_source("mnist")


def test_real_mnist_test_split(mnist_root):
    x, y = load_digits_source("mnist", mnist_root)
    assert x.shape == (10000, 1, 28, 28) and 0.0 <= x.min() and x.max() <= 1.0
    assert y[:5].tolist() == [7, 2, 1, 0, 4]  # the well-known first labels of the MNIST test set
    assert torch.bincount(y).tolist()[:2] == [980, 1135]
    dm = RotatedDigitsDataModule(source="mnist", root=mnist_root, angle=180, max_images=500, batch_size=8)
    dm.setup()
    assert dm.input_dim == 784 and len(dm.datasets["test"]) == 100
    batch, _, _ = next(iter(dm.train_dataloader()))
    assert batch["rotated"][0].shape == (8, 1, 28, 28)


def test_one_rule_for_missing_mnist(monkeypatch, tmp_path):
    """Missing MNIST files fail the test when the run asked for them ($GRADSIM_MNIST_ROOT or $CI), else skip."""
    from ..conftest import mnist_root_or_skip

    empty = str(tmp_path)
    for env, outcome in (
        ({}, pytest.skip.Exception),
        ({"CI": "true"}, pytest.fail.Exception),
        ({"GRADSIM_MNIST_ROOT": empty}, pytest.fail.Exception),
        ({"CI": "false"}, pytest.skip.Exception),
    ):
        monkeypatch.delenv("CI", raising=False)
        monkeypatch.delenv("GRADSIM_MNIST_ROOT", raising=False)
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        with pytest.raises(outcome, match="MNIST files are not under"):
            mnist_root_or_skip(empty)
    (tmp_path / "MNIST" / "raw").mkdir(parents=True)
    assert mnist_root_or_skip(empty) == empty
