"""Random loss weighting (Lin et al., 2022): the weighting is :class:`lightning_gradsim.weighting.RLW`; this
module registers the method ``make_gate("rlw", ...)``. The gate's ``seed`` seeds the draws too.

>>> from lightning_gradsim.methods import make_gate
>>> gate = make_gate("rlw", seed=3)
>>> gate.rule_name, gate.loss_weighting.seed, gate.loss_weighting.scale
('sum', 3, 1.0)
"""

from __future__ import annotations

from typing import Any

from ..gate import GradientGate
from ..methods import register_method
from ..weighting import RLW
from ._weighting import weighting_gate

__all__ = ["RLW"]


@register_method("rlw")
def _make_rlw(**kwargs: Any) -> GradientGate:
    """``make_gate("rlw", seed=0, scale=1.0, aux_weight=1.0, rule="sum")`` (``seed`` seeds the gate and the draws)."""
    seed = kwargs.get("seed", 0)

    def build(**rest: Any) -> RLW:
        return RLW(seed=seed, **rest)

    return weighting_gate("rlw", build, kwargs)
