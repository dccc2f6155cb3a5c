"""``gradsim_sync="sharded"``: DDP that reduces each rank's shard of the per-task gradients, not all of them.

``"global"`` all-reduces the ``K`` per-task gradients (about ``2 K S`` elements through a ring, ``S``
shared elements). The gate only needs their per-layer Gramian ``(L, K, K)`` and, afterwards, the
combined gradient, so :class:`ReduceScatter` does::

    reduce-scatter each task's gradient        every rank keeps its shard (1/N) of the K averaged gradients  K S
    all-reduce the heads' gradients            (summed over tasks, small) and a non-finite flag              2 H
    per-layer Gramian of the shard, all-reduce (sum over shards = the Gramian of the whole gradients)    2 L K^2
    rule -> weights (the same on every rank)   apply them to the shard
    all-gather the combined shard              every rank has the whole combined gradient in .grad           S

``(K + 1) S`` elements instead of ``2 K S``, and exact: the same weights, the same gate state and the
same ``.grad`` as ``"global"`` up to float rounding (tested). The shard of rank ``r`` is the range
``[r c, (r + 1) c)`` of the concatenated, flattened shared gradients (``c = ceil(S / N)``,
:class:`ShardLayout`); the gate sees each shared tensor's part of it (empty on ranks whose range does
not meet the tensor), so the ``projection`` direction EMA is kept per shard too. Checkpoints keep it
whole (:func:`gather_directions` on save, :func:`shard_directions` on load), so they load under any
sync mode and world size.

>>> ShardLayout([3, 4], world=2, rank=1).pieces  # 7 elements, shards of 4: rank 1 holds 3 of the second tensor
[(0, 0, 0), (1, 4, 0)]
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from ..core.task_gradients import TaskGradients
from ..core.transforms import READY, GradientTransform, Status
from .collectives import all_gather, all_reduce_mean, reduce_scatter, world_size

__all__ = ["ShardLayout", "ReduceScatter", "gather_directions", "shard_directions"]


class ShardLayout:
    """Which part of each tensor rank ``rank`` of ``world`` holds: the concatenation of the flattened
    tensors (``numels`` elements each) cut into ``world`` chunks of ``chunk = ceil(total / world)``.

    ``pieces[i] = (lo, hi, at)``: elements ``lo:hi`` of tensor ``i`` (flattened) sit at ``at`` in this
    rank's chunk (``lo == hi``: none of it).

    >>> layout = ShardLayout([3, 4], world=2, rank=0)
    >>> layout.chunk, layout.pieces
    (4, [(0, 3, 0), (0, 1, 3)])
    """

    def __init__(self, numels: Sequence[int], world: int, rank: int) -> None:
        if world < 1 or not 0 <= rank < world:
            raise ValueError(f"ShardLayout needs 0 <= rank < world, got rank={rank}, world={world}.")
        self.numels = [int(n) for n in numels]
        self.world, self.rank = int(world), int(rank)
        self.total = sum(self.numels)
        self.chunk = max(1, -(-self.total // self.world))
        start, end = self.rank * self.chunk, (self.rank + 1) * self.chunk
        self.offsets: list[int] = []
        self.pieces: list[tuple[int, int, int]] = []
        offset = 0
        for n in self.numels:
            lo, hi = max(offset, start), min(offset + n, end)
            if hi <= lo:
                self.pieces.append((0, 0, 0))
            else:
                self.pieces.append((lo - offset, hi - offset, lo - start))
            self.offsets.append(offset)
            offset += n

    def local(self, chunk: Tensor) -> list[Tensor]:
        """Views of ``chunk`` (this rank's ``(..., chunk)`` buffer), one per tensor (1-D, maybe empty)."""
        return [chunk[..., at : at + hi - lo] for lo, hi, at in self.pieces]

    def whole(self, gathered: Tensor, shapes: Sequence[torch.Size]) -> list[Tensor]:
        """Views of ``gathered`` (every rank's chunk, ``world * chunk`` elements), one per tensor, shaped."""
        return [gathered[o : o + n].view(shape) for o, n, shape in zip(self.offsets, self.numels, shapes)]


def _rank(group: dist.ProcessGroup | None) -> int:
    return dist.get_rank(group) if world_size(group) > 1 else 0


class ReduceScatter(GradientTransform):
    """DDP, ``gradsim_sync="sharded"``: see the module docstring.

    ``overlap``: start each task's reduce-scatter as soon as its gradient is known, while the next
    task's backward runs (only where this transform is the first of the pipeline and the gradients
    come one task at a time; otherwise they all start when the per-task backward is done).
    With one process it does nothing.

    >>> ReduceScatter().task_gradients(TaskGradients(rows=[[torch.ones(1)]], others=[]))  # not distributed
    'ready'
    """

    def __init__(self, group: dist.ProcessGroup | None = None, overlap: bool = False) -> None:
        self.group, self.overlap = group, bool(overlap)
        self.layout: ShardLayout | None = None
        self._out: Tensor | None = None  # (K, chunk): this rank's shard of each task's averaged gradient
        self._works: dict[int, Any] = {}
        self._combined: Tensor | None = None  # (chunk,): the combined shard, written by the gate
        self._started = False

    # ------------------------------------------------------------------ the hooks
    def task_ready(self, k: int, num_tasks: int, row: Sequence[Tensor | None], params: Sequence[Tensor]) -> None:
        if self.overlap and world_size(self.group) > 1:
            self._send(k, num_tasks, row, params)

    def task_gradients(self, grads: TaskGradients) -> Status:
        n = world_size(self.group)
        if n == 1:
            return READY
        self._started = True
        if grads.losses is not None:
            raise ValueError(
                "gradsim_sync='sharded' does not carry the task losses a loss weighting needs; use "
                "gradsim_sync='global' with a loss weighting."
            )
        params = grads.params
        assert params is not None and grads.other_params is not None
        num_tasks = grads.num_tasks
        rows = grads.to_rows().rows
        assert rows is not None
        for k in range(num_tasks):
            if k not in self._works:
                self._send(k, num_tasks, rows[k], params)
        # The heads' gradients (summed over tasks) and this rank's non-finite flag: one small all-reduce.
        flag = torch.zeros((), dtype=torch.bool) if grads.finite is None else ~grads.finite
        heads = [torch.zeros_like(p) if g is None else g for g, p in zip(grads.others, grads.other_params)]
        if heads:
            averaged, bad = all_reduce_mean(heads, nonfinite=flag, group=self.group)
        else:
            averaged, bad = [], _any_rank(flag, self.group)
        for work in self._works.values():
            work.wait()
        assert self._out is not None and self.layout is not None
        self._out.div_(n)
        shards: list[list[Tensor | None]] = [list(self.layout.local(self._out[k])) for k in range(num_tasks)]
        grads.stacked, grads.rows, grads.others = None, shards, list(averaged)
        grads.finite = ~bad
        grads._present = None
        # The gate writes the combined shard through these holders' .grad (views of one buffer).
        self._combined = torch.zeros(self.layout.chunk, dtype=self._out.dtype, device=self._out.device)
        holders = self.layout.local(torch.empty_like(self._combined))
        for h, g in zip(holders, self.layout.local(self._combined)):
            h.grad = g
        grads.params = holders
        return READY

    def gramian(self, gram: Tensor) -> Tensor:
        if not self._started:
            return gram
        gram = gram.contiguous()
        dist.all_reduce(gram, op=dist.ReduceOp.SUM, group=self.group)
        return gram

    def combined(self, params: Sequence[Tensor], others: Sequence[Tensor], finite: Tensor) -> Tensor:
        if not self._started:
            return finite
        assert self._combined is not None and self.layout is not None
        gathered = self._combined.new_empty(self.layout.world * self.layout.chunk)
        all_gather(gathered, self._combined, group=self.group)
        for p, g in zip(params, self.layout.whole(gathered, [p.shape for p in params])):
            if p.grad is None:
                p.grad = g.to(p.dtype)
            else:
                p.grad.add_(g.to(p.grad.dtype))
        return finite

    def __repr__(self) -> str:
        return f"ReduceScatter(overlap={self.overlap})"

    # ------------------------------------------------------------------ helpers
    def _send(self, k: int, num_tasks: int, row: Sequence[Tensor | None], params: Sequence[Tensor]) -> None:
        """Start task ``k``'s reduce-scatter (its flattened gradient, zeros where it reaches nothing)."""
        if self.layout is None:
            self.layout = ShardLayout([p.numel() for p in params], world_size(self.group), _rank(self.group))
            dtype = functools.reduce(torch.promote_types, [p.dtype for p in params])
            self._out = torch.empty(num_tasks, self.layout.chunk, dtype=dtype, device=params[0].device)
        assert self._out is not None
        send = self._out.new_zeros(self.layout.world * self.layout.chunk)
        offset = 0
        for g, p in zip(row, params):
            n = p.numel()
            if g is not None:
                send[offset : offset + n].copy_(g.reshape(-1))
            offset += n
        self._works[k] = reduce_scatter(self._out[k], send, group=self.group, async_op=True)


def _any_rank(flag: Tensor, group: dist.ProcessGroup | None) -> Tensor:
    """Whether ``flag`` is set on any rank (one all-reduce of a scalar)."""
    value = flag.to(torch.float32).reshape(1)
    dist.all_reduce(value, group=group)
    return value[0] > 0


# ---------------------------------------------------------------------- checkpoints
def gather_directions(
    state_dict: dict[str, Any], keys: Sequence[str], params: Sequence[Tensor], group: dist.ProcessGroup | None = None
) -> None:
    """Replace this rank's shards of the direction EMA (``state_dict[keys[i]]``, one per shared tensor)
    by the whole tensors, shaped like ``params`` (one all-gather; every rank must call it, as Lightning
    does when it saves a checkpoint)."""
    layout = ShardLayout([p.numel() for p in params], world_size(group), _rank(group))
    if len(keys) != len(params):
        return  # not the sharded layout (e.g. the direction was never measured under "sharded")
    local = state_dict[keys[0]]
    chunk = local.new_zeros(layout.chunk)
    for key, view in zip(keys, layout.local(chunk)):
        view.copy_(state_dict[key].reshape(-1))
    gathered = chunk.new_empty(layout.world * layout.chunk)
    all_gather(gathered, chunk, group=group)
    for key, whole in zip(keys, layout.whole(gathered, [p.shape for p in params])):
        state_dict[key] = whole.clone()


def shard_directions(
    state_dict: dict[str, Any], keys: Sequence[str], params: Sequence[Tensor], group: dist.ProcessGroup | None = None
) -> None:
    """Replace whole direction tensors in ``state_dict`` by this rank's shards of them (on load)."""
    if len(keys) != len(params) or any(state_dict[key].shape != p.shape for key, p in zip(keys, params)):
        return
    layout = ShardLayout([p.numel() for p in params], world_size(group), _rank(group))
    for key, (lo, hi, _) in zip(keys, layout.pieces):
        state_dict[key] = state_dict[key].reshape(-1)[lo:hi].clone()
