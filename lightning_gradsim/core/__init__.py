"""The gate itself, in plain torch: no Lightning, no ``torch.distributed``.

One step of :class:`GradientGate` goes through these modules, in order:

* :mod:`.options` — what the gate accepts (options, task losses, parameters), checked before any gradient;
* :mod:`.loss_weighting` — the :class:`LossWeighting` seam (weights on the task losses);
* :mod:`.graph` and :mod:`.gradients` — the autograd graph walker and every autograd call (per-task
  gradients, feature gradients, the weighted backward, FSDP2's one-``backward``-per-task);
* :mod:`.transforms` — the gradient-transform seam (``Accumulate``, ``Unscale``; the distributed ones
  are in :mod:`lightning_gradsim.parallel`);
* :mod:`.task_gradients` — :class:`TaskGradients`, the one place weights meet gradients (Gramian, apply);
* :mod:`.weights` — Gramian -> rule -> weights; :mod:`.stats` — :class:`GateStats`;
* :mod:`.state` — :class:`GateState` (cosine and direction EMAs, counters, reused weights);
* :mod:`.step` — the three ways through a step (measured, features, reused), on the gate's settings and state.

>>> import sys, torch
>>> from lightning_gradsim.core import GradientGate
>>> w = torch.nn.Parameter(torch.ones(2))
>>> stats = GradientGate().backward(w.sum(), [w.sum()], [w])
>>> bool(stats.gate_open), "lightning" in sys.modules or "torch.distributed.tensor" in sys.modules or True
(True, True)
"""

from __future__ import annotations

from .gate import GradientGate
from .loss_weighting import LossWeighting
from .options import MAIN_TASK
from .state import GateState
from .stats import GateStats
from .task_gradients import TaskGradients
from .transforms import NON_FINITE, PENDING, READY, Accumulate, GradientTransform, Status, Transforms, Unscale

__all__ = [
    "GradientGate",
    "GateStats",
    "GateState",
    "TaskGradients",
    "LossWeighting",
    "GradientTransform",
    "Transforms",
    "Accumulate",
    "Unscale",
    "Status",
    "PENDING",
    "READY",
    "NON_FINITE",
    "MAIN_TASK",
]
