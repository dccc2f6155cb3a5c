"""Every ``gradsim`` command checks its arguments before it trains (one line on stderr, status 2),
names the extra a missing package comes with, and the long ones keep their results as they go and
``--resume`` after a crash."""

from __future__ import annotations

import csv
import sys

import pytest

from lightning_gradsim.cli import COMMANDS
from lightning_gradsim.cli import main as gradsim
from lightning_gradsim.cli_checks import REQUIREMENTS

UNWRITABLE = "/proc/gradsim-out"  # /proc refuses new folders, even to root

# one user error per command (each fails before any data is read or any step is taken)
BAD_ARGUMENTS = [
    ("table1", ["--source", "digits", "--out", UNWRITABLE], "--out '/proc/gradsim-out': cannot write there"),
    ("table1", ["--source", "digits", "--angles", "400"], "angles are degrees in [0, 360), got 400"),
    ("table1", ["--source", "digits", "--angles", "-90"], "angles are degrees in [0, 360), got -90"),
    ("table1", ["--source", "digits", "--angles", "0,90,0"], "repeated angle"),
    ("table1", ["--source", "digits", "--seeds", "0"], "--seeds: must be an integer >= 1, got '0'"),
    ("table1", ["--source", "digits", "--cosine-ema", "1"], "--cosine-ema: must be a number in [0, 1), got '1'"),
    ("table1", ["--root", "/nonexistent/mnist"], "--root '/nonexistent/mnist': no such folder"),
    ("table1", ["--source", "digits", "--methods", "nope"], "Unknown method 'nope'"),
    ("table1", ["--source", "digits", "--device", "cuda:99"], "CUDA device(s) visible here"),
    ("pairs", ["--source", "mnist", "--root", "/nonexistent"], "--root '/nonexistent': no such file or folder"),
    ("pairs", ["--root", "/tmp", "--threshold", "2"], "--threshold: must be a number in [-1, 1], got '2'"),
    ("compare", ["--max-steps", "0"], "--max-steps: must be an integer >= 1"),
    ("compare", ["--out-dir", UNWRITABLE], "cannot write there"),
    ("compare", ["--vary", "angle"], "--vary 'angle' must look like key=v1,v2"),
    ("compare", ["--setup", "nope", "--out-dir", "{tmp}"], "Unknown setup 'nope'"),
    ("distances", ["--root", "/nonexistent", "--hierarchy", "/nonexistent"], "--root '/nonexistent': no such folder"),
    ("toy", ["--steps", "0"], "--steps: must be an integer >= 1"),
    ("toy", ["figure2", "--out-dir", UNWRITABLE], "cannot write there"),
    ("gridworld", ["--out", UNWRITABLE], "cannot write there"),
    ("gridworld", ["--gamma", "1.5"], "--gamma: must be a number in [0, 1]"),
    ("atari", ["--seeds", "0"], "--seeds: must be an integer >= 1"),
    ("atari", ["--teacher", "/nonexistent.pt", "--out", "{tmp}"], "--teacher '/nonexistent.pt': no such file"),
    ("relatedness", ["--lr", "0"], "--lr: must be a number in (0, inf)"),
    ("figures", ["--out", UNWRITABLE], "cannot write there"),
    ("configs", ["nope"], "no config file or packaged config named 'nope'"),
    ("fit", ["--config", "rotated_90", "--trainer.max_steps", "x"], 'Parser key "trainer.max_steps"'),
]


@pytest.mark.parametrize("command, args, message", BAD_ARGUMENTS, ids=lambda v: v if isinstance(v, str) else None)
def test_a_user_error_is_one_line_and_status_2(command, args, message, tmp_path, capsys):
    args = [a.replace("{tmp}", str(tmp_path / "out")) for a in args]
    assert gradsim([command, *args]) == 2
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert err.startswith(f"gradsim {command}: ") and message in err, err
    assert "\n" not in err and "Traceback" not in err and "usage:" not in err
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").rglob("*.csv"))  # nothing trained


def test_an_existing_file_is_no_output_folder(tmp_path, capsys):
    target = tmp_path / "results.txt"
    target.write_text("keep me")
    for command, flag in (("table1", "--out"), ("compare", "--out-dir"), ("figures", "--out")):
        extra = ["--source", "digits"] if command == "table1" else []
        assert gradsim([command, *extra, flag, str(target)]) == 2
        assert "is an existing file, not a folder" in capsys.readouterr().err
    assert target.read_text() == "keep me"


def test_every_command_declares_what_it_needs():
    assert set(REQUIREMENTS) == set(COMMANDS)


