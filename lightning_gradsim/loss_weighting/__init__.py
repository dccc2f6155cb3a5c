"""Loss weightings, composed with any gate: ``GradientGate(rule=..., loss_weighting=...)``.

* :class:`UncertaintyWeighting` (Kendall et al., 2018): learned log-variances.
* :class:`GradNorm` (Chen et al., 2018): weights that balance the tasks' gradient norms.
* :class:`DWA` (Liu et al., 2019): dynamic weight average, from the ratio of the last two losses.
* :class:`RLW` (Lin et al., 2022): random weights, a softmax of normal draws, every step.
* :class:`LossWeighting`: the base class (the seam the gate calls, in :mod:`lightning_gradsim.core`), to
  write your own.

One weighting per module; a module's ``make_gate`` factory is the method of its name in
:func:`lightning_gradsim.methods.make_gate` (``gradsim compare --methods uncertainty,gradnorm``), found
without importing it. A new loss weighting is one new module here.

>>> from lightning_gradsim import GradientGate
>>> from lightning_gradsim.loss_weighting import UncertaintyWeighting
>>> gate = GradientGate(rule="unweighted", loss_weighting=UncertaintyWeighting(aux_tasks=1))
>>> type(gate.loss_weighting).__name__
'UncertaintyWeighting'
>>> sorted(method_modules())
['dwa', 'gradnorm', 'rlw', 'uncertainty']
"""

from __future__ import annotations

import pkgutil
from typing import TYPE_CHECKING

from .._lazy import lazy_exports
from ..core.loss_weighting import LossWeighting, check_aux_weight

#: public name -> the module of this package defining it, imported on first access (``make_gate("gradnorm")``
#: loads the GradNorm module and no other weighting).
_EXPORTS: dict[str, str] = {
    "UncertaintyWeighting": "uncertainty",
    "GradNorm": "gradnorm",
    "default_last_shared_layer": "gradnorm",
    "gradnorm_update": "gradnorm",
    "DWA": "dwa",
    "dwa_weights": "dwa",
    "RLW": "rlw",
}

if TYPE_CHECKING:
    from .dwa import DWA, dwa_weights
    from .gradnorm import GradNorm, default_last_shared_layer, gradnorm_update
    from .rlw import RLW
    from .uncertainty import UncertaintyWeighting

__all__ = [
    "LossWeighting",
    "UncertaintyWeighting",
    "GradNorm",
    "default_last_shared_layer",
    "gradnorm_update",
    "DWA",
    "dwa_weights",
    "RLW",
    "check_aux_weight",
    "method_modules",
]


def method_modules() -> dict[str, str]:
    """``{method name: "module:make_gate"}`` for every weighting module of this package (not imported)."""
    return {
        info.name: f"{__name__}.{info.name}:make_gate"
        for info in pkgutil.iter_modules(__path__)
        if not info.name.startswith("_")
    }


_getattr, _dir = lazy_exports(__name__, _EXPORTS)
__dir__ = _dir


def __getattr__(name: str) -> object:
    return _getattr(name)
