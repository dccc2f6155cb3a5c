"""Import hygiene: what ``import lightning_gradsim``, the registries and ``gradsim --help`` load.

Each check runs a fresh interpreter (this test process has imported everything already) and reads
its ``sys.modules`` or its ``-X importtime`` trace.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
#: optional or heavy dependencies that no core import may load
HEAVY = ("matplotlib", "torchvision", "timm", "scipy", "sklearn", "gymnasium", "tensorboard", "PIL", "torchmetrics")
#: sub-packages and modules that load only when used
OPTIONAL_OWN = (
    "lightning_gradsim.loss_weighting.uncertainty",
    "lightning_gradsim.loss_weighting.gradnorm",
    "lightning_gradsim.baselines.cross_stitch",
    "lightning_gradsim.experiments.compare",
    "lightning_gradsim.experiments.modules",
    "lightning_gradsim.experiments.setups",
    "lightning_gradsim.experiments.tcdcn",
    "lightning_gradsim.experiments.cross_stitch",
    "lightning_gradsim.rl",
    "lightning_gradsim.data",
    "lightning_gradsim.models",
)

STAGES = r"""
import json, sys
HEAVY, OWN = {heavy!r}, {own!r}
def snap():
    return sorted({{m.split(".")[0] for m in sys.modules if m.split(".")[0] in HEAVY + ("torch", "lightning")}}
                  | {{m for m in sys.modules if m.startswith(OWN)}})
out = {{}}
import lightning_gradsim
out["package"] = snap()
from lightning_gradsim.methods import list_methods, make_gate
from lightning_gradsim.experiments.registry import list_setups
out["methods"], out["setups"] = list_methods(), sorted(list_setups())
out["listed"] = snap()
gates = [type(make_gate(m)).__name__ for m in ("weighted", "pcgrad", "gradnorm")]
out["gates"] = snap()
import lightning, torch
out["lightning"] = snap()
from lightning_gradsim import *
out["everything"] = snap()
print(json.dumps(out))
"""


def _python(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, cwd=REPO, timeout=300)


def _heavy(stage: list[str]) -> set[str]:
    return {m for m in stage if m in HEAVY}


def _own_optional(stage: list[str]) -> set[str]:
    return {m for m in stage if m.startswith(OPTIONAL_OWN)}


@pytest.mark.slow
def test_import_loads_only_what_each_name_needs():
    proc = _python("-c", STAGES.format(heavy=HEAVY, own=OPTIONAL_OWN))
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    # `import lightning_gradsim` alone loads neither torch nor Lightning
    assert out["package"] == []
    # listing methods and setups names the built-in ones without importing them (rules need torch)
    assert {"pcgrad", "uncertainty", "gradnorm", "weighted"} <= set(out["methods"])
    assert {"rotated_digits", "celeba", "rotated_digits_cross_stitch"} <= set(out["setups"])
    assert out["listed"] == ["torch"]
    # a gate needs torch only; make_gate("gradnorm") imports gradnorm, not uncertainty
    assert "lightning" not in out["gates"] and not _heavy(out["gates"])
    assert _own_optional(out["gates"]) == {"lightning_gradsim.loss_weighting.gradnorm"}
    # the mixin and monitor load Lightning and nothing Lightning itself does not load
    assert "lightning" in out["everything"]
    assert _heavy(out["everything"]) <= _heavy(out["lightning"]), "a core module imports an optional dependency"
    assert _own_optional(out["everything"]) == {"lightning_gradsim.loss_weighting.gradnorm"}


def _imported(trace: str) -> set[str]:
    """Top-level names of the modules in a ``-X importtime`` trace."""
    rows = [line.rsplit("|", 1)[-1].strip() for line in trace.splitlines() if line.startswith("import time:")]
    return {name.split(".")[0] for name in rows[1:]}  # rows[0] is the header


@pytest.mark.parametrize("argv", [["--help"], ["compare", "--help"]], ids=["gradsim", "compare"])
def test_command_help_imports_no_torch(argv):
    proc = _python("-X", "importtime", "-m", "lightning_gradsim.cli", *argv)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "usage: gradsim" in proc.stdout
    imported = _imported(proc.stderr)
    assert "lightning_gradsim" in imported  # the trace is read right
    assert not imported & {"torch", "lightning", "numpy", *HEAVY}
