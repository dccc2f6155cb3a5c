"""The command dispatcher, the example configs' shape, and ``gradsim fit``/``test`` with loader workers."""

from __future__ import annotations

import pytest
import yaml

from lightning_gradsim.cli import COMMANDS
from lightning_gradsim.cli import main as gradsim
from lightning_gradsim.configs import CONFIG_DIR

from .._imagenet_fixtures import PRESET_CLASSES, make_image_folder

DIGIT_CONFIGS = sorted(
    p for p in (CONFIG_DIR / "digits").glob("rotated_*.yaml") if p.stem.removeprefix("rotated_").isdigit()
)
PAIR_CONFIGS = sorted((CONFIG_DIR / "imagenet_pairs").glob("*.yaml"))


@pytest.fixture(scope="module")
def tiny_imagenet(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("imagenet"), n_train=6, n_val=2, size=16, classes=PRESET_CLASSES)


def test_commands_registered(capsys):
    for name in ("fit", "validate", "test", "compare", "distances", "toy"):
        assert name in COMMANDS
    assert gradsim(["--help"]) == 0
    assert "compare" in capsys.readouterr().out
    assert gradsim(["nope"]) == 2


def test_example_configs_exist():
    assert len(DIGIT_CONFIGS) == 5
    names = {p.stem for p in PAIR_CONFIGS}
    for pair in (
        "near_trimaran_catamaran",
        "near_husky_malamute",
        "near_swissdog_entlebucher",
        "far_trafficlight_rockpython",
        "far_hotpot_slot",
        "far_komodo_trafficlight",
    ):
        assert {pair, pair + "_ddp"} <= names
    for path in PAIR_CONFIGS:
        trainer = yaml.safe_load(path.read_text())["trainer"]
        if path.stem.endswith("_ddp"):
            assert trainer["strategy"] == "ddp" and trainer["devices"] > 1 and "num_nodes" in trainer
        else:
            assert trainer["devices"] == 1


def test_rotated_mnist_config_says_it_is_not_the_papers_protocol():
    from lightning_gradsim.configs import list_configs

    text = list_configs()["rotated_mnist"].read_text()
    assert "NOT the paper's protocol" in text and "gradsim table1" in text and "variant of the main job" not in text


def test_imagenet_pair_configs_and_gradsim_pairs_share_one_protocol():
    """One ImageNet class-pair protocol (docs/protocols.md): the `gradsim fit` configs train as long,
    evaluate as often and take as many images per task and step as `gradsim pairs` does."""
    from lightning_gradsim.experiments.pairs import DEFAULTS

    want = DEFAULTS["imagenet"]
    for path in PAIR_CONFIGS:
        cfg = yaml.safe_load(path.read_text())
        trainer, data, model = cfg["trainer"], cfg["data"]["init_args"], cfg["model"]["init_args"]
        assert trainer["max_steps"] == want["steps"] and trainer["val_check_interval"] == want["eval_every"], path
        per_step = data["batch_size"] * trainer["devices"] * trainer["num_nodes"]
        assert per_step == want["batch_size"], path  # per task, summed over the devices
        assert model["backbone"] == want["model"] and model["lr"] == want["lr"] and data["image_size"] == 64


# Every example config is run as a user runs it (Lightning's own DDP launcher included) in
# tests/lightning/test_launch.py.


@pytest.mark.slow
def test_fit_then_test_with_workers(tmp_path, tiny_imagenet):
    args = [
        "--config",
        "far_hotpot_slot",
        "--trainer.default_root_dir",
        str(tmp_path),
        "--trainer.accelerator",
        "cpu",
        "--trainer.max_steps",
        "2",
        "--trainer.val_check_interval",
        "2",
        "--data.root",
        str(tiny_imagenet),
        "--data.pair",
        "null",
        "--data.main_class",
        "trimaran",
        "--data.aux_class",
        "catamaran",
        "--data.image_size",
        "16",
        "--data.batch_size",
        "2",
        "--data.num_workers",
        "1",
        "--model.backbone",
        "tiny_cnn",
    ]
    assert gradsim(["fit", *args]) == 0
    ckpts = list(tmp_path.rglob("*.ckpt"))
    assert ckpts, "ModelCheckpoint should have saved the best val/auroc model"
    assert gradsim(["test", *args, "--ckpt_path", str(ckpts[0])]) == 0


def test_fit_bad_config_is_a_clear_error(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "model:\n  class_path: lightning_gradsim.experiments.MultiTaskClassifier\n  init_args:\n    methodd: sum\n"
    )
    assert gradsim(["fit", "--config", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    # one line that names the option and the class, not jsonargparse's usage text
    assert err.startswith("gradsim fit: ") and "\n" not in err and "usage:" not in err
    assert "Option 'methodd' is not accepted" in err and "MultiTaskClassifier" in err


def test_models_used_by_the_configs():
    import torch

    from lightning_gradsim.models import MultiHeadNet, build_trunk, mlp_trunk

    net = MultiHeadNet(*mlp_trunk(64), tasks={"main": 10, "rotated": 10})
    # 3x100 MLP by hand: 64*100+100 + 2*(100*100+100) trunk, 2*(100*10+10) heads
    assert sum(p.numel() for p in net.shared_parameters()) == 26_700
    assert sum(p.numel() for p in net.parameters()) == 26_700 + 2_020
    assert net(torch.zeros(3, 1, 8, 8), task="rotated").shape == (3, 10)
    trunk, dim = build_trunk("resnetv2_18", in_chans=3)  # random init, nothing downloaded
    assert dim == 512 and trunk(torch.zeros(2, 3, 32, 32)).shape == (2, 512)
    with pytest.raises(ValueError, match="Unknown timm backbone"):
        build_trunk("no_such_net")
    with pytest.raises(ValueError, match="input_dim"):
        build_trunk("mlp")
    with pytest.raises(KeyError, match="No head for task"):
        net(torch.zeros(1, 64), task="aux")
