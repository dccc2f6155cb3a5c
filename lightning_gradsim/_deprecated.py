"""The import paths of 0.1.0 (``lightning_gradsim.gate``, ``.mixin``, ``.transforms``, ``.weighting``, ...),
kept for one release: importing one warns (``DeprecationWarning``) and gives the module of the new tree.

A module that kept its contents is the new module itself (``lightning_gradsim.gate is
lightning_gradsim.core.gate``), so pickled objects and ``isinstance`` checks keep working; a module
whose contents were split (``transforms``, ``distributed``, ``fsdp``, ``gradients``) becomes a module
that takes each name from where it now lives.

>>> import sys, warnings
>>> _ = sys.modules.pop("lightning_gradsim.transforms", None)  # as in a fresh interpreter
>>> with warnings.catch_warnings(record=True) as caught:
...     warnings.simplefilter("always")
...     from lightning_gradsim.transforms import AllReduce, Unscale
>>> AllReduce.__module__, Unscale.__module__, caught[0].category.__name__
('lightning_gradsim.parallel.ddp_global', 'lightning_gradsim.core.transforms', 'DeprecationWarning')
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
import types
import warnings
from collections.abc import Sequence
from typing import Any

__all__ = ["MOVED", "install"]

_PKG = "lightning_gradsim"

#: old module (relative to the package) -> the new modules its names now live in, in lookup order.
MOVED: dict[str, tuple[str, ...]] = {
    "gate": ("core.gate",),
    "inputs": ("core.options",),
    "paths": ("core.step",),
    "decision": ("core.weights",),
    "state": ("core.state",),
    "layout": ("core.task_gradients",),
    "tensor_ops": ("core.tensor_ops",),
    "gradients": ("core.gradients", "core.graph"),
    "transforms": ("core.transforms", "parallel.ddp_global", "parallel.ddp_local"),
    "distributed": ("parallel.collectives", "parallel.registry"),
    "sharded": ("parallel.ddp_sharded",),
    "fsdp": ("parallel.fsdp2", "core.gradients", "core.tensor_ops"),
    "sync": ("lightning.strategy",),
    "checks": ("lightning.validation",),
    "optimization": ("lightning.optimization",),
    "mixin": ("lightning.mixin",),
    "monitor": ("lightning.monitor",),
    "weighting": ("loss_weighting",),
    "weighting.base": ("core.loss_weighting",),
    "weighting.gradnorm": ("loss_weighting.gradnorm",),
    "weighting.uncertainty": ("loss_weighting.uncertainty",),
}


class _Merged(types.ModuleType):
    """An old module whose names now live in several new ones (looked up in order, on first access)."""

    def __init__(self, name: str, sources: Sequence[str]) -> None:
        super().__init__(name)
        self.__sources = list(sources)

    def __getattr__(self, attr: str) -> Any:
        for source in self.__sources:
            module = importlib.import_module(source)
            if hasattr(module, attr):
                return getattr(module, attr)
        raise AttributeError(f"module {self.__name__!r} has no attribute {attr!r}")

    def __dir__(self) -> list[str]:
        return sorted({n for s in self.__sources for n in dir(importlib.import_module(s))})


class _Loader(importlib.abc.Loader):
    def __init__(self, sources: tuple[str, ...]) -> None:
        self.sources = tuple(f"{_PKG}.{s}" for s in sources)

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType:
        new = ", ".join(self.sources)
        warnings.warn(
            f"{spec.name} moved to {new} (lightning_gradsim 0.2); the old path works until 0.3.",
            DeprecationWarning,
            stacklevel=2,
        )
        if len(self.sources) == 1:
            return importlib.import_module(self.sources[0])
        return _Merged(spec.name, self.sources)

    def exec_module(self, module: types.ModuleType) -> None:
        sys.modules[module.__spec__.name if module.__spec__ else module.__name__] = module


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> importlib.machinery.ModuleSpec | None:
        if not fullname.startswith(_PKG + "."):
            return None
        sources = MOVED.get(fullname[len(_PKG) + 1 :])
        if sources is None:
            return None
        is_package = sources == ("loss_weighting",)
        return importlib.machinery.ModuleSpec(fullname, _Loader(sources), is_package=is_package)


def install() -> None:
    """Put the finder of the old paths on ``sys.meta_path`` (once; ``import lightning_gradsim`` does it)."""
    if not any(isinstance(f, _Finder) for f in sys.meta_path):
        sys.meta_path.insert(0, _Finder())  # before an editable install's finder, which would find nothing new
