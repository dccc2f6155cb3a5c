"""``gradsim compare``: table shape, files, independent checks (main_only ignores the auxiliary task), plug-ins."""

from __future__ import annotations

import csv
import uuid

import pytest
import yaml

from lightning_gradsim import GradientGate
from lightning_gradsim.cli import main as gradsim
from lightning_gradsim.experiments.compare import build_setup, compare, list_setups, register_setup
from lightning_gradsim.methods import register_method

TINY = {"max_images": 300, "batch_size": 16}


@pytest.mark.slow
def test_compare_table_files_and_main_only_ignores_aux(tmp_path):
    result = compare(
        "rotated_digits",
        methods=["main_only", "sum"],
        seeds=[0, 1],
        variants={"angle": [0, 180]},
        options=TINY,
        max_steps=12,
        eval_every=6,
        out_dir=tmp_path,
        progress=False,
    )
    assert len(result.rows) == 8 and len(result.summary) == 4
    assert result.variants == ["angle=0", "angle=180"]
    assert {(s["variant"], s["method"], s["n"]) for s in result.summary} == {
        (v, m, 2) for v in ("angle=0", "angle=180") for m in ("main_only", "sum")
    }
    for name in ("runs", "summary", "table", "json", "accuracy", "cosine"):
        assert (tmp_path / result.files[name].split("/")[-1]).stat().st_size > 0
    with open(tmp_path / "summary.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 4 and set(rows[0]) == {"variant", "method", "n", "mean_error", "std_error"}
    table = result.markdown().splitlines()
    assert table[0] == "| method | angle=0 | angle=180 |" and len(table) == 2 + 2 + 2
    assert all(r["steps"] == 12 for r in result.rows)
    assert all(len(run["val_acc"]) == 2 for run in result.runs)  # validated at steps 6 and 12
    # independent truth: main_only never uses the auxiliary gradient on the shared trunk, and the
    # main head only sees the main loss, so the auxiliary images (the angle) cannot change its result
    by = {(r["variant"], r["method"], r["seed"]): r["test_error"] for r in result.rows}
    for seed in (0, 1):
        assert by[("angle=0", "main_only", seed)] == by[("angle=180", "main_only", seed)]
    # mean ± std by hand
    errs = [by[("angle=0", "sum", s)] for s in (0, 1)]
    s = next(s for s in result.summary if s["variant"] == "angle=0" and s["method"] == "sum")
    assert s["mean_error"] == pytest.approx(sum(errs) / 2)
    assert s["std_error"] == pytest.approx(abs(errs[0] - errs[1]) / 2**0.5)


def test_sum_with_zero_aux_weight_equals_main_only():
    result = compare(
        "rotated_digits",
        methods=["main_only", "sum"],
        seeds=[3],
        options=TINY,
        gate={"aux_weight": 0.0},
        max_steps=8,
        eval_every=8,
        out_dir=None,
        progress=False,
    )
    a, b = (r["test_error"] for r in result.rows)
    assert a == b


def test_registered_method_and_setup_plug_in():
    name = f"half_sum_{uuid.uuid4().hex[:6]}"

    @register_method(name)
    def half_sum(**kwargs):
        kwargs.pop("aux_weight", None)
        return GradientGate(rule="sum", aux_weight=0.5, **kwargs)

    setup_name = f"tiny_digits_{uuid.uuid4().hex[:6]}"
    calls = []

    @register_setup(setup_name, "tiny digits for tests")
    def tiny(method, seed, gate, **options):
        calls.append((method, seed, gate, options))
        return build_setup("rotated_digits", method, seed, gate, **TINY, **options)

    assert list_setups()[setup_name] == "tiny digits for tests"
    result = compare(
        setup_name,
        methods=[name],
        seeds=[0],
        options={"angle": 90},
        max_steps=4,
        eval_every=4,
        out_dir=None,
        progress=False,
    )
    assert calls == [(name, 0, {}, {"angle": 90})]
    assert result.rows[0]["method"] == name
    with pytest.raises(ValueError, match="already registered"):
        register_setup(setup_name)(lambda **kw: None)


def test_builtin_setups_are_lazy_entries_that_resolve():
    from lightning_gradsim.experiments.registry import SETUPS, get_setup

    assert set(SETUPS) <= set(list_setups())
    for name, (_entry, description) in SETUPS.items():
        assert callable(get_setup(name)) and description, name
    with pytest.raises(ValueError, match="already registered"):
        register_setup("celeba")(lambda **kw: None)
    with pytest.raises(ValueError, match="Unknown setup 'nope'.*rotated_digits"):
        build_setup("nope", "sum", 0)


def test_compare_errors():
    with pytest.raises(ValueError, match="Unknown method.*nope"):
        compare(methods=["nope"], out_dir=None)
    with pytest.raises(ValueError, match="Unknown setup 'nope'"):
        compare("nope", out_dir=None)
    with pytest.raises(ValueError, match="at least one seed"):
        compare(seeds=[], out_dir=None)


@pytest.mark.slow
def test_compare_command_with_config_and_parallel_jobs(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {
                "setup": "rotated_digits",
                "methods": ["main_only", "unweighted"],
                "seeds": [0, 1],
                "options": TINY,
                "max_steps": 6,
                "eval_every": 3,
                "jobs": 2,
            }
        )
    )
    code = gradsim(
        [
            "compare",
            "--config",
            str(cfg),
            "--vary",
            "angle=45",
            "--seeds",
            "0",
            "--out-dir",
            str(tmp_path / "out"),
            "--no-progress",
        ]
    )
    out = capsys.readouterr().out
    assert code == 0
    assert "| method | angle=45 |" in out and "| unweighted |" in out and "over 1 seed(s)" in out
    assert (tmp_path / "out" / "table.md").read_text().count("| main_only |") == 1
    assert gradsim(["compare", "--methods", "nope", "--out-dir", str(tmp_path / "x")]) == 2
    assert "Unknown method" in capsys.readouterr().err
    assert gradsim(["compare", "--list", "--import", "json"]) == 0
    assert "rotated_digits" in capsys.readouterr().out
    bad = tmp_path / "bad.yaml"
    bad.write_text("setupp: rotated_digits\n")
    assert gradsim(["compare", "--config", str(bad)]) == 2
    assert "unknown key(s) ['setupp']" in capsys.readouterr().err


@pytest.mark.slow
def test_class_pair_setup(tmp_path):
    from .._imagenet_fixtures import CATAMARAN, TRIMARAN, make_image_folder

    root = make_image_folder(tmp_path / "imagenet", n_train=6, n_val=3, size=16)
    result = compare(
        "class_pair",
        methods=["unweighted"],
        seeds=[0],
        max_steps=3,
        eval_every=3,
        out_dir=None,
        progress=False,
        options={
            "root": str(root),
            "main_class": TRIMARAN,
            "aux_class": CATAMARAN,
            "image_size": 16,
            "batch_size": 4,
            "backbone": "tiny_cnn",
        },
    )
    row = result.rows[0]
    assert row["steps"] == 3 and 0.0 <= row["test_error"] <= 1.0 and 0.0 <= row["test_auroc"] <= 1.0
