"""Baselines to compare the gate against, usable wherever a gate is (``self.gradsim = ...``).

* ``pcgrad`` — gradient surgery (Yu et al., 2020), a gate rule: ``GradientGate(rule="pcgrad")``.
* ``uncertainty`` — :class:`UncertaintyWeighting` (Kendall et al., 2018), learned log-variances.
* ``gradnorm`` — :class:`GradNorm` (Chen et al., 2018), task weights balancing gradient norms.
* ``dwa`` — :class:`DWA` (Liu et al., 2019), dynamic weight average of the loss ratios.
* ``rlw`` — :class:`RLW` (Lin et al., 2022), random loss weights drawn every step.
* :class:`CrossStitchUnit` / :class:`CrossStitchNet` (Misra et al., 2016), an architecture that
  learns how much to share; use it with any rule.
* :class:`NDDRUnit` / :class:`NDDRNet` (NDDR-CNN, Gao et al., 2019): the columns' features
  concatenated and fused per task by a learned 1x1 convolution, BatchNorm and ReLU.

The loss weightings and PCGrad are built-in names of :func:`lightning_gradsim.methods.make_gate` (so
``gradsim compare --methods pcgrad,uncertainty,gradnorm,dwa,rlw`` works); each module loads on first use,
and the names below load theirs on first access.

>>> from lightning_gradsim.methods import make_gate
>>> type(make_gate("uncertainty", aux_tasks=["rotated"]).loss_weighting).__name__
'UncertaintyWeighting'
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .._lazy import lazy_exports

#: public name -> the module of this package defining it, imported on first access.
_EXPORTS: dict[str, str] = {
    "PCGrad": "pcgrad",
    "pcgrad_coefficients": "pcgrad",
    "draw_pcgrad_orders": "pcgrad",
    "UncertaintyWeighting": "uncertainty",
    "GradNorm": "gradnorm",
    "DWA": "dwa",
    "RLW": "rlw",
    "CrossStitchUnit": "cross_stitch",
    "CrossStitchNet": "cross_stitch",
    "CrossStitchMultiHeadNet": "cross_stitch",
    "cross_stitch_mlp": "cross_stitch",
    "cross_stitch_resnet": "cross_stitch",
    "NDDRUnit": "nddr",
    "NDDRNet": "nddr",
    "nddr_mlp": "nddr",
    "nddr_resnet": "nddr",
}

__all__ = list(_EXPORTS)

if TYPE_CHECKING:
    from .cross_stitch import (
        CrossStitchMultiHeadNet,
        CrossStitchNet,
        CrossStitchUnit,
        cross_stitch_mlp,
        cross_stitch_resnet,
    )
    from .dwa import DWA
    from .gradnorm import GradNorm
    from .nddr import NDDRNet, NDDRUnit, nddr_mlp, nddr_resnet
    from .pcgrad import PCGrad, draw_pcgrad_orders, pcgrad_coefficients
    from .rlw import RLW
    from .uncertainty import UncertaintyWeighting


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
