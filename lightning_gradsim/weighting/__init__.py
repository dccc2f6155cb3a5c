"""Loss weightings, composed with any gate: ``GradientGate(rule=..., loss_weighting=...)``.

* :class:`UncertaintyWeighting` (Kendall et al., 2018): learned log-variances.
* :class:`GradNorm` (Chen et al., 2018): weights that balance the tasks' gradient norms.
* :class:`LossWeighting`: the base class, to write your own.

>>> from lightning_gradsim import GradientGate
>>> gate = GradientGate(rule="unweighted", loss_weighting=UncertaintyWeighting(aux_tasks=1))
>>> type(gate.loss_weighting).__name__
'UncertaintyWeighting'
"""

from .base import LossWeighting, check_aux_weight
from .gradnorm import GradNorm, default_last_shared_layer, gradnorm_update
from .uncertainty import UncertaintyWeighting

__all__ = [
    "LossWeighting",
    "UncertaintyWeighting",
    "GradNorm",
    "default_last_shared_layer",
    "gradnorm_update",
    "check_aux_weight",
]
