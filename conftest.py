"""Collection rule for the package's doctests (``--doctest-modules`` imports every module).

A module whose optional dependency (an extra of ``pyproject.toml``) is not installed is not
collected, and the run's summary names it; any other import error fails the collection as usual.
"""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest

PACKAGE_DIR = Path(__file__).resolve().parent / "lightning_gradsim"

#: Import names of the extras' packages (pyproject.toml [project.optional-dependencies]).
OPTIONAL_IMPORTS = frozenset(
    ["jsonargparse", "tensorboard", "sklearn", "numpy", "tqdm", "yaml"]  # experiments
    + ["gymnasium", "minatar", "ale_py"]  # rl, atari, ale
    + ["scipy", "PIL"]  # imagenet
    + ["torchjd"]  # bench
)

_not_collected: list[str] = []


def pytest_ignore_collect(collection_path: Path, config: pytest.Config) -> bool | None:
    if collection_path.suffix != ".py" or PACKAGE_DIR not in collection_path.parents:
        return None
    parts = collection_path.relative_to(PACKAGE_DIR.parent).with_suffix("").parts
    module = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
    try:
        importlib.import_module(module)
    except ModuleNotFoundError as err:
        missing = (err.name or "").partition(".")[0]
        if missing in OPTIONAL_IMPORTS:
            _not_collected.append(f"{module} (needs {missing})")
            return True
    return None  # collected; a real import error surfaces in the doctest collection


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if _not_collected:
        terminalreporter.write_line("doctests not collected, optional dependency missing: " + ", ".join(_not_collected))


@pytest.fixture(autouse=True)
def _doctests_in_a_temporary_folder(request: pytest.FixtureRequest) -> None:
    """A docstring example that writes files writes them in a temporary folder, seeded as the tests are."""
    if isinstance(request.node, pytest.DoctestItem):
        import torch

        request.getfixturevalue("monkeypatch").chdir(request.getfixturevalue("tmp_path"))
        torch.manual_seed(0)
