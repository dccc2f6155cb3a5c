"""What `pip install` gives: packaged configs by name, `gradsim --version`, the LICENSE, a working wheel."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest
import yaml

import lightning_gradsim
from lightning_gradsim.cli import main as gradsim
from lightning_gradsim.configs import CONFIG_DIR, ConfigNotFoundError, list_configs, resolve_config, resolve_config_args

REPO = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- configs by name
def test_config_names_are_unique_yaml_file_stems():
    files = [p for p in CONFIG_DIR.rglob("*") if p.is_file() and "__pycache__" not in p.parts]
    yamls = [p for p in files if p.suffix == ".yaml"]
    assert sorted(p.name for p in files if p.suffix != ".yaml") == ["__init__.py"], "only *.yaml ship as configs"
    configs = list_configs()
    assert len(configs) == len(yamls) == len({p.stem for p in yamls}), "a name is in two groups"
    assert {"rotated_digits", "rotated_mnist", "celeba", "rotated_90", "near_trimaran_catamaran"} <= set(configs)
    for name, path in configs.items():
        assert path.stem == name and path.parent.parent == CONFIG_DIR  # <group>/<name>.yaml
        assert isinstance(yaml.safe_load(path.read_text()), dict), name


def test_config_name_clash_is_an_error(tmp_path, monkeypatch):
    for group in ("a", "b"):
        (tmp_path / group).mkdir()
        (tmp_path / group / "same.yaml").write_text("setup: rotated_digits\n")
    monkeypatch.setattr("lightning_gradsim.configs.CONFIG_DIR", tmp_path)
    with pytest.raises(RuntimeError, match=r"unique across groups, but same: a/same.yaml, b/same.yaml"):
        list_configs()


def test_examples_folder_holds_no_config_copies():
    # one copy of each config: in the package; examples/ keeps the Python example scripts
    assert not sorted((REPO / "examples").rglob("*.y*ml"))


def test_resolve_config(tmp_path, monkeypatch):
    packaged = CONFIG_DIR / "digits" / "rotated_90.yaml"
    assert resolve_config("rotated_90") == str(packaged)
    assert resolve_config(str(packaged)) == str(packaged)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "rotated_90").write_text("seed_everything: 1\n")  # an existing file always wins: a path is a path
    assert resolve_config("rotated_90") == "rotated_90"
    mine = tmp_path / "mine.yaml"
    mine.write_text("setup: rotated_digits\n")
    assert resolve_config(str(mine)) == str(mine) and resolve_config("mine.yaml") == "mine.yaml"
    inline = "{trainer: {max_steps: 5}}"  # LightningCLI's inline YAML passes through
    assert resolve_config(inline) == inline
    with pytest.raises(ConfigNotFoundError, match=r"named 'rotated_digit'; close matches: rotated_digits"):
        resolve_config("rotated_digit")
    with pytest.raises(ConfigNotFoundError, match=r"packaged configs: .*rotated_digits"):
        resolve_config("zzzz")  # nothing close: the whole list
    with pytest.raises(
        ConfigNotFoundError,
        match=r"no such config file 'examples/digits/rotated_90.yaml'; "
        r"the packaged config 'rotated_90' is --config rotated_90",
    ):
        resolve_config("examples/digits/rotated_90.yaml")


def test_resolve_config_args_is_idempotent_and_leaves_sys_argv_alone():
    argv = ["--config", "rotated_90", "-c", "rotated_45", "--config=cross_stitch_digits", "--trainer.max_steps", "5"]
    before, sys_argv = list(argv), list(sys.argv)
    once = resolve_config_args(argv)
    assert argv == before and sys.argv == sys_argv
    assert once == [
        "--config",
        str(CONFIG_DIR / "digits" / "rotated_90.yaml"),
        "-c",
        str(CONFIG_DIR / "digits" / "rotated_45.yaml"),
        f"--config={CONFIG_DIR / 'baselines' / 'cross_stitch_digits.yaml'}",
        "--trainer.max_steps",
        "5",
    ]
    # a re-run of the same command line (Lightning's DDP launcher) resolves to the same files
    assert resolve_config_args(argv) == once and resolve_config_args(once) == once


def test_fit_resolves_a_name_before_lightningcli_parses(capsys):
    argv0 = list(sys.argv)
    assert gradsim(["fit", "--config", "rotated_90", "--print_config"]) == 0
    assert sys.argv == argv0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["data"]["class_path"] == "lightning_gradsim.data.RotatedDigitsDataModule"
    assert printed["data"]["init_args"]["angle"] == 90 and printed["trainer"]["max_steps"] == 1500


def test_unknown_config_is_a_clear_error(capsys):
    assert gradsim(["fit", "--config", "rotated_91"]) == 2
    assert "gradsim fit: no config file or packaged config named 'rotated_91'; close matches: rotated_90" in (
        capsys.readouterr().err
    )
    assert gradsim(["compare", "--config", "rotated_digts"]) == 2  # one line, status 2, also from Python
    assert "close matches: rotated_digits" in capsys.readouterr().err


def test_gradsim_configs_lists_and_prints(capsys):
    assert gradsim(["configs"]) == 0
    listing = dict(line.split() for line in capsys.readouterr().out.splitlines())
    assert listing == {name: path.parent.name for name, path in list_configs().items()}
    assert gradsim(["configs", "rotated_digits"]) == 0
    assert capsys.readouterr().out == (CONFIG_DIR / "digits" / "rotated_digits.yaml").read_text()
    assert gradsim(["configs", "rotated_digits", "--path"]) == 0
    assert capsys.readouterr().out.strip() == str(CONFIG_DIR / "digits" / "rotated_digits.yaml")
    assert gradsim(["configs", "nope_nope"]) == 2


# ----------------------------------------------------------------------------- version, license
def test_version_has_one_source(capsys):
    assert gradsim(["--version"]) == 0
    assert capsys.readouterr().out == f"lightning-gradsim {lightning_gradsim.__version__}\n"
    pyproject = (REPO / "pyproject.toml").read_text()
    assert 'dynamic = ["version"]' in pyproject and 'attr = "lightning_gradsim.__version__"' in pyproject
    assert "\nversion =" not in pyproject.split("[tool.setuptools.dynamic]")[0]


def test_license_is_the_apache_2_text():
    text = (REPO / "LICENSE").read_text()
    assert text.splitlines()[1].strip() == "Apache License" and "Version 2.0, January 2004" in text
    assert "END OF TERMS AND CONDITIONS" in text and "Copyright 2026 The lightning_gradsim authors" in text
    assert 'license = "Apache-2.0"' in (REPO / "pyproject.toml").read_text()


# ----------------------------------------------------------------------------- the built wheel
def _source_tree(dest: Path) -> Path:
    """The repository's files (tracked and untracked, minus what git ignores) copied to ``dest``."""
    try:
        listed = (
            subprocess.run(
                ["git", "ls-files", "-z", "-co", "--exclude-standard"], cwd=REPO, check=True, capture_output=True
            )
            .stdout.decode()
            .split("\0")
        )
    except (OSError, subprocess.CalledProcessError):  # not a git checkout: everything but the usual build output
        ignore = shutil.ignore_patterns(".git", ".venv", "runs", "site", "build", "dist", "*.egg-info", "__pycache__")
        shutil.copytree(REPO, dest, ignore=ignore)
        return dest
    for rel in filter(None, listed):
        if (REPO / rel).is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / rel, dest / rel)
    return dest


