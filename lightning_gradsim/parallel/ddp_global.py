"""DDP sync mode ``"global"`` (default, exact): all-reduce the per-task gradients before the rule.

Every rank then gates on the global per-task gradients (``K S + H`` elements per step, one bucketed
all-reduce with a non-finite flag) and takes the same decision: the run equals one process on the
concatenated batch.

>>> import torch
>>> from lightning_gradsim.core import TaskGradients
>>> AllReduce().task_gradients(TaskGradients(rows=[[torch.ones(1)]], others=[]))  # not distributed
'ready'
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from ..core.task_gradients import TaskGradients
from ..core.transforms import READY, GradientTransform, Status
from .collectives import all_reduce_mean, world_size

__all__ = ["AllReduce"]


class AllReduce(GradientTransform):
    """DDP, ``gradsim_sync="global"``: average the per-task gradients, the heads' gradients (and the
    losses, when carried) over the ranks in one bucketed all-reduce, with a non-finite flag in it.

    Every rank then gates on the global per-task gradients and takes the same decision. With one
    process it does nothing.

    >>> AllReduce().task_gradients(TaskGradients(rows=[[torch.ones(1)]], others=[]))  # not distributed
    'ready'
    """

    def __init__(self, group: dist.ProcessGroup | None = None) -> None:
        self.group = group

    def task_gradients(self, grads: TaskGradients) -> Status:
        if world_size(self.group) == 1:
            return READY
        flag = torch.zeros((), dtype=torch.bool) if grads.finite is None else ~grads.finite
        averaged, bad = all_reduce_mean(grads.flat(), nonfinite=flag, group=self.group)
        grads.unflat(averaged)
        grads.finite = ~bad
        return READY
