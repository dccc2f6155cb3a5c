"""Fréchet distance against closed forms, and ``gradsim distances`` on a tiny ImageFolder + hierarchy."""

from __future__ import annotations

import csv

import pytest
import torch

from lightning_gradsim.cli import main as gradsim
from lightning_gradsim.experiments.distances import frechet_distance, gaussian_frechet_distance

from .._imagenet_fixtures import make_image_folder, make_is_a


def test_gaussian_frechet_closed_forms():
    # 1-D: (m1 - m2)^2 + (s1 - s2)^2
    fd = gaussian_frechet_distance(
        torch.tensor([1.0]), torch.tensor([[4.0]]), torch.tensor([-2.0]), torch.tensor([[1.0]])
    )
    assert fd == pytest.approx(9.0 + 1.0)
    # diagonal covariances: sum over dimensions of the 1-D formula
    mu_a, mu_b = torch.tensor([0.0, 1.0, 2.0]), torch.tensor([1.0, 1.0, 0.0])
    var_a, var_b = torch.tensor([1.0, 4.0, 9.0]), torch.tensor([4.0, 4.0, 1.0])
    expected = ((mu_a - mu_b) ** 2).sum() + ((var_a.sqrt() - var_b.sqrt()) ** 2).sum()
    fd = gaussian_frechet_distance(mu_a, torch.diag(var_a), mu_b, torch.diag(var_b))
    assert fd == pytest.approx(float(expected))
    # rotation-invariant: rotate both Gaussians by the same orthogonal matrix
    q, _ = torch.linalg.qr(torch.randn(3, 3, dtype=torch.float64))
    fd_rot = gaussian_frechet_distance(
        q @ mu_a.double(), q @ torch.diag(var_a).double() @ q.T, q @ mu_b.double(), q @ torch.diag(var_b).double() @ q.T
    )
    assert fd_rot == pytest.approx(float(expected))


def test_matches_torchmetrics_fid_formula():
    fid_mod = pytest.importorskip("torchmetrics.image.fid")
    g = torch.Generator().manual_seed(1)
    a, b = (torch.randn(5, 5, generator=g, dtype=torch.float64) for _ in range(2))
    mu_a, mu_b = (torch.randn(5, generator=g, dtype=torch.float64) for _ in range(2))
    reference = float(fid_mod._compute_fid(mu_a, a @ a.T, mu_b, b @ b.T))
    assert gaussian_frechet_distance(mu_a, a @ a.T, mu_b, b @ b.T) == pytest.approx(reference, rel=1e-6)


def test_frechet_from_features():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4000, 2, generator=g, dtype=torch.float64)
    assert frechet_distance(x, x) == pytest.approx(0.0, abs=1e-9)
    assert frechet_distance(x, x + torch.tensor([3.0, 4.0], dtype=torch.float64)) == pytest.approx(25.0, rel=1e-6)
    # fewer images than dimensions (the FID case of 50 images x 2048 features): the n x n route equals the formula
    a, b = (
        torch.randn(7, 40, generator=g, dtype=torch.float64),
        2 + 3 * torch.randn(9, 40, generator=g, dtype=torch.float64),
    )
    reference = gaussian_frechet_distance(a.mean(0), torch.cov(a.T), b.mean(0), torch.cov(b.T))
    assert frechet_distance(a, b) == pytest.approx(reference, rel=1e-7)
    with pytest.raises(ValueError, match="same D"):
        frechet_distance(x, x[:, :1])


@pytest.mark.slow
def test_distances_command(tmp_path, capsys):
    root = make_image_folder(tmp_path / "imagenet", n_train=4, n_val=1, size=16)
    is_a = make_is_a(tmp_path / "wordnet.is_a.txt")
    out = tmp_path / "out"
    code = gradsim(
        [
            "distances",
            "--root",
            str(root),
            "--hierarchy",
            str(is_a),
            "--backbone",
            "tiny_cnn",
            "--per-level",
            "2",
            "--images-per-class",
            "4",
            "--image-size",
            "16",
            "--out-dir",
            str(out),
        ]
    )
    assert code == 0, capsys.readouterr().out
    with open(out / "distances.csv") as f:
        rows = list(csv.DictReader(f))
    # 5 of the 6 folder classes are in the hierarchy (rock python is not): levels 1, 2, 3 exist
    assert sorted({int(r["lca_level"]) for r in rows}) == [1, 2, 3]
    assert all(float(r["frechet_distance"]) >= 0 for r in rows)
    assert {r["wnid_a"] for r in rows} | {r["wnid_b"] for r in rows} <= {
        "n04483307",
        "n02981792",
        "n02110185",
        "n02110063",
        "n06874185",
    }
    assert (out / "lca_vs_fid.png").stat().st_size > 1000
    printed = capsys.readouterr().out
    assert "FALLS BACK from appendix D.1" in printed and "random weights" in printed and "other model" in printed
    protocol = (out / "protocol.md").read_text()
    for reason in ("random weights", "other model: 'tiny_cnn'", "fewer pairs: 2 per LCA level"):
        assert reason in protocol
    assert (
        gradsim(["distances", "--root", str(tmp_path / "none"), "--hierarchy", str(is_a), "--out-dir", str(out)]) == 2
    )


@pytest.mark.slow
def test_distances_with_local_weights(tmp_path, capsys, monkeypatch):
    """D.1's backbone with a local weights file: no 'random weights' fallback; the weights are really loaded."""
    import huggingface_hub.constants

    from lightning_gradsim.experiments.backbone_weights import load_backbone
    from lightning_gradsim.models import build_trunk

    root = make_image_folder(tmp_path / "imagenet", n_train=3, n_val=1, size=16)
    is_a = make_is_a(tmp_path / "wordnet.is_a.txt")
    torch.manual_seed(3)
    trunk, _ = build_trunk("resnetv2_50", in_chans=3)
    weights = tmp_path / "resnetv2_50.pth"
    torch.save({"state_dict": trunk.state_dict()}, weights)
    model, info = load_backbone("resnetv2_50", weights=str(weights))
    assert info.trained and all(
        torch.equal(a, b) for a, b in zip(model.state_dict().values(), trunk.state_dict().values())
    )
    out = tmp_path / "out"
    code = gradsim(
        [
            "distances",
            "--root",
            str(root),
            "--hierarchy",
            str(is_a),
            "--weights",
            str(weights),
            "--images-per-class",
            "3",
            "--image-size",
            "16",
            "--out-dir",
            str(out),
        ]
    )
    printed = capsys.readouterr().out
    assert code == 0, printed
    # only the tiny folder's lack of classes departs from D.1
    assert "random weights" not in printed and "other model" not in printed and "fewer pairs found" in printed
    assert "resnetv2_50, weights: file" in (out / "protocol.md").read_text()
    # weights of another model: a clear error, not a silent partial load
    small = tmp_path / "small.pth"
    torch.save(build_trunk("tiny_cnn")[0].state_dict(), small)
    assert (
        gradsim(
            ["distances", "--root", str(root), "--hierarchy", str(is_a), "--weights", str(small), "--out-dir", str(out)]
        )
        == 2
    )
    assert "does not fit backbone 'resnetv2_50'" in capsys.readouterr().err
    # --pretrained reads only the local cache: an empty cache is an error that says nothing is downloaded
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty_hf"))
    torch.hub.set_dir(str(tmp_path / "empty_torch"))
    assert (
        gradsim(["distances", "--root", str(root), "--hierarchy", str(is_a), "--pretrained", "--out-dir", str(out)])
        == 2
    )
    assert "nothing is downloaded" in capsys.readouterr().err
