"""Baselines to compare the gate against, usable wherever a gate is (``self.gradsim = ...``).

* ``pcgrad`` — gradient surgery (Yu et al., 2020), a gate rule: ``GradientGate(rule="pcgrad")``.
* ``uncertainty`` — :class:`UncertaintyWeighting` (Kendall et al., 2018), learned log-variances.
* ``gradnorm`` — :class:`GradNorm` (Chen et al., 2018), task weights balancing gradient norms.
* :class:`CrossStitchUnit` / :class:`CrossStitchNet` (Misra et al., 2016), an architecture that
  learns how much to share; use it with any rule.

Importing :mod:`lightning_gradsim` registers the three methods with
:func:`lightning_gradsim.methods.make_gate`, so ``gradsim compare --methods pcgrad,uncertainty,gradnorm`` works.

Example::

    from lightning_gradsim.methods import make_gate
    gate = make_gate("uncertainty", aux_tasks=["rotated"])
"""

from .cross_stitch import (
    CrossStitchMultiHeadNet,
    CrossStitchNet,
    CrossStitchUnit,
    cross_stitch_mlp,
    cross_stitch_resnet,
)
from .gradnorm import GradNorm
from .pcgrad import PCGrad, draw_pcgrad_orders, pcgrad_coefficients
from .uncertainty import UncertaintyWeighting

__all__ = [
    "PCGrad",
    "pcgrad_coefficients",
    "draw_pcgrad_orders",
    "UncertaintyWeighting",
    "GradNorm",
    "CrossStitchUnit",
    "CrossStitchNet",
    "CrossStitchMultiHeadNet",
    "cross_stitch_mlp",
    "cross_stitch_resnet",
]
