"""The tree is the architecture: who may import whom, checked on the source (``ast``) and in a fresh
interpreter.

* no import cycle among the modules of ``core/``, ``rules/``, ``loss_weighting/``, ``parallel/``,
  ``lightning/`` (imports under ``if TYPE_CHECKING:`` aside; importing ``a.b`` counts as importing the
  package ``a`` too, as Python runs its ``__init__``);
* none of them imports ``experiments/``, ``data/``, ``rl/``, ``models.py``, ``cli.py``;
* ``core/`` imports neither ``lightning`` nor ``torch.distributed``; ``parallel/`` does not import
  ``lightning``; only ``lightning/`` does;
* ``from lightning_gradsim.core import GradientGate`` and one ``backward`` leave ``lightning`` (and
  ``torch.distributed``'s process groups) out of ``sys.modules``;
* no module over 450 lines, no class over 300.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "lightning_gradsim"
LAYERS = ("core", "rules", "loss_weighting", "parallel", "lightning")
ABOVE = ("experiments", "data", "rl", "models", "cli")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PKG.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(path: Path) -> set[str]:
    """Absolute names of the modules ``path`` imports at run time (anywhere in it, TYPE_CHECKING blocks aside)."""
    tree = ast.parse(path.read_text())
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join([*base, node.module] if node.module else base)
            else:
                target = node.module or ""
            found.add(target)
            for alias in node.names:  # `from . import gate` imports the submodule
                found.add(f"{target}.{alias.name}")
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def _graph() -> dict[str, set[str]]:
    """Module -> the package modules it imports (with each imported module's parent packages,
    except the importer's own)."""
    files = {_module_name(p): p for p in PKG.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        edges: set[str] = set()
        for target in _imports(path):
            parts = target.split(".")
            for i in range(2, len(parts) + 1):  # lightning_gradsim.core.gate -> .core and .core.gate
                prefix = ".".join(parts[:i])
                # a module's own parent packages are imported before it anyway: no edge
                if prefix in files and prefix != name and not name.startswith(prefix + "."):
                    edges.add(prefix)
        graph[name] = edges
    return graph


def _layer(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None


GRAPH = _graph()
LAYERED = {m for m in GRAPH if _layer(m) in LAYERS}


def test_the_graph_is_read_right():
    # known edges: the gate imports the rules; the mixin imports the gate; a TYPE_CHECKING import is no edge
    assert "lightning_gradsim.rules" in GRAPH["lightning_gradsim.core.gate"]
    assert "lightning_gradsim.core.gate" in GRAPH["lightning_gradsim.lightning.mixin"]
    assert "lightning_gradsim.lightning.mixin" not in GRAPH["lightning_gradsim"]  # lazy: under TYPE_CHECKING
    assert len(LAYERED) > 30


def test_no_import_cycle_among_the_layers():
    sub = {m: {t for t in GRAPH[m] if t in LAYERED} for m in LAYERED}
    state: dict[str, int] = {}
    cycles: list[list[str]] = []

    def walk(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(sub[node]):
            if state.get(nxt) == 1:
                cycles.append(stack[stack.index(nxt) :] + [nxt] if nxt in stack else [node, nxt])
            elif nxt not in state:
                walk(nxt, [*stack, nxt])
        state[node] = 2

    for node in sorted(sub):
        if node not in state:
            walk(node, [node])
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_the_layers_import_nothing_above_them():
    bad = {
        m: sorted(t for t in GRAPH[m] if _layer(t) in ABOVE)
        for m in LAYERED
        if any(_layer(t) in ABOVE for t in GRAPH[m])
    }
    assert not bad, bad


@pytest.mark.parametrize(
    "layer, forbidden",
    [
        ("core", ("lightning", "torch.distributed")),
        ("rules", ("lightning", "torch.distributed")),
        ("parallel", ("lightning",)),
    ],
)
def test_what_each_layer_may_not_import(layer, forbidden):
    bad = {}
    for path in (PKG / layer).rglob("*.py"):
        hits = sorted(t for t in _imports(path) if any(t == f or t.startswith(f + ".") for f in forbidden))
        if hits:
            bad[_module_name(path)] = hits
    assert not bad, bad


def test_only_the_lightning_package_imports_lightning():
    importers = {
        _module_name(p)
        for layer in LAYERS
        for p in (PKG / layer).rglob("*.py")
        if any(t == "lightning" or t.startswith("lightning.") for t in _imports(p))
    }
    assert importers and all(m.startswith("lightning_gradsim.lightning") for m in importers), importers


GATE_ONLY = r"""
import json, sys, torch
from lightning_gradsim.core import GradientGate
w = torch.nn.Parameter(torch.tensor([1.0, 2.0]))
stats = GradientGate(rule="weighted").backward((w * w).sum(), {"aux": w.sum()}, [w])
print(json.dumps({
    "lightning": sorted(m for m in sys.modules if m.split(".")[0] in ("lightning", "pytorch_lightning")),
    "groups": "torch.distributed.distributed_c10d" in sys.modules and bool(torch.distributed.is_initialized()),
    "grad": w.grad.tolist(),
}))
"""


@pytest.mark.slow
def test_the_core_runs_without_lightning():
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(PKG.parent), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", GATE_ONLY], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["lightning"] == [] and out["groups"] is False
    # g_main = 2w = (2, 4), g_aux = (1, 1): cos = 6 / (sqrt(20) sqrt(2)) = 0.9487, weighted adds cos * g_aux
    cos = 6 / (20**0.5 * 2**0.5)
    assert out["grad"] == pytest.approx([2 + cos, 4 + cos], rel=1e-6)


def _class_lengths(path: Path) -> dict[str, int]:
    tree = ast.parse(path.read_text())
    return {
        f"{_module_name(path)}.{node.name}": node.end_lineno - node.lineno + 1  # type: ignore[operator]
        for node in ast.walk(tree)
        if isinstance(node, ast.ClassDef)
    }


def test_module_and_class_sizes():
    long_modules = {_module_name(p): n for p in PKG.rglob("*.py") if (n := len(p.read_text().splitlines())) > 450}
    long_classes = {k: v for p in PKG.rglob("*.py") for k, v in _class_lengths(p).items() if v > 300}
    assert not long_modules, f"modules over 450 lines: {long_modules}"
    assert not long_classes, f"classes over 300 lines: {long_classes}"
