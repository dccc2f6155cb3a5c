"""Setups of ``gradsim compare`` by name (a registry that imports each setup only when it is built),
and the methods it runs by default.

A setup is a factory ``factory(method: str, seed: int, gate: dict, **options) -> (LightningModule,
LightningDataModule)`` (see :mod:`lightning_gradsim.experiments.compare` for what the module must
log). The built-in setups are :data:`SETUPS` entries ``name -> ("module:factory", description)``:
listing them imports nothing, building one imports its module. Add yours with one line in
:data:`SETUPS` (lazy), with the :func:`register_setup` decorator, or import a module that uses it
(``gradsim compare --import my.module``).

>>> from lightning_gradsim.experiments.registry import list_setups, register_setup
>>> list_setups()["rotated_digits"]
'digits main task + rotated digits auxiliary task, 3x100 MLP, RMSprop (paper 4.2)'
>>> @register_setup("doc_digits", "rotated digits, 200 images")
... def doc_digits(method, seed, gate, **options):
...     return build_setup("rotated_digits", method, seed, gate, max_images=200, **options)
>>> module, data = build_setup("doc_digits", method="sum", seed=0, angle=90)
>>> type(module).__name__, data.angle
('MultiTaskClassifier', 90.0)
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from .._lazy import load_entry

if TYPE_CHECKING:
    import lightning as L

__all__ = ["SETUPS", "DEFAULT_METHODS", "register_setup", "list_setups", "build_setup", "get_setup"]

#: the paper's baselines and rules, the default of ``compare(methods=...)`` and ``--methods``.
DEFAULT_METHODS = ("main_only", "sum", "unweighted", "weighted", "projection")

SetupFactory = Callable[..., "tuple[L.LightningModule, L.LightningDataModule]"]

_E = "lightning_gradsim.experiments"
#: built-in (and lazily added) setups: name -> ("module:factory", one-line description).
SETUPS: dict[str, tuple[str, str]] = {
    "rotated_digits": (
        f"{_E}.setups:rotated_digits",
        "digits main task + rotated digits auxiliary task, 3x100 MLP, RMSprop (paper 4.2)",
    ),
    "class_pair": (
        f"{_E}.setups:class_pair",
        "ImageNet class pair: 'is it a?' main, 'is it b?' auxiliary, timm backbone (paper 4.1)",
    ),
    "celeba": (
        f"{_E}.tcdcn:celeba_setup",
        "CelebA: 'Attractive' main, 5 facial landmarks auxiliary, TCDCN-style CNN, Adam (blog)",
    ),
    "rotated_digits_cross_stitch": (
        f"{_E}.cross_stitch:rotated_digits_cross_stitch",
        "rotated digits (paper 4.2) on a two-column cross-stitch MLP",
    ),
    "class_pair_cross_stitch": (
        f"{_E}.cross_stitch:class_pair_cross_stitch",
        "ImageNet class pair (paper 4.1) on two stitched ResNet-18 columns",
    ),
    "rotated_digits_nddr": (
        f"{_E}.cross_stitch:rotated_digits_nddr",
        "rotated digits (paper 4.2) on two MLP columns fused by NDDR units (NDDR-CNN)",
    ),
    "class_pair_nddr": (
        f"{_E}.cross_stitch:class_pair_nddr",
        "ImageNet class pair (paper 4.1) on two ResNet-18 columns fused by NDDR units",
    ),
}

# setups registered with the decorator: name -> (factory, description)
_REGISTERED: dict[str, tuple[SetupFactory, str]] = {}


def register_setup(name: str, description: str = "") -> Callable[[SetupFactory], SetupFactory]:
    """Decorator registering ``factory(method, seed, gate, **options) -> (module, datamodule)`` as ``name``."""

    def decorator(factory: SetupFactory) -> SetupFactory:
        if name in SETUPS or (name in _REGISTERED and _REGISTERED[name][0] is not factory):
            raise ValueError(f"A setup named {name!r} is already registered; pick another name.")
        doc_lines = (factory.__doc__ or "").strip().splitlines()
        _REGISTERED[name] = (factory, description or (doc_lines[0] if doc_lines else ""))
        return factory

    return decorator


def list_setups() -> dict[str, str]:
    """Registered setups, sorted: name -> one-line description (imports none of them)."""
    found = {name: desc for name, (_, desc) in SETUPS.items()}
    found.update({name: desc for name, (_, desc) in _REGISTERED.items()})
    return dict(sorted(found.items()))


def get_setup(name: str) -> SetupFactory:
    """The factory of setup ``name`` (importing its module if it is a :data:`SETUPS` entry)."""
    if name in _REGISTERED:
        return _REGISTERED[name][0]
    if name in SETUPS:
        return load_entry(SETUPS[name][0])
    raise ValueError(f"Unknown setup {name!r}; choose from {', '.join(list_setups())} (or register_setup your own).")


def build_setup(
    name: str, method: str, seed: int, gate: Mapping[str, Any] | None = None, **options: Any
) -> tuple[L.LightningModule, L.LightningDataModule]:
    """Build ``(module, datamodule)`` of setup ``name`` for one method and seed."""
    return get_setup(name)(method=method, seed=seed, gate=dict(gate or {}), **options)
