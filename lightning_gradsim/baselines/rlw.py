"""Random loss weighting (Lin et al., 2022): the weighting is :class:`lightning_gradsim.loss_weighting.RLW`; its
module defines the method ``make_gate("rlw", ...)``. The gate's ``seed`` seeds the draws too.

>>> from lightning_gradsim.methods import make_gate
>>> gate = make_gate("rlw", seed=3)
>>> gate.rule_name, gate.loss_weighting.seed, gate.loss_weighting.scale
('sum', 3, 1.0)
"""

from __future__ import annotations

from ..loss_weighting import RLW

__all__ = ["RLW"]
