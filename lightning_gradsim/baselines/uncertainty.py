"""Uncertainty weighting (Kendall et al., 2018).

The weighting is :class:`lightning_gradsim.loss_weighting.UncertaintyWeighting`;
its module defines the method ``make_gate("uncertainty", ...)``.

>>> from lightning_gradsim.methods import make_gate
>>> gate = make_gate("uncertainty", aux_tasks=["rotated"], aux_weight=0.5)
>>> gate.rule_name, type(gate.loss_weighting).__name__, gate.loss_weighting.aux_weight
('sum', 'UncertaintyWeighting', 0.5)
"""

from __future__ import annotations

from ..loss_weighting import UncertaintyWeighting

__all__ = ["UncertaintyWeighting"]
