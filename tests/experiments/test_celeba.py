"""CelebA datamodule and TCDCN setup on a tiny folder in CelebA's real layout (written by the test)."""

from __future__ import annotations

import pytest
import torch
import yaml

from lightning_gradsim.data.celeba import CelebADataModule, CelebAMultiTask, find_celeba_folder
from lightning_gradsim.experiments.tcdcn import CelebATCDCN

ATTRS = ["5_o_Clock_Shadow", "Arched_Eyebrows", "Attractive", "Young"]
# image index -> (partition, Attractive as +-1, RGB colour)
IMAGES = {
    1: (0, 1, (200, 100, 50)),
    2: (0, -1, (10, 20, 30)),
    3: (0, 1, (255, 255, 255)),
    4: (0, -1, (0, 0, 0)),
    5: (0, 1, (90, 160, 220)),
    6: (0, -1, (128, 64, 32)),
    7: (1, 1, (50, 50, 50)),
    8: (1, -1, (70, 80, 90)),
    9: (2, -1, (30, 30, 200)),
    10: (2, 1, (220, 30, 30)),
    11: (2, -1, (100, 200, 100)),
    12: (1, 1, (5, 250, 5)),
}
WIDTH, HEIGHT = 178, 218


def _landmarks(i: int) -> list[int]:
    return [69 + i, 109, 106, 113 + i, 77, 142, 73, 152 - i, 108, 154]


def write_celeba(folder) -> None:
    from PIL import Image

    img_dir = folder / "img_align_celeba"
    img_dir.mkdir(parents=True)
    attr_lines = [str(len(IMAGES)), " ".join(ATTRS)]
    lm_lines = [
        str(len(IMAGES)),
        "lefteye_x lefteye_y righteye_x righteye_y nose_x nose_y leftmouth_x leftmouth_y rightmouth_x rightmouth_y",
    ]
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
    assert list(dm.test_dataloader().dataset.files) == ["000009.jpg", "000010.jpg", "000011.jpg"]


def test_tcdcn_shapes_and_gate():
    model = CelebATCDCN(method="projection", aux_weight=0.5, gate={"main_grad_ema": 0.9})
    logit, coords = model(torch.zeros(3, 1, 40, 40))
    assert logit.shape == (3,) and coords.shape == (3, 10)
    assert model.gradsim.rule_name == "projection" and model.gradsim.aux_weight == 0.5
    assert model.gradsim.main_grad_ema == 0.9


@pytest.mark.slow
def test_compare_setup_runs_on_the_tiny_folder(celeba_root, tmp_path):
    from lightning_gradsim.experiments.compare import RunSpec, run_one

    spec = RunSpec(
        setup="celeba",
        method="projection",
        seed=0,
        gate={},
        options={"root": str(celeba_root), "lam": 2.0, "batch_size": 3, "subset": None},
        variant="lam=2.0",
        max_steps=4,
        eval_every=2,
    )
    out = run_one(spec)
    row = out["row"]
    assert row["steps"] == 4
    assert 0.0 <= row["test_acc"] <= 1.0 and row["test_auroc"] is not None
    assert out["cos"] and "landmarks" in out["cos"]


def test_example_config_is_a_valid_compare_config():
    from lightning_gradsim.configs import CONFIG_DIR

    path = CONFIG_DIR / "celeba" / "celeba.yaml"
    with open(path) as f:
        cfg = yaml.safe_load(f)
    from lightning_gradsim.experiments.compare_cli import CONFIG_KEYS

    assert set(cfg) <= set(CONFIG_KEYS)
    assert cfg["setup"] == "celeba" and len(cfg["variants"]["lam"]) >= 3
    # the blog: lambda up to 30000 (it names lambda <= 10000 and 30000); 40x40; 10000 images per split
    lams = cfg["variants"]["lam"]
    assert 10000 in lams and 30000 in lams and max(lams) == 30000
    assert cfg["options"]["subset"] == 10000 and cfg["options"].get("image_size", 40) == 40
    # early stopping and the reported epoch are decided by the validation AUC (not the model's own loss rule)
    assert cfg["select"]["monitor"] == "val/auroc" and cfg["select"]["mode"] == "max" and cfg["select"]["patience"] > 0
    assert cfg["options"]["patience"] == 0
    assert {"main_only", "sum", "projection", "unweighted", "weighted"} <= set(cfg["methods"])
    from lightning_gradsim.methods import list_methods

    assert set(cfg["methods"]) <= set(list_methods())


