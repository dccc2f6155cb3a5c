"""DDP sync mode ``"global"`` (default, exact): all-reduce the per-task gradients before the rule.

Every rank then gates on the global per-task gradients (``K S + H`` elements per step, bucketed
all-reduces with a non-finite flag) and takes the same decision: the run equals one process on the
concatenated batch. With ``overlap`` (what the registry builds), each task's all-reduce starts as soon
as autograd has its gradients, while the next task's backward runs; only the last task's and the
heads' reductions are waited for after the backward passes.

>>> import torch
>>> from lightning_gradsim.core import TaskGradients
>>> AllReduce().task_gradients(TaskGradients(rows=[[torch.ones(1)]], others=[]))  # not distributed
'ready'
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from ..core.task_gradients import TaskGradients
from ..core.transforms import READY, GradientTransform, Status
from .collectives import PendingMean, all_reduce_mean, start_all_reduce, world_size

__all__ = ["AllReduce"]


class AllReduce(GradientTransform):
    """DDP, ``gradsim_sync="global"``: average the per-task gradients, the heads' gradients (and the
    losses, when carried) over the ranks, with a non-finite flag among them.

    Every rank then gates on the global per-task gradients and takes the same decision. With one
    process it does nothing.

    ``overlap``: start each task's all-reduce (one bucket per task and dtype, asynchronous) from
    :meth:`task_ready`, as soon as autograd has the task's gradients, so that it runs while the next
    task's backward does; :meth:`task_gradients` then starts the heads' (and losses') all-reduce and
    waits. The same numbers as without overlap (every element is the same sum over the ranks, divided
    by their number); where no gradient comes one task at a time (the batched strategy, or this
    transform not first in the pipeline) everything goes in one all-reduce as without overlap.

    >>> AllReduce(overlap=True).task_gradients(TaskGradients(rows=[[torch.ones(1)]], others=[]))  # not distributed
    'ready'
    """

    def __init__(self, group: dist.ProcessGroup | None = None, overlap: bool = False) -> None:
        self.group, self.overlap = group, bool(overlap)
        self._pending: dict[int, PendingMean] = {}

    def task_ready(self, k: int, num_tasks: int, row: Sequence[Tensor | None], params: Sequence[Tensor]) -> None:
        if self.overlap and world_size(self.group) > 1:
            self._pending[k] = start_all_reduce(_filled(row, params), group=self.group)

    def task_gradients(self, grads: TaskGradients) -> Status:
        if world_size(self.group) == 1:
            return READY
        flag = torch.zeros((), dtype=torch.bool) if grads.finite is None else ~grads.finite
        if not self._pending:  # nothing started during the backward passes: one bucketed all-reduce
            averaged, bad = all_reduce_mean(grads.flat(), nonfinite=flag, group=self.group)
            grads.unflat(averaged)
            grads.finite = ~bad
            return READY
        pending, self._pending = self._pending, {}
        params, others = grads.params, grads.other_params
        assert params is not None and others is not None
        rows = grads.to_rows().rows
        assert rows is not None
        for k in range(grads.num_tasks):  # a task whose loss reaches nothing was never announced
            if k not in pending:
                pending[k] = start_all_reduce(_filled(rows[k], params), group=self.group)
        tail = _filled(grads.others, others) + ([grads.losses] if grads.losses is not None else [])
        spare = not tail  # no heads, no losses: the flag rides alone
        heads = start_all_reduce(tail or [flag.new_zeros(1, dtype=torch.float32)], nonfinite=flag, group=self.group)
        tail_avg, bad = heads.wait()
        if spare:
            tail_avg = []
        new_rows: list[list[Tensor | None]] = []
        for k in range(grads.num_tasks):
            row, row_bad = pending[k].wait()
            new_rows.append(list(row))
            bad = bad | row_bad.to(bad.device)
        if grads.losses is not None:
            grads.losses = tail_avg.pop()
        grads.stacked, grads.rows, grads.others = None, new_rows, list(tail_avg)
        grads.finite = ~bad
        grads.owned = False
        grads._present = None
        return READY

    def __repr__(self) -> str:
        return f"AllReduce(overlap={self.overlap})"


def _filled(row: Sequence[Tensor | None], params: Sequence[Tensor]) -> list[Tensor]:
    """``row`` with zeros (shaped like the parameter) where a gradient is ``None``, as :meth:`TaskGradients.flat`."""
    return [g if g is not None else torch.zeros_like(p) for g, p in zip(row, params)]
