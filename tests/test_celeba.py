"""CelebA datamodule and TCDCN setup on a tiny folder in CelebA's real layout (written by the test)."""

from __future__ import annotations

import os

import pytest
import torch
import yaml

from lightning_gradsim.data.celeba import CelebADataModule, CelebAMultiTask, find_celeba_folder
from lightning_gradsim.experiments.tcdcn import CelebATCDCN

ATTRS = ["5_o_Clock_Shadow", "Arched_Eyebrows", "Attractive", "Young"]
# image index -> (partition, Attractive as +-1, RGB colour)
IMAGES = {
    1: (0, 1, (200, 100, 50)), 2: (0, -1, (10, 20, 30)), 3: (0, 1, (255, 255, 255)), 4: (0, -1, (0, 0, 0)),
    5: (0, 1, (90, 160, 220)), 6: (0, -1, (128, 64, 32)), 7: (1, 1, (50, 50, 50)), 8: (1, -1, (70, 80, 90)),
    9: (2, -1, (30, 30, 200)), 10: (2, 1, (220, 30, 30)), 11: (2, -1, (100, 200, 100)), 12: (1, 1, (5, 250, 5)),
}
WIDTH, HEIGHT = 178, 218


def _landmarks(i: int) -> list[int]:
    return [69 + i, 109, 106, 113 + i, 77, 142, 73, 152 - i, 108, 154]


def write_celeba(folder) -> None:
    from PIL import Image

    img_dir = folder / "img_align_celeba"
    img_dir.mkdir(parents=True)
    attr_lines = [str(len(IMAGES)), " ".join(ATTRS)]
    lm_lines = [str(len(IMAGES)), "lefteye_x lefteye_y righteye_x righteye_y nose_x nose_y leftmouth_x leftmouth_y "
                "rightmouth_x rightmouth_y"]
    part_lines = []
    for i, (part, attractive, colour) in IMAGES.items():
        name = f"{i:06d}.jpg"
        Image.new("RGB", (WIDTH, HEIGHT), colour).save(img_dir / name, quality=100)
        values = [-1, 1 if i % 2 else -1, attractive, 1]
        attr_lines.append(name + " " + " ".join(f"{v:2d}" for v in values))  # CelebA pads with spaces
        lm_lines.append(name + "   " + "   ".join(str(v) for v in _landmarks(i)))
        part_lines.append(f"{name} {part}")
    (folder / "list_attr_celeba.txt").write_text("\n".join(attr_lines) + "\n")
    (folder / "list_landmarks_align_celeba.txt").write_text("\n".join(lm_lines) + "\n")
    (folder / "list_eval_partition.txt").write_text("\n".join(part_lines) + "\n")


@pytest.fixture(scope="module")
def celeba_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    write_celeba(root / "celeba")  # torchvision's layout: <root>/celeba/...
    return root


def test_items_shapes_labels_grey_levels_and_landmarks(celeba_root):
    ds = CelebAMultiTask(celeba_root, "train")
    assert ds.files == [f"{i:06d}.jpg" for i in range(1, 7)]
    image, attractive, landmarks = ds[0]
    assert image.shape == (1, 40, 40) and image.dtype == torch.float32
    # PIL's ITU-R 601-2 luma of (200, 100, 50): (299 * 200 + 587 * 100 + 114 * 50) / 1000 = 124.2
    assert image.mean().item() == pytest.approx(124 / 255, abs=2 / 255)
    assert ds[2][0].min().item() == pytest.approx(1.0, abs=1 / 255)  # white
    assert ds[3][0].max().item() == pytest.approx(0.0, abs=1 / 255)  # black
    assert [float(ds[k][1]) for k in range(6)] == [1.0, 0.0, 1.0, 0.0, 1.0, 0.0]  # the Attractive column, not another
    expected = torch.tensor(_landmarks(1), dtype=torch.float32) / torch.tensor([WIDTH, HEIGHT] * 5)
    torch.testing.assert_close(landmarks, expected)
    pixels = CelebAMultiTask(celeba_root, "train", normalize_landmarks=False)[0][2]
    torch.testing.assert_close(pixels[:2], torch.tensor([70 * 40 / 178, 109 * 40 / 218]))
    big = CelebAMultiTask(celeba_root, "train", image_size=64, normalize_landmarks=False)[0]
    assert big[0].shape == (1, 64, 64)
    torch.testing.assert_close(big[2][:2], torch.tensor([70 * 64 / 178, 109 * 64 / 218]))