def _run(cmd: list[str], **kwargs) -> str:
    proc = subprocess.run(cmd, capture_output=True, text=True, **kwargs)
    assert proc.returncode == 0, f"{cmd} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


@pytest.mark.slow
def test_wheel_runs_outside_the_repository(tmp_path):
    """sdist -> wheel (as `python -m build` does), both archives' contents, then the installed wheel
    from another folder: `gradsim --version`, configs by name, and a short main job that gives the
    same numbers as the source tree."""
    pytest.importorskip("build", reason="the dev extra installs `build`")
    version = lightning_gradsim.__version__
    dist = tmp_path / "dist"
    _run([sys.executable, "-m", "build", "--no-isolation", "--outdir", str(dist), str(_source_tree(tmp_path / "src"))])
    (sdist,), (wheel,) = dist.glob("*.tar.gz"), dist.glob("*.whl")
    assert (
        sdist.name == f"lightning_gradsim-{version}.tar.gz"
        and wheel.name == f"lightning_gradsim-{version}-py3-none-any.whl"
    )
    configs = {path.relative_to(CONFIG_DIR.parent.parent).as_posix() for path in list_configs().values()}
    license_text = (REPO / "LICENSE").read_bytes()
    with tarfile.open(sdist) as tar:
        root = f"lightning_gradsim-{version}/"
        names = set(tar.getnames())
        assert configs <= {n.removeprefix(root) for n in names}
        assert tar.extractfile(root + "LICENSE").read() == license_text
    with zipfile.ZipFile(wheel) as whl:
        names = set(whl.namelist())
        assert configs <= names and "lightning_gradsim/py.typed" in names
        info = f"lightning_gradsim-{version}.dist-info/"
        assert whl.read(info + "licenses/LICENSE") == license_text
        metadata = whl.read(info + "METADATA").decode()
        assert f"\nVersion: {version}\n" in metadata and "\nLicense-Expression: Apache-2.0\n" in metadata
        assert "gradsim = lightning_gradsim.cli:main" in whl.read(info + "entry_points.txt").decode()

    target = tmp_path / "site-packages"
    _run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--no-deps",
            "--no-index",
            "--no-compile",
            "--quiet",
            "--target",
            str(target),
            str(wheel),
        ]
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    # only the installed wheel (its dependencies come from this interpreter's site-packages)
    env = {
        **os.environ,
        "PYTHONPATH": str(target),
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
        "PIP_DISABLE_PIP_VERSION_CHECK": "1",
    }
    exe = str(target / "bin" / "gradsim")
    where = _run(
        [sys.executable, "-c", "import lightning_gradsim; print(lightning_gradsim.__file__)"], cwd=elsewhere, env=env
    )
    assert Path(where.strip()).is_relative_to(target)
    assert _run([exe, "--version"], cwd=elsewhere, env=env) == f"lightning-gradsim {version}\n"
    assert Path(_run([exe, "configs", "rotated_digits", "--path"], cwd=elsewhere, env=env).strip()) == (
        target / "lightning_gradsim" / "configs" / "digits" / "rotated_digits.yaml"
    )
    short = [
        "--methods",
        "main_only",
        "unweighted",
        "--seeds",
        "0",
        "--vary",
        "angle=90",
        "--max-steps",
        "20",
        "--eval-every",
        "10",
        "--jobs",
        "1",
        "--no-progress",
        "--out-dir",
        "out",
    ]
    printed = _run([exe, "compare", "--config", "rotated_digits", *short], cwd=elsewhere, env=env)
    out = elsewhere / "out"
    assert {"runs.csv", "summary.csv", "table.md", "result.json", "accuracy.png", "cosine.png"} <= {
        p.name for p in out.iterdir()
    }
    with open(out / "runs.csv") as f:
        runs = list(csv.DictReader(f))
    assert [(r["setup"], r["variant"], r["method"], r["seed"], r["steps"]) for r in runs] == [
        ("rotated_digits", "angle=90", m, "0", "20") for m in ("main_only", "unweighted")
    ]
    for row in runs:
        assert abs(float(row["test_error"]) + float(row["test_acc"]) - 1.0) < 1e-6
        assert f"| {row['method']} | {100 * float(row['test_error']):.2f} ± 0.00 |" in printed
    assert len(json.loads((out / "result.json").read_text())["rows"]) == 2
    # the same short run from the source tree, in this process: the wheel behaves as the checkout
    from lightning_gradsim.experiments.compare_cli import main as compare_main

    assert compare_main(["--config", "rotated_digits", *short[:-1], str(tmp_path / "ref")]) == 0
    with open(tmp_path / "ref" / "runs.csv") as f:
        reference = list(csv.DictReader(f))
    assert [float(r["test_error"]) for r in runs] == pytest.approx(
        [float(r["test_error"]) for r in reference], abs=1e-6
    )


def test_readme_names_the_core_dependencies_and_they_have_no_upper_pin_on_torch():
    """README's install line names exactly pyproject's dependencies; torch and torchvision are not capped
    in the package metadata (scripts/setup.sh bounds them with constraints.txt instead)."""
    import re

    block = (REPO / "pyproject.toml").read_text().split("\ndependencies = [", 1)[1].split("\n]", 1)[0]
    deps = re.findall(r'^\s*"([^"]+)"', block, flags=re.M)  # (tomllib is Python 3.11+)
    names = {re.split(r"[<>=!~\[ ;]", d, maxsplit=1)[0].lower() for d in deps}
    readme = (REPO / "README.md").read_text()
    line = next(ln for ln in readme.splitlines() if "(needs " in ln)
    listed = {n.strip().lower() for n in line.split("(needs ", 1)[1].rstrip(")").split(",")}
    assert listed == names, (listed, names)
    for d in deps:
        if re.split(r"[<>=!~\[ ;]", d, maxsplit=1)[0].lower() in ("torch", "torchvision"):
            assert "<" not in d, d
    constraints = (REPO / "constraints.txt").read_text()
    assert "torch<=" in constraints and "-c constraints.txt" in (REPO / "scripts" / "setup.sh").read_text()
