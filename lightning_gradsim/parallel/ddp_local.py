"""DDP sync mode ``"local"`` (cheapest, not exact): each rank gates on its own gradients, only the
combined gradient is all-reduced (``S + H`` elements, like plain DDP).

>>> import torch
>>> p = torch.nn.Parameter(torch.ones(2))
>>> p.grad = torch.ones(2)
>>> AllReduceCombined().combined([p], [], torch.tensor(True))  # not distributed
tensor(True)
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from ..core.transforms import GradientTransform
from .collectives import all_reduce_mean, world_size

__all__ = ["AllReduceCombined"]


class AllReduceCombined(GradientTransform):
    """DDP, ``gradsim_sync="local"``: each rank gates on its own per-task gradients; once the gate wrote
    ``.grad``, the combined gradients (shared and heads) are averaged over the ranks in one bucketed
    all-reduce, with this rank's non-finite flag in it.

    The step is finite only if it is on every rank: a NaN/inf on another rank makes this rank skip too,
    and the gate counts the step as skipped (not measured). Every rank learns it before the gate
    commits its state (:meth:`agree`: a one-flag all-reduce per step, ``(*B,)`` flags for stacked
    runs), so a skipped step leaves every rank's gate state as it was. It needs no per-task gradients, so it also
    serves ``similarity="features"`` and ``every_n_steps``. With one process it does nothing.

    >>> p = torch.nn.Parameter(torch.ones(2))
    >>> p.grad = torch.ones(2)
    >>> AllReduceCombined().combined([p], [], torch.tensor(True))  # not distributed
    tensor(True)
    """

    needs_task_gradients = False

    def __init__(self, group: dist.ProcessGroup | None = None) -> None:
        self.group = group

    def agree(self, finite: Tensor) -> Tensor:
        """Skip the step on every rank where any rank found it non-finite, before the gate commits its state
        (cosine moments and EMA, direction EMA, open counts, a rule's targets): one small all-reduce."""
        if world_size(self.group) == 1:
            return finite
        bad = (~finite).to(torch.float32)
        dist.all_reduce(bad, op=dist.ReduceOp.SUM, group=self.group)
        return finite & (bad == 0).to(finite.device)

    def combined(self, params: Sequence[Tensor], others: Sequence[Tensor], finite: Tensor) -> Tensor:
        if world_size(self.group) == 1:
            return finite
        tensors = list(params) + list(others)
        grads = [torch.zeros_like(p) if p.grad is None else p.grad for p in tensors]
        averaged, bad = all_reduce_mean(grads, nonfinite=~finite.all(), group=self.group)
        for p, g in zip(tensors, averaged):
            p.grad = g
        return finite & ~bad.to(finite.device)
