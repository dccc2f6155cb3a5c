"""The scripts in ``examples/`` run as a user runs them: ``python examples/<name>.py ...``.

``imagenet_pairs.py`` runs on a small generated folder in the ImageNet layout with 2 CPU processes
started by Lightning's own launcher (``--devices 2 --strategy ddp``: Lightning re-runs the script for
rank 1), and must leave a checkpoint and the monitor's metrics behind.
"""

from __future__ import annotations

import csv
import sys
from pathlib import Path

import pytest

from tests._imagenet_fixtures import PRESET_CLASSES, make_image_folder
from tests._launch import TIMEOUT, clean_env, run

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
SCRIPTS = sorted(p.name for p in EXAMPLES.glob("*.py"))


def python(script: str, *args: str) -> list[str]:
    return [sys.executable, str(EXAMPLES / script), *args]


def test_the_examples_are_these():
    assert {"imagenet_pairs.py", "plain_pytorch.py"} <= set(SCRIPTS)


@pytest.mark.parametrize("script", SCRIPTS)
def test_help(script):
    out = run(python(script, "--help"), env=clean_env())
    assert out.startswith("usage:") and "--help" in out


def test_plain_pytorch_trains_and_checks_finite():
    out = run(python("plain_pytorch.py", "--steps", "30", "--log-every", "10"), env=clean_env())
    lines = out.strip().splitlines()
    assert [line.split()[1] for line in lines[:-1]] == ["0", "10", "20", "29"]
    assert lines[-1].startswith("main-task test error") and "0 skipped" in lines[-1]
    # the loss went down: 30 RMSprop steps on the digits
    first, last = (float(line.split("main loss")[1].split()[0]) for line in (lines[0], lines[-2]))
    assert last < first


@pytest.mark.ddp
@pytest.mark.timeout(2 * TIMEOUT)
def test_imagenet_pairs_under_lightnings_ddp_launcher(tmp_path):
    root = make_image_folder(tmp_path / "imagenet", n_train=8, n_val=2, size=16, classes=PRESET_CLASSES)
    out_dir = tmp_path / "run"
    args = ["--root", str(root), "--out", str(out_dir), "--image-size", "16", "--batch-size", "4"]
    args += ["--num-workers", "0", "--max-steps", "3", "--val-every", "3", "--log-every", "1"]
    args += ["--devices", "2", "--strategy", "ddp", "--accelerator", "cpu"]
    out = run(python("imagenet_pairs.py", *args), env=clean_env())
    assert "Initializing distributed: GLOBAL_RANK: 1, MEMBER: 2/2" in out  # Lightning started rank 1
    checkpoints = sorted(p.name for p in (out_dir / "checkpoints").glob("*.ckpt"))
    assert "last.ckpt" in checkpoints and any(name.startswith("epoch=") for name in checkpoints)
    with open(out_dir / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    logged = {key for row in rows for key, value in row.items() if value}
    assert {"gradsim/cos/aux", "gradsim/weight/aux", "gradsim/gate_open/aux", "train/loss", "val/auroc"} <= logged
    assert (out_dir / "gradsim.png").is_file()
