"""Dynamic weight average (Liu et al., 2019): the weighting is :class:`lightning_gradsim.loss_weighting.DWA`; its
module defines the method ``make_gate("dwa", ...)``.

>>> from lightning_gradsim.methods import make_gate
>>> gate = make_gate("dwa", temperature=2.0, period=10)
>>> gate.rule_name, gate.loss_weighting.temperature, gate.loss_weighting.period
('sum', 2.0, 10)
"""

from __future__ import annotations

from ..loss_weighting import DWA, dwa_weights

__all__ = ["DWA", "dwa_weights"]
