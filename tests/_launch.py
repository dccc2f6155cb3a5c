"""Running the example configs as a user does, shortened: commands, processes with a deadline, overrides.

* :func:`example_configs` is the ONE place that finds the configs (the packaged ones, run by name as users do).
* :func:`run` / :func:`run_together` start processes in new sessions; past the deadline they kill the
  whole process tree (Lightning's ranks, torchrun's workers) and fail the test with the output's tail.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
#: seconds before a launched command counts as hung (a healthy shortened run takes ~10 s on 2 idle cores)
TIMEOUT = float(os.environ.get("GRADSIM_LAUNCH_TIMEOUT", "120"))
PROBE = "tests._launch_probe.ShardProbe"


def example_configs() -> list[Path]:
    """Every packaged example config (``lightning_gradsim/configs/<group>/<name>.yaml``), sorted."""
    from lightning_gradsim.configs import list_configs

    return sorted(list_configs().values())


def config_id(path: Path) -> str:
    return f"{path.parent.name}/{path.stem}"


def load(path: Path) -> dict[str, Any]:
    return yaml.safe_load(path.read_text()) or {}


def is_compare_config(path: Path) -> bool:
    return "setup" in load(path)


def is_multi_process(path: Path) -> bool:
    trainer = load(path).get("trainer") or {}
    return str(trainer.get("strategy", "auto")).startswith("ddp") or int(trainer.get("devices", 1) or 1) > 1


def data_class(path: Path) -> str:
    return str((load(path).get("data") or {}).get("class_path", "")).rsplit(".", 1)[-1]


def gradsim_command(*args: str, module: bool = False) -> list[str]:
    """The console script as a user types it (``gradsim ...``), or ``python -m lightning_gradsim.cli ...``."""
    script = Path(sys.executable).with_name("gradsim")
    if module or not script.exists():
        return [sys.executable, "-m", "lightning_gradsim.cli", *args]
    return [sys.executable, str(script), *args]


def torchrun_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", *args]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def clean_env(**extra: str) -> dict[str, str]:
    """This environment without any launcher's variables (a CI job on SLURM must not leak in), plus ``extra``."""
    launcher_vars = ("SLURM_", "TORCHELASTIC_", "PL_")
    env = {k: v for k, v in os.environ.items() if not k.startswith(launcher_vars)}
    for key in (
        "RANK",
        "LOCAL_RANK",
        "WORLD_SIZE",
        "NODE_RANK",
        "GROUP_RANK",
        "LOCAL_WORLD_SIZE",
        "MASTER_ADDR",
        "MASTER_PORT",
    ):
        env.pop(key, None)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [env.get("PYTHONPATH")])])
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONWARNINGS="ignore", PYTHONUNBUFFERED="1")
    env.update(extra)
    return env