# ------------------------------------------------------------------ best-epoch selection
def test_best_epoch_keeps_and_restores_the_weights_of_the_best_validation():
    from types import SimpleNamespace

    from lightning_gradsim.experiments.selection import BestEpoch, best_index

    assert best_index([0.6, 0.8, float("nan"), 0.8, 0.7]) == 1 and best_index([3.0, 1.0, 2.0], "min") == 1
    with pytest.raises(ValueError, match="mode"):
        best_index([1.0], "largest")
    net = torch.nn.Linear(2, 1)
    best = BestEpoch("val/auroc", "max")
    with pytest.raises(RuntimeError, match="no validation"):
        best.restore(net)
    weights = []
    for step, auc in enumerate([0.6, 0.8, 0.7, 0.8, 0.5]):
        with torch.no_grad():
            net.weight.fill_(float(step))
        weights.append(net.weight.detach().clone())
        metrics = {"val/auroc": torch.tensor(auc)}
        trainer = SimpleNamespace(sanity_checking=False, callback_metrics=metrics, global_step=10 * step)
        best.on_validation_end(trainer, net)
    best.restore(net)
    assert torch.equal(net.weight, weights[1]) and best.best == 1 and best.best_step == 10
    assert best.best_value == pytest.approx(0.8)
    with pytest.raises(KeyError, match="val/auroc"):
        best.on_validation_end(SimpleNamespace(sanity_checking=False, callback_metrics={}, global_step=0), net)


def _write_graded_celeba(folder, n=(24, 10, 10), mix=None) -> None:
    """A CelebA-layout folder whose "Attractive" label follows the image brightness (learnable), or with
    ``mix=(a, b)`` random colours labelled by ``a * red + b * green`` plus noise."""
    from PIL import Image

    img_dir = folder / "img_align_celeba"
    img_dir.mkdir(parents=True)
    gen = torch.Generator().manual_seed(0)
    attr_lines, lm_lines, part_lines = (
        [str(sum(n)), " ".join(ATTRS)],
        [
            str(sum(n)),
            " ".join(
                [
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
                ]
            ),
        ],
        [],
    )
    i = 0
    for part, count in enumerate(n):
        for _ in range(count):
            i += 1
            if mix is None:
                grey = int(torch.randint(0, 256, (1,), generator=gen))
                attractive = 1 if grey + int(torch.randint(-60, 61, (1,), generator=gen)) > 128 else -1
                colour = (grey, grey, grey)
            else:
                colour = tuple(int(v) for v in torch.randint(0, 256, (3,), generator=gen))
                score = mix[0] * colour[0] + mix[1] * colour[1] + int(torch.randint(-40, 41, (1,), generator=gen))
                attractive = 1 if score > 128 * sum(mix) else -1
            name = f"{i:06d}.jpg"
            Image.new("RGB", (WIDTH, HEIGHT), colour).save(img_dir / name, quality=95)
            attr_lines.append(f"{name} -1 -1 {attractive:2d} 1")
            lm_lines.append(name + " " + " ".join(str(v) for v in _landmarks(i % 20)))
            part_lines.append(f"{name} {part}")
    (folder / "list_attr_celeba.txt").write_text("\n".join(attr_lines) + "\n")
    (folder / "list_landmarks_align_celeba.txt").write_text("\n".join(lm_lines) + "\n")
    (folder / "list_eval_partition.txt").write_text("\n".join(part_lines) + "\n")