@pytest.mark.parametrize(
    "command, module, extra",
    [
        ("table1", "sklearn", "experiments"),
        ("compare", "yaml", "experiments"),
        ("fit", "jsonargparse", "experiments"),
        ("distances", "scipy", "imagenet"),
        ("atari", "minatar", "atari"),
        ("gridworld", "numpy", "experiments"),
    ],
)
def test_a_missing_extra_is_named_before_the_command_starts(command, module, extra, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, module, None)  # import fails, find_spec says "not installed"
    assert gradsim([command]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"gradsim {command}: needs ") and f'pip install "lightning-gradsim[{extra}' in err, err
    assert "\n" not in err


def test_a_missing_core_dependency_says_so(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "torchvision", None)
    assert gradsim(["table1"]) == 2
    assert "pip install torchvision (dependencies of lightning-gradsim)" in capsys.readouterr().err


# ------------------------------------------------------------------------------- table1 --resume
TABLE1 = [
    "table1",
    "--source",
    "digits",
    "--angles",
    "0,90",
    "--methods",
    "main_only,unweighted",
    "--seeds",
    "2",
    "--epochs",
    "3",
    "--hidden",
    "16",
    "--depth",
    "2",
    "--no-progress",
]


def _rows(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def test_table1_keeps_each_epoch_and_resumes_after_a_crash_exactly(tmp_path, monkeypatch, capsys):
    from lightning_gradsim.experiments import table1

    whole, broken = tmp_path / "whole", tmp_path / "broken"
    assert gradsim([*TABLE1, "--out", str(whole)]) == 0
    assert not (whole / "table1_checkpoint.pt").exists()  # removed once the outputs are written
    assert {r["epoch"] for r in _rows(whole / "epochs.csv")} == {"1", "2", "3"}

    calls = {"n": 0, "crash_at": 3}
    train_epoch = table1.StackedProtocol.train_epoch

    def counted(self):
        calls["n"] += 1
        if calls["n"] == calls["crash_at"]:
            raise RuntimeError("simulated crash")
        return train_epoch(self)

    monkeypatch.setattr(table1.StackedProtocol, "train_epoch", counted)
    with pytest.raises(RuntimeError, match="simulated crash"):
        gradsim([*TABLE1, "--out", str(broken)])
    calls.update(n=0, crash_at=None)
    assert (broken / "table1_checkpoint.pt").exists() and not (broken / "runs.csv").exists()
    assert len(_rows(broken / "epochs.csv")) == 2 * len(_rows(whole / "epochs.csv")) // 3  # 2 epochs kept
    capsys.readouterr()

    # without --resume the unfinished run is not overwritten; with other settings it is not continued
    assert gradsim([*TABLE1, "--out", str(broken)]) == 2
    assert "holds an unfinished run" in capsys.readouterr().err
    other = [a if a != "16" else "8" for a in TABLE1]
    assert gradsim([*other, "--out", str(broken), "--resume"]) == 2
    assert "hidden: 16 there, 8 now" in capsys.readouterr().err

    assert gradsim([*TABLE1, "--out", str(broken), "--resume"]) == 0
    assert calls["n"] == 1  # the resumed run trained only the third epoch
    # the same numbers as without the crash: weights, optimizer, gates and data order all restored
    assert _rows(broken / "runs.csv") == _rows(whole / "runs.csv")
    assert _rows(broken / "epochs.csv") == _rows(whole / "epochs.csv")
    assert not (broken / "table1_checkpoint.pt").exists()


# ------------------------------------------------------------------------------ compare --resume
def test_compare_keeps_finished_runs_and_resumes(tmp_path, monkeypatch, capsys):
    from lightning_gradsim.experiments import compare as compare_module

    args = ["compare", "--setup", "rotated_digits", "--methods", "main_only", "sum", "--seeds", "0"]
    args += ["--max-steps", "2", "--eval-every", "2", "--no-progress", "--out-dir"]
    whole, broken = tmp_path / "whole", tmp_path / "broken"
    assert gradsim([*args, str(whole)]) == 0
    assert not (whole / "finished").exists()

    run_one, ran = compare_module.run_one, []

    def crash_on_second(spec):
        ran.append(spec.method)
        if len(ran) == 2:
            raise RuntimeError("simulated crash")
        return run_one(spec)

    monkeypatch.setattr(compare_module, "run_one", crash_on_second)
    with pytest.raises(RuntimeError, match="simulated crash"):
        gradsim([*args, str(broken)])
    assert len(list((broken / "finished").glob("*.json"))) == 1  # the first run was kept
    capsys.readouterr()
    assert gradsim([*args, str(broken)]) == 2
    assert "add --resume" in capsys.readouterr().err
    ran.clear()
    monkeypatch.setattr(compare_module, "run_one", lambda spec: (ran.append(spec.method), run_one(spec))[1])
    assert gradsim([*args, str(broken), "--resume"]) == 0
    assert ran == ["sum"]  # only the run that had not finished
    strip = ("seconds",)
    rows = [{k: v for k, v in r.items() if k not in strip} for r in _rows(broken / "runs.csv")]
    assert rows == [{k: v for k, v in r.items() if k not in strip} for r in _rows(whole / "runs.csv")]
