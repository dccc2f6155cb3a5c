"""Every core module has docstring examples.

The examples themselves run once, as doctests of the package (``--doctest-modules`` in pyproject's
pytest ``addopts``; the root ``conftest.py`` runs each in a temporary folder). Add a module to
``MODULES`` when its examples become ``>>>`` doctests (they must be fast and deterministic: no
training beyond a few tiny steps, no downloads).
"""

from __future__ import annotations

import doctest
import importlib

MODULES = [
    "lightning_gradsim.core.gate",
    "lightning_gradsim.core.options",
    "lightning_gradsim.core.step",
    "lightning_gradsim.core.weights",
    "lightning_gradsim.core.state",
    "lightning_gradsim.core.task_gradients",
    "lightning_gradsim.core.gradients",
    "lightning_gradsim.core.transforms",
    "lightning_gradsim.parallel.collectives",
    "lightning_gradsim.rules",
    "lightning_gradsim.rules.base",
    "lightning_gradsim.rules.unweighted",
    "lightning_gradsim.rules.weighted",
    "lightning_gradsim.rules.projection",
    "lightning_gradsim.rules.summed",
    "lightning_gradsim.rules.main_only",
    "lightning_gradsim.rules.pcgrad",
    "lightning_gradsim.loss_weighting",
    "lightning_gradsim.core.loss_weighting",
    "lightning_gradsim.core.graph",
    "lightning_gradsim.parallel",
    "lightning_gradsim.parallel.registry",
    "lightning_gradsim.parallel.ddp_global",
    "lightning_gradsim.parallel.ddp_local",
    "lightning_gradsim._deprecated",
    "lightning_gradsim.loss_weighting.uncertainty",
    "lightning_gradsim.loss_weighting.gradnorm",
    "lightning_gradsim.loss_weighting._gate",
    "lightning_gradsim.baselines.uncertainty",
    "lightning_gradsim.baselines.gradnorm",
    "lightning_gradsim.baselines.pcgrad",
    "lightning_gradsim.lightning.mixin",
    "lightning_gradsim.lightning.validation",
    "lightning_gradsim.lightning.optimization",
    "lightning_gradsim.lightning.monitor",
]


def _examples():
    finder = doctest.DocTestFinder(exclude_empty=True)
    for name in MODULES:
        module = importlib.import_module(name)
        for test in finder.find(module, name):
            if test.examples and test.name.split(".")[-1] != "__init__":
                yield test


def test_every_core_module_has_examples():
    names = {t.name.rsplit(".", 1)[0] for t in _examples()} | {t.name for t in _examples()}
    missing = [m for m in MODULES if not any(n == m or n.startswith(m + ".") for n in names)]
    assert not missing, f"modules without a doctest: {missing}"