def _auc(prob: torch.Tensor, label: torch.Tensor) -> float:
    """Mann-Whitney: P(p_pos > p_neg) + P(p_pos == p_neg) / 2."""
    pos, neg = prob[label == 1], prob[label == 0]
    diff = pos[:, None] - neg[None, :]
    return float(((diff > 0).double() + 0.5 * (diff == 0).double()).mean())


@pytest.mark.slow
def test_compare_reports_the_test_auc_of_the_best_validation_epoch(tmp_path):
    """run_one with `select`: the reported test AUC is that of the weights of the validation with the best
    AUC (recomputed here from a copy of the weights taken at every validation)."""
    import copy

    from lightning.pytorch import Callback

    from lightning_gradsim.experiments.compare import RunSpec, run_one

    root = tmp_path / "graded"
    _write_graded_celeba(root, mix=(1, -1))  # red vs green: the ranking changes as the net learns

    class Record(Callback):
        def __init__(self):
            self.val, self.states = [], []

        def on_validation_end(self, trainer, pl_module):
            self.val.append(float(trainer.callback_metrics["val/auroc"]))
            self.states.append(copy.deepcopy(pl_module.state_dict()))

    record = Record()
    options = {"root": str(root), "lam": 100.0, "batch_size": 8, "subset": None, "lr": 0.01, "patience": 0}
    spec = RunSpec(
        setup="celeba",
        method="projection",
        seed=0,
        gate={},
        options=options,
        variant="lam=100",
        max_steps=18,
        eval_every=3,
        trainer={"callbacks": [record]},
        select={"monitor": "val/auroc", "mode": "max", "patience": 0},
    )
    row = run_one(spec)["row"]
    assert len(record.val) == 6
    # the truth, without the library's selection code: the first validation with the highest AUC
    best = next(i for i, v in enumerate(record.val) if v == max(record.val))
    assert best < len(record.val) - 1  # the last weights are not the selected ones: restoring matters
    assert row["selected_validation"] == best + 1 and row["selected_step"] == 3 * (best + 1)
    assert row["selected_value"] == pytest.approx(record.val[best])
    # the test AUC of every recorded state, by hand
    from lightning_gradsim.data.celeba import CelebAMultiTask

    test = CelebAMultiTask(root, "test")
    x = torch.stack([test[k][0] for k in range(len(test))])
    model = CelebATCDCN(method="projection", aux_weight=100.0)
    aucs = []
    for state in record.states:
        model.load_state_dict(state)
        model.eval()
        with torch.no_grad():
            aucs.append(_auc(torch.sigmoid(model(x)[0]), test.attractive))
    assert row["test_auroc"] == pytest.approx(aucs[best], abs=1e-6)
    # the best and the last weights give different test AUCs, so a missing restore would show
    assert abs(aucs[best] - aucs[-1]) > 0.01, aucs


@pytest.mark.slow
def test_compare_celeba_tables_best_epoch_auc_per_lambda_and_method(celeba_root, tmp_path):
    from lightning_gradsim.experiments.compare import compare

    result = compare(
        "celeba",
        methods=["main_only", "projection"],
        seeds=[0],
        variants={"lam": [1, 30000]},
        options={"root": str(celeba_root), "batch_size": 3, "subset": None, "patience": 0},
        select={"monitor": "val/auroc", "mode": "max", "patience": 2},
        max_steps=6,
        eval_every=2,
        out_dir=tmp_path / "out",
        progress=False,
    )
    assert all(1 <= r["selected_validation"] <= 3 and r["test_auroc"] is not None for r in result.rows)
    table = result.markdown("auroc")
    assert "| method | lam=1 | lam=30000 |" in table and "| projection |" in table
    assert "Main-task test AUC (weights of the best validation)" in table
    written = (tmp_path / "out" / "table.md").read_text()
    assert "test error" in written and "test AUC" in written
