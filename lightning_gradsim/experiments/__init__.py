"""The paper's experiments: LightningModules, setups and ``gradsim compare``.

Importing the package loads nothing; each name below loads its module on first access.

* :mod:`~lightning_gradsim.experiments.compare`: ``compare()`` (methods x seeds on one setup);
  :mod:`~lightning_gradsim.experiments.compare_cli` is ``gradsim compare``.
* :mod:`~lightning_gradsim.experiments.registry`: the setups by name (built-in ones in ``SETUPS``).
* :mod:`~lightning_gradsim.experiments.modules`, :mod:`~lightning_gradsim.experiments.cross_stitch`,
  :mod:`~lightning_gradsim.experiments.tcdcn`: the LightningModules.

>>> from lightning_gradsim.experiments import MultiTaskClassifier, list_setups
>>> "rotated_digits" in list_setups()
True
>>> from lightning_gradsim.experiments.compare import compare  # the function (the module has its name)
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .._lazy import lazy_exports

#: public name -> the module of this package defining it, imported on first access.
_EXPORTS: dict[str, str] = {
    "CompareResult": "compare",
    "register_setup": "registry",
    "list_setups": "registry",
    "build_setup": "registry",
    "MultiTaskClassifier": "modules",
    "CrossStitchClassifier": "cross_stitch",
    "CelebATCDCN": "tcdcn",
}

__all__ = list(_EXPORTS)

if TYPE_CHECKING:
    from .compare import CompareResult
    from .cross_stitch import CrossStitchClassifier
    from .modules import MultiTaskClassifier
    from .registry import build_setup, list_setups, register_setup
    from .tcdcn import CelebATCDCN

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
