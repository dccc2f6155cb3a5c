"""Dynamic weight average (Liu et al., 2019): the weighting is :class:`lightning_gradsim.weighting.DWA`; this
module registers the method ``make_gate("dwa", ...)``.

>>> from lightning_gradsim.methods import make_gate
>>> gate = make_gate("dwa", temperature=2.0, period=10)
>>> gate.rule_name, gate.loss_weighting.temperature, gate.loss_weighting.period
('sum', 2.0, 10)
"""

from __future__ import annotations

from ..gate import GradientGate
from ..methods import register_method
from ..weighting import DWA, dwa_weights
from ._weighting import weighting_gate

__all__ = ["DWA", "dwa_weights"]


@register_method("dwa")
def _make_dwa(**kwargs) -> GradientGate:
    """``make_gate("dwa", temperature=2.0, period=1, aux_weight=1.0, seed=0, rule="sum")``."""
    return weighting_gate("dwa", DWA, kwargs)