def test_official_splits_and_subsets(celeba_root):
    splits = {s: CelebAMultiTask(celeba_root, s).files for s in ("train", "valid", "test")}
    assert splits["valid"] == ["000007.jpg", "000008.jpg", "000012.jpg"]
    assert splits["test"] == ["000009.jpg", "000010.jpg", "000011.jpg"]
    assert sum(len(v) for v in splits.values()) == len(IMAGES)
    sub = CelebAMultiTask(celeba_root, "train", subset=4, seed=3)
    assert len(sub) == 4 and set(sub.files) <= set(splits["train"])
    assert sub.files == CelebAMultiTask(celeba_root, "train", subset=4, seed=3).files
    assert any(CelebAMultiTask(celeba_root, "train", subset=4, seed=s).files != sub.files for s in range(4, 9))
    assert len(CelebAMultiTask(celeba_root, "test", subset=100)) == 3  # larger than the split: all of it


def test_root_layouts_and_clear_errors(celeba_root, tmp_path):
    assert find_celeba_folder(celeba_root) == celeba_root / "celeba"
    assert find_celeba_folder(celeba_root / "celeba") == celeba_root / "celeba"
    with pytest.raises(FileNotFoundError, match="list_attr_celeba.txt.*download=True"):
        find_celeba_folder(tmp_path)
    with pytest.raises(ValueError, match="Attribute 'Pretty'.*Attractive"):
        CelebAMultiTask(celeba_root, attribute="Pretty")
    with pytest.raises(ValueError, match="split must be one of"):
        CelebAMultiTask(celeba_root, "val")
    with pytest.raises(FileNotFoundError):
        CelebADataModule(root=tmp_path).prepare_data()  # never downloads unless asked


def test_datamodule_batches(celeba_root):
    dm = CelebADataModule(root=celeba_root, subset=None, batch_size=4)
    dm.prepare_data()
    dm.setup("fit")
    x, y, lm = next(iter(dm.train_dataloader()))
    assert x.shape == (4, 1, 40, 40) and y.shape == (4,) and lm.shape == (4, 10)
    assert len(dm.val_dataloader().dataset) == 3
    dm.setup("test")
    assert [f for f in dm.test_dataloader().dataset.files] == ["000009.jpg", "000010.jpg", "000011.jpg"]


def test_tcdcn_shapes_and_gate():
    model = CelebATCDCN(method="projection", aux_weight=0.5, gate={"main_grad_ema": 0.9})
    logit, coords = model(torch.zeros(3, 1, 40, 40))
    assert logit.shape == (3,) and coords.shape == (3, 10)
    assert model.gradsim.rule_name == "projection" and model.gradsim.aux_weight == 0.5
    assert model.gradsim.main_grad_ema == 0.9


@pytest.mark.slow
def test_compare_setup_runs_on_the_tiny_folder(celeba_root, tmp_path):
    from lightning_gradsim.experiments.compare import RunSpec, run_one

    spec = RunSpec(setup="celeba", method="projection", seed=0, gate={},
                   options={"root": str(celeba_root), "lam": 2.0, "batch_size": 3, "subset": None},
                   variant="lam=2.0", max_steps=4, eval_every=2)
    out = run_one(spec)
    row = out["row"]
    assert row["steps"] == 4
    assert 0.0 <= row["test_acc"] <= 1.0 and row["test_auroc"] is not None
    assert out["cos"] and "landmarks" in out["cos"]


def test_example_config_is_a_valid_compare_config():
    path = os.path.join(os.path.dirname(__file__), "..", "examples", "celeba", "compare.yaml")
    with open(path) as f:
        cfg = yaml.safe_load(f)
    allowed = {"setup", "methods", "seeds", "variants", "options", "gate", "max_steps", "eval_every", "log_every",
               "jobs", "out_dir", "trainer", "progress"}
    assert set(cfg) <= allowed
    assert cfg["setup"] == "celeba" and len(cfg["variants"]["lam"]) >= 3
    from lightning_gradsim.methods import list_methods

    assert set(cfg["methods"]) <= set(list_methods())
