"""GradNorm (Chen et al., 2018): the weighting is :class:`lightning_gradsim.loss_weighting.GradNorm`; its module
defines the method ``make_gate("gradnorm", ...)``.

>>> from lightning_gradsim.methods import make_gate
>>> gate = make_gate("gradnorm", alpha=0.5)
>>> gate.rule_name, gate.loss_weighting.alpha
('sum', 0.5)
"""

from __future__ import annotations

from ..loss_weighting import GradNorm, default_last_shared_layer, gradnorm_update

__all__ = ["GradNorm", "default_last_shared_layer", "gradnorm_update"]
