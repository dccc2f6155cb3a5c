"""``GateStats``: what one step of the gate measured and decided, as tensors on the gradients' device.

>>> import torch
>>> from lightning_gradsim import GradientGate
>>> w = torch.nn.Parameter(torch.tensor([1.0, 0.0]))
>>> stats = GradientGate(rule="weighted").backward((w * w).sum(), {"aux": w.sum()}, [w])
>>> stats.cosine, stats.weight, stats.gate_open, stats.finite, stats.measured
(tensor([0.7071]), tensor([0.7071]), tensor([True]), tensor(True), tensor([True]))
"""

from __future__ import annotations

from typing import NamedTuple

from torch import Tensor

__all__ = ["GateStats"]


class GateStats(NamedTuple):
    """Per-step statistics of the gate, as tensors on the gradients' device (no host sync).

    Shapes: ``(..., K-1)`` for the per-auxiliary fields, ``(...)`` for the others, where ``...`` are
    the leading batch dimensions of :meth:`GradientGate.combine` (none for ``backward``).

    Attributes:
        cosine: this step's cosine of each auxiliary vector with the main one (on the shared parameters).
        smoothed_cosine: the cosine the rule used (its EMA over steps when ``cosine_ema > 0``, else ``cosine``).
        weight: the coefficient applied to each auxiliary vector (lambda times the gate's factor).
        gate_open: bool, whether each auxiliary vector was used this step.
        main_norm: the L2 norm of the main vector.
        aux_norm: the L2 norm of each auxiliary vector.
        finite: bool, whether the step was finite (losses, gradients, weights); the gate's state is only
            updated, and the optimizer should only step, if so.
        measured: bool, whether each auxiliary cosine was measured: both the main and the auxiliary vector
            are non-zero on the shared parameters. An auxiliary loss that does not reach them (a head on
            detached features) is not measured: its gate is reported closed, its weight 0. ``None`` in
            statistics pickled before 0.2 (read as all measured).
        against_reference: whether the cosines (and so the decision) were measured against a held-out
            reference gradient (``gate.backward(..., reference_loss=...)``) instead of the main gradient.
    """

    cosine: Tensor
    smoothed_cosine: Tensor
    weight: Tensor
    gate_open: Tensor
    main_norm: Tensor
    aux_norm: Tensor
    finite: Tensor
    measured: Tensor | None = None
    against_reference: bool = False
