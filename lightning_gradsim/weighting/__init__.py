"""Loss weightings, composed with any gate: ``GradientGate(rule=..., loss_weighting=...)``.

* :class:`UncertaintyWeighting` (Kendall et al., 2018): learned log-variances.
* :class:`GradNorm` (Chen et al., 2018): weights that balance the tasks' gradient norms.
* :class:`DWA` (Liu et al., 2019): dynamic weight average, from the ratio of the last two losses.
* :class:`RLW` (Lin et al., 2022): random weights, a softmax of normal draws, every step.
* :class:`LossWeighting`: the base class, to write your own.

>>> from lightning_gradsim import GradientGate
>>> gate = GradientGate(rule="unweighted", loss_weighting=UncertaintyWeighting(aux_tasks=1))
>>> type(gate.loss_weighting).__name__
'UncertaintyWeighting'
"""

from .base import LossWeighting, check_aux_weight
from .dwa import DWA, dwa_weights
from .gradnorm import GradNorm, default_last_shared_layer, gradnorm_update
from .rlw import RLW
from .uncertainty import UncertaintyWeighting

__all__ = [
    "LossWeighting",
    "UncertaintyWeighting",
    "GradNorm",
    "DWA",
    "dwa_weights",
    "RLW",
    "default_last_shared_layer",
    "gradnorm_update",
    "check_aux_weight",
]
