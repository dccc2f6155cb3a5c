"""GradNorm (Chen et al., 2018): the weighting is :class:`lightning_gradsim.weighting.GradNorm`; this module
registers the method ``make_gate("gradnorm", ...)``.

>>> from lightning_gradsim.methods import make_gate
>>> gate = make_gate("gradnorm", alpha=0.5)
>>> gate.rule_name, gate.loss_weighting.alpha
('sum', 0.5)
"""

from __future__ import annotations

from ..gate import GradientGate
from ..methods import register_method
from ..weighting import GradNorm, default_last_shared_layer, gradnorm_update
from ._weighting import weighting_gate

__all__ = ["GradNorm", "default_last_shared_layer", "gradnorm_update"]


@register_method("gradnorm")
def _make_gradnorm(**kwargs) -> GradientGate:
    """``make_gate("gradnorm", alpha=1.5, lr=0.025, last_shared_layer=None, aux_weight=1.0, seed=0, rule="sum")``."""
    return weighting_gate("gradnorm", GradNorm, kwargs)