def _descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def _kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL the process, its group and every descendant (torchrun starts its workers in new sessions)."""
    victims = _descendants(proc.pid) if Path("/proc").is_dir() else []
    for pid in [proc.pid, *victims]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _tail(text: str, n: int = 6000) -> str:
    return text if len(text) <= n else "...\n" + text[-n:]


def run_together(
    commands: list[list[str]],
    envs: list[dict[str, str]] | None = None,
    timeout: float = TIMEOUT,
    cwd: Path | None = None,
) -> list[str]:
    """Start every command at once; return their outputs. Fail (killing them all) on a timeout or an error exit."""
    envs = envs or [clean_env() for _ in commands]
    procs = [
        subprocess.Popen(
            cmd,
            env=env,
            cwd=cwd or REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        for cmd, env in zip(commands, envs)
    ]
    deadline = time.monotonic() + timeout
    outputs: list[str] = [""] * len(procs)
    hung = False
    try:
        for i, proc in enumerate(procs):
            try:
                outputs[i], _ = proc.communicate(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                hung = True
                break
    finally:
        for p in procs:  # on a timeout, or if the test itself is interrupted
            if p.poll() is None:
                _kill_tree(p)
        for j, p in enumerate(procs):
            if p.stdout is not None and not p.stdout.closed:
                try:
                    outputs[j] = outputs[j] or p.communicate(timeout=10)[0]
                except subprocess.TimeoutExpired:  # a straggler still holds the pipe: report without its output
                    outputs[j] = outputs[j] or "(output unavailable: a process kept the pipe open)"
    if hung:
        report = "\n".join(f"--- `{shlex.join(c)}`:\n{_tail(o)}" for c, o in zip(commands, outputs))
        pytest.fail(f"hung: not finished after {timeout:.0f} s; killed every process.\n{report}", pytrace=False)
    for cmd, proc, out in zip(commands, procs, outputs):
        if proc.returncode != 0:
            pytest.fail(f"`{shlex.join(cmd)}` exited with {proc.returncode}:\n{_tail(out)}", pytrace=False)
    return outputs


def run(command: list[str], env: dict[str, str] | None = None, timeout: float = TIMEOUT) -> str:
    """Run one command (and whatever it starts) with a deadline; its output."""
    return run_together([command], [env or clean_env()], timeout)[0]


def shortened(path: Path, root_dir: Path, data_root: Path | None = None, probe: Path | None = None) -> list[str]:
    """CLI overrides making ``path`` a run of 2 steps on tiny data, its own settings otherwise kept."""
    args = [
        "--config",
        path.stem,
        "--trainer.default_root_dir",
        str(root_dir),
        "--trainer.max_steps",
        "2",
        "--trainer.val_check_interval",
        "2",
        "--trainer.enable_progress_bar",
        "false",
    ]
    if is_multi_process(path):
        args += ["--trainer.accelerator", "cpu", "--trainer.devices", "2"]
    if data_class(path) == "ClassPairDataModule":
        assert data_root is not None, f"{path.name} reads an ImageFolder: pass data_root"
        args += ["--data.root", str(data_root), "--data.batch_size", "2", "--data.num_workers", "0"]
    if probe is not None:
        args += ["--trainer.callbacks+=" + json.dumps({"class_path": PROBE, "init_args": {"folder": str(probe)}})]
    return args


def checkpoint(root_dir: Path) -> Path:
    """The run's best checkpoint (the configs' monitored ModelCheckpoint), next to its ``last.ckpt``."""
    ckpts = sorted(root_dir.rglob("*.ckpt"))
    best = [c for c in ckpts if c.name != "last.ckpt"]
    assert len(best) == 1, f"expected the run to write one best checkpoint under {root_dir}, found {ckpts}"
    assert [c.name for c in ckpts if c.name == "last.ckpt"] == ["last.ckpt"], f"no last.ckpt under {root_dir}"
    return best[0]


def probe_records(folder: Path, stage: str) -> list[dict[str, Any]]:
    files = sorted(folder.glob(f"{stage}_rank*.json"))
    return [json.loads(f.read_text()) for f in files]


def assert_ranks_and_shards(records: list[dict[str, Any]], world: int = 2, stage_key: str = "train") -> None:
    """``world`` distinct processes of one process group, each iterating its own shard of every loader."""
    assert [r["global_rank"] for r in records] == list(range(world)), records
    assert {r["world_size"] for r in records} == {world} and {r["dist_world_size"] for r in records} == {world}
    assert len({r["pid"] for r in records}) == world
    for loader in records[0][stage_key]:
        shards = [r[stage_key][loader] for r in records]
        n = shards[0]["dataset_len"]
        assert all(s["sampler"] == "DistributedSampler" and s["num_replicas"] == world for s in shards), shards
        assert [s["sampler_rank"] for s in shards] == list(range(world))
        padded = -n % world  # DistributedSampler repeats this many items so every rank gets ceil(n / world)
        assert all(len(s["indices"]) == (n + padded) // world for s in shards)
        seen = [set(s["indices"]) for s in shards]
        assert set().union(*seen) == set(range(n)), f"{loader}: the ranks together must see every item once"
        overlap = sum(len(a & b) for i, a in enumerate(seen) for b in seen[i + 1 :])
        assert overlap <= padded, f"{loader}: ranks share {overlap} items; only the {padded} padding items may repeat"
