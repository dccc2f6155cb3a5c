"""Every example config run as a user runs it, shortened, under every launcher Lightning uses.

* Single-device configs: ``gradsim fit`` in this process (2 steps on tiny generated data).
* DDP configs: ``gradsim fit`` as a command with 2 CPU processes through Lightning's own launcher (the
  config's ``strategy: ddp``; ``--trainer.accelerator cpu --trainer.devices 2``): Lightning starts rank 1
  by re-running the command line, which is what hung before (rank 1 saw no sub-command).
* One config per family is run fully: ``fit``, then ``gradsim validate`` and ``gradsim test`` on the
  checkpoint the run wrote. The others differ from it only in class names or the angle (checked below),
  so they are fitted for 2 steps (marked ``slow``).
* Launchers: ``ddp_spawn``; ``torchrun`` with 2 processes on one node and with 2 "nodes" x 1 process
  (``--nnodes 2 --node_rank``, ``--trainer.num_nodes 2``); SLURM as ``srun`` starts tasks (its
  environment variables, 2 nodes x 1 task), so Lightning's ``SLURMEnvironment`` runs it.

Every command has a deadline (``GRADSIM_LAUNCH_TIMEOUT``, default 120 s): a hang kills its process tree
and fails with the output. A probe callback (``tests/_launch_probe.py``) records what each process was
and which items of each task's dataset it iterated.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from lightning_gradsim.cli import main as gradsim

from .._imagenet_fixtures import PRESET_CLASSES, make_image_folder
from .._launch import (
    TIMEOUT,
    assert_ranks_and_shards,
    checkpoint,
    clean_env,
    config_id,
    example_configs,
    free_port,
    gradsim_command,
    is_compare_config,
    is_multi_process,
    load,
    probe_records,
    run,
    run_together,
    shortened,
    torchrun_command,
)

CONFIGS = example_configs()
FIT = [p for p in CONFIGS if not is_compare_config(p)]
COMPARE = [p for p in CONFIGS if is_compare_config(p)]
SINGLE = [p for p in FIT if not is_multi_process(p)]
MULTI = [p for p in FIT if is_multi_process(p)]
#: run fully (fit, validate, test); every other fit config differs from one of these only in FAMILY_KEYS
FULL = {
    "digits/rotated_90",
    "imagenet_pairs/near_trimaran_catamaran",
    "imagenet_pairs/near_trimaran_catamaran_ddp",
    "baselines/cross_stitch_digits",
    "baselines/cross_stitch_resnet_pairs",
}
FAMILY_KEYS = {"data.init_args.pair", "data.init_args.angle", "trainer.default_root_dir"}
DDP_FULL = "imagenet_pairs/near_trimaran_catamaran_ddp"


def _marks(path: Path) -> list:
    return [] if config_id(path) in FULL else [pytest.mark.slow]


def _params(paths: list[Path]) -> list:
    return [pytest.param(p, id=config_id(p), marks=_marks(p)) for p in paths]


@pytest.fixture(scope="module")
def tiny_imagenet(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("imagenet"), n_train=6, n_val=2, size=16, classes=PRESET_CLASSES)


def _differences(a, b, prefix: str = "") -> set[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        return {d for k in a.keys() | b.keys() for d in _differences(a.get(k), b.get(k), f"{prefix}{k}.")}
    return set() if a == b else {prefix.rstrip(".")}


def test_configs_are_found_and_sorted_into_families():
    assert len(FIT) >= 19 and len(COMPARE) >= 3 and len(MULTI) >= 6
    assert {config_id(p) for p in FIT} >= FULL
    for path in FIT:
        assert {"trainer", "model", "data"} <= set(load(path)), path
        # the checkpoint `gradsim validate/test --ckpt_path` loads is named, not left to Lightning's default
        callbacks = load(path)["trainer"].get("callbacks") or []
        named = [c for c in callbacks if c["class_path"].endswith("ModelCheckpoint") and c["init_args"].get("monitor")]
        assert named, f"{path} names no ModelCheckpoint"
        if config_id(path) in FULL:
            continue
        siblings = [
            q
            for q in FIT
            if config_id(q) in FULL and q.parent == path.parent and is_multi_process(q) == is_multi_process(path)
        ]
        diffs = [_differences(load(path), load(q)) for q in siblings]
        assert any(d <= FAMILY_KEYS for d in diffs), (
            f"{config_id(path)} differs from every fully run config in more than class names/angle ({diffs}): "
            f"add it to FULL in {__file__}"
        )


# ---------------------------------------------------------------------------------- single device
@pytest.mark.parametrize("config", _params(SINGLE))
def test_single_device_config(config, tiny_imagenet, tmp_path, capfd):
    args = shortened(config, tmp_path / "run", tiny_imagenet)
    assert gradsim(["fit", *args]) == 0
    ckpt = checkpoint(tmp_path / "run")
    if config_id(config) not in FULL:
        return
    capfd.readouterr()
    assert gradsim(["validate", *args, "--ckpt_path", str(ckpt)]) == 0
    assert gradsim(["test", *args, "--ckpt_path", str(ckpt)]) == 0
    out = capfd.readouterr().out
    assert "val/acc" in out and "test/acc" in out


# ---------------------------------------------------------------------------------- Lightning's own launcher
def _assert_one_ddp_run(
    probe: Path, config: Path, cluster: str, launcher: str = "_SubprocessScriptLauncher", nodes: int = 1
) -> None:
    records = probe_records(probe, "fit")
    assert_ranks_and_shards(records)
    assert {r["launcher"] for r in records} == {launcher}
    assert {r["strategy"] for r in records} == {"DDPStrategy"}
    assert sorted(r["node_rank"] for r in records) == ([0, 1] if nodes == 2 else [0, 0])
    assert {r["cluster_environment"] for r in records} == {cluster}
    own_precision = (load(config).get("trainer") or {}).get("precision")
    if own_precision:
        assert {r["precision"] for r in records} == {str(own_precision)}
    assert all(r["global_step"] == 2 and all(r["first_batch_is_shard"].values()) for r in records)
    # different data on each rank, one set of weights: the gradients were all-reduced
    assert records[0]["weights"] == records[1]["weights"]


@pytest.mark.ddp
@pytest.mark.timeout(4 * TIMEOUT)
@pytest.mark.parametrize("config", _params(MULTI))
def test_ddp_config_under_lightnings_launcher(config, tiny_imagenet, tmp_path):
    """``gradsim fit --config <ddp config> --trainer.accelerator cpu --trainer.devices 2``, then validate and test."""
    fit = shortened(config, tmp_path / "run", tiny_imagenet, probe=tmp_path / "probe")
    # Lightning re-runs the console script or ``python -m lightning_gradsim.cli``: both forms are used
    as_module = config_id(config).startswith("imagenet_pairs/far_hotpot")
    run(gradsim_command("fit", *fit, module=as_module))
    _assert_one_ddp_run(tmp_path / "probe", config, "LightningEnvironment")
    ckpt = checkpoint(tmp_path / "run")
    if config_id(config) != DDP_FULL:
        return
    for stage, key in (("validate", "val"), ("test", "test")):
        out = run(gradsim_command(stage, *fit, "--ckpt_path", str(ckpt)))
        records = probe_records(tmp_path / "probe", stage)
        assert_ranks_and_shards(records, stage_key=key)
        assert f"{key}/acc" in out


@pytest.mark.ddp
@pytest.mark.slow
@pytest.mark.timeout(8 * TIMEOUT)
def test_a_ddp_config_as_the_readme_launches_it_runs_clean_and_leaves_a_checkpoint(tiny_imagenet, tmp_path):
    """README's ``gradsim fit --config near_trimaran_catamaran_ddp --data.root DIR`` with only what a CPU
    needs (2 processes, float32: bf16 autocast on a CPU takes minutes) and a short run
    (``--trainer.max_steps 6``; the config's ``val_check_interval: 500``, loader workers and batch size
    left as they are, so no validation runs): no warning of ours or about logging, a ``last.ckpt``
    that ``gradsim test`` evaluates."""
    args = [
        "--config",
        DDP_FULL.split("/")[1],
        "--data.root",
        str(tiny_imagenet),
        "--trainer.accelerator",
        "cpu",
        "--trainer.devices",
        "2",
        "--trainer.precision",
        "32-true",
        "--trainer.default_root_dir",
        str(tmp_path / "run"),
    ]
    out = run(gradsim_command("fit", *args, "--trainer.max_steps", "6"), timeout=3 * TIMEOUT)
    for unwanted in ("drift apart", "sync_dist", "lightning_gradsim"):
        assert unwanted not in out, out  # the BatchNorm warning, Lightning's logging advice, any warning of ours
    ckpts = sorted((tmp_path / "run").rglob("*.ckpt"))
    assert [c.name for c in ckpts] == ["last.ckpt"], ckpts  # no validation ran: the last weights, saved at the end
    out = run(gradsim_command("test", *args, "--ckpt_path", str(ckpts[0])), timeout=3 * TIMEOUT)
    assert "test/loss" in out and "test/auroc" in out
    assert "sync_dist" not in out and "lightning_gradsim" not in out, out


# ---------------------------------------------------------------------------------- other launchers
DIGITS = next(p for p in FIT if config_id(p) == "digits/rotated_90")
DDP_CONFIG = next(p for p in MULTI if config_id(p) == DDP_FULL)


@pytest.mark.ddp
@pytest.mark.timeout(2 * TIMEOUT)
def test_ddp_spawn(tmp_path):
    args = shortened(DIGITS, tmp_path / "run", probe=tmp_path / "probe")
    run(gradsim_command("fit", *args, "--trainer.strategy", "ddp_spawn", "--trainer.devices", "2"))
    _assert_one_ddp_run(tmp_path / "probe", DIGITS, "LightningEnvironment", launcher="_MultiProcessingLauncher")
    checkpoint(tmp_path / "run")


@pytest.mark.ddp
@pytest.mark.timeout(2 * TIMEOUT)
def test_torchrun_one_node_two_processes(tiny_imagenet, tmp_path):
    args = shortened(DDP_CONFIG, tmp_path / "run", tiny_imagenet, probe=tmp_path / "probe")
    run(torchrun_command("--standalone", "--nproc_per_node", "2", "-m", "lightning_gradsim.cli", "fit", *args))
    _assert_one_ddp_run(tmp_path / "probe", DDP_CONFIG, "TorchElasticEnvironment")
    checkpoint(tmp_path / "run")


@pytest.mark.ddp
@pytest.mark.slow
@pytest.mark.timeout(2 * TIMEOUT)
def test_torchrun_two_nodes_one_process_each(tiny_imagenet, tmp_path):
    """``torchrun --nnodes 2 --node_rank R ...`` on each node; ``--trainer.num_nodes 2 --trainer.devices 1``."""
    args = shortened(DDP_CONFIG, tmp_path / "run", tiny_imagenet, probe=tmp_path / "probe")
    port = str(free_port())
    script = gradsim_command()[1]  # the console script's path: torchrun runs it with python
    commands = [
        torchrun_command(
            "--nnodes",
            "2",
            "--node_rank",
            str(node),
            "--nproc_per_node",
            "1",
            "--master_addr",
            "127.0.0.1",
            "--master_port",
            port,
            script,
            "fit",
            *args,
            "--trainer.devices",
            "1",
            "--trainer.num_nodes",
            "2",
        )
        for node in (0, 1)
    ]
    run_together(commands)
    _assert_one_ddp_run(tmp_path / "probe", DDP_CONFIG, "TorchElasticEnvironment", nodes=2)
    checkpoint(tmp_path / "run")


@pytest.mark.ddp
@pytest.mark.slow
@pytest.mark.timeout(2 * TIMEOUT)
def test_slurm_srun_two_nodes_one_task_each(tiny_imagenet, tmp_path):
    """What ``srun gradsim fit ...`` starts for ``--nodes 2 --ntasks-per-node 1``: one task per node with SLURM_*."""
    args = shortened(DDP_CONFIG, tmp_path / "run", tiny_imagenet, probe=tmp_path / "probe")
    port = str(free_port())
    envs = [
        clean_env(
            SLURM_JOB_ID="4242",
            SLURM_JOB_NAME="gradsim",
            SLURM_NTASKS="2",
            SLURM_NTASKS_PER_NODE="1",
            SLURM_NNODES="2",
            SLURM_NODELIST="127.0.0.1",
            SLURM_PROCID=str(node),
            SLURM_LOCALID="0",
            SLURM_NODEID=str(node),
            MASTER_PORT=port,
        )
        for node in (0, 1)
    ]
    command = gradsim_command("fit", *args, "--trainer.devices", "1", "--trainer.num_nodes", "2")
    run_together([command, command], envs)
    _assert_one_ddp_run(tmp_path / "probe", DDP_CONFIG, "SLURMEnvironment", nodes=2)
    checkpoint(tmp_path / "run")


# ---------------------------------------------------------------------------------- gradsim compare
def _compare_args(config: Path, tmp_path: Path, request: pytest.FixtureRequest, celeba_root: Path) -> list[str]:
    cfg = load(config)
    one_variant = [f"{k}={v[len(v) // 2]}" for k, v in (cfg.get("variants") or {}).items()]
    args = [
        "compare",
        "--config",
        config.stem,
        "--seeds",
        "0",
        "--max-steps",
        "2",
        "--eval-every",
        "2",
        "--out-dir",
        str(tmp_path / "out"),
        "--no-progress",
        *(a for v in one_variant for a in ("--vary", v)),
    ]
    source = (cfg.get("options") or {}).get("source")
    if source == "mnist":
        args += ["--set", f"root={request.getfixturevalue('mnist_root')}"]  # skip or fail as conftest says
    if cfg["setup"] == "celeba":
        args += ["--set", f"root={celeba_root}", "--set", "subset=null", "--set", "batch_size=3"]
    return args


@pytest.fixture(scope="module")
def celeba_root(tmp_path_factory):
    from ..experiments.test_celeba import write_celeba

    root = tmp_path_factory.mktemp("celeba")
    write_celeba(root / "celeba")
    return root


@pytest.mark.slow
@pytest.mark.parametrize("config", COMPARE, ids=config_id)
def test_compare_config(config, tmp_path, request, celeba_root, capsys):
    """Each compare config with its methods, one seed and one value of its sweep, 2 steps per run."""
    assert gradsim(_compare_args(config, tmp_path, request, celeba_root)) == 0
    table = (tmp_path / "out" / "table.md").read_text()
    assert all(f"| {m} |" in table for m in load(config)["methods"])


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    "trainer",
    [
        {"devices": 2},
        {"devices": [0, 1]},
        {"devices": "0,1"},
        {"devices": -1},
        {"num_nodes": 2},
        {"strategy": "ddp_spawn"},
    ],
    ids=["devices=2", "devices=[0,1]", "devices='0,1'", "devices=-1", "num_nodes=2", "ddp_spawn"],
)
def test_compare_refuses_several_processes_per_run(trainer):
    """compare's runs are one process each (parallel with ``jobs``): a DDP trainer would re-run the whole compare."""
    from lightning_gradsim.experiments.compare import compare

    with pytest.raises(ValueError, match="one process and runs them in parallel with jobs="):
        compare(
            "rotated_digits",
            methods=["sum"],
            seeds=[0],
            max_steps=1,
            eval_every=1,
            out_dir=None,
            progress=False,
            trainer=trainer,
        )


def test_in_process_call_under_lightnings_launcher_warns(tmp_path):
    """Called from Python (here: pytest), the re-run command line is not the gradsim command: say so."""
    import warnings

    from lightning_gradsim.experiments.cli import GradSimCLI

    args = [
        "--config",
        DIGITS.stem,
        "--trainer.accelerator",
        "cpu",
        "--trainer.devices",
        "2",
        "--trainer.strategy",
        "ddp",
        "--trainer.default_root_dir",
        str(tmp_path),
    ]
    cli = GradSimCLI(args, run=False)  # builds the trainer, launches nothing
    with pytest.warns(UserWarning, match="re-run `.*pytest.*`, not `gradsim --config"):
        cli.before_fit()
    single = GradSimCLI([*args, "--trainer.devices", "1"], run=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        single.before_fit()  # one process: nothing is re-run, nothing to say
