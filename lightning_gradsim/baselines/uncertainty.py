"""Uncertainty weighting (Kendall et al., 2018).

The weighting is :class:`lightning_gradsim.weighting.UncertaintyWeighting`;
this module registers the method ``make_gate("uncertainty", ...)``.

>>> from lightning_gradsim.methods import make_gate
>>> gate = make_gate("uncertainty", aux_tasks=["rotated"], aux_weight=0.5)
>>> gate.rule_name, type(gate.loss_weighting).__name__, gate.loss_weighting.aux_weight
('sum', 'UncertaintyWeighting', 0.5)
"""

from __future__ import annotations

from ..gate import GradientGate
from ..methods import register_method
from ..weighting import UncertaintyWeighting
from ._weighting import weighting_gate

__all__ = ["UncertaintyWeighting"]


@register_method("uncertainty")
def _make_uncertainty(**kwargs) -> GradientGate:
    """``make_gate("uncertainty", aux_tasks=..., aux_weight=..., init_log_var=..., seed=..., rule="sum")``."""
    return weighting_gate("uncertainty", UncertaintyWeighting, kwargs)
