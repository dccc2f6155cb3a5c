"""Collectives for the gate under data parallelism (DDP): one bucketed all-reduce, a buffer broadcast, the sync modes.

Per-task gradients come from ``torch.autograd.grad``, which never passes through DDP's reducer,
so :class:`~lightning_gradsim.GradSimMixin` averages them over the ranks itself, with the gradient
transforms of :mod:`lightning_gradsim.core.transforms` and :mod:`lightning_gradsim.parallel.ddp_sharded`
(``K`` tasks, ``S`` shared and ``H`` other parameter elements, ``N`` ranks):

* ``gradsim_sync = "global"`` (default, exact; :class:`~lightning_gradsim.parallel.ddp_global.AllReduce`): the
  per-task gradients on the shared parameters and the task heads' gradients are flattened into one
  buffer per dtype and averaged with a single ``all_reduce`` (``K S + H`` elements, about twice that
  through a ring). Every rank then gates on the *global* per-task gradients and takes the same
  decision; the run equals a single process on the concatenated batch.
* ``gradsim_sync = "sharded"`` (exact, less traffic; :class:`~lightning_gradsim.parallel.ddp_sharded.ReduceScatter`):
  each rank receives its ``1/N`` shard of the averaged per-task gradients (reduce-scatter), the
  per-layer Gramian of the shards is all-reduced (``L K^2`` floats), every rank combines its shard
  and the combined gradient is all-gathered: about ``(K + 1) S`` elements through a ring instead of
  ``2 K S``; the same weights and gate state as ``"global"`` (up to float rounding).
* ``gradsim_sync = "local"`` (cheapest; :class:`~lightning_gradsim.parallel.ddp_local.AllReduceCombined`): each
  rank gates on its own local cosine, and only the combined gradient is averaged (``S + H``
  elements, like plain DDP). Ranks may take different gate decisions and keep different gate
  state; the update is the average of the per-rank updates.

A non-finite flag rides along, so every rank agrees on skipping a step. Module buffers (BatchNorm
running statistics) are not synchronised by manual optimisation: :func:`broadcast_buffers`
(``gradsim_sync_buffers = "broadcast"``) copies rank 0's, as DDP does in automatic optimisation.

>>> import torch
>>> from lightning_gradsim.parallel.collectives import all_reduce_mean, world_size
>>> world_size()  # torch.distributed is not initialised here: one process
1
>>> all_reduce_mean([torch.ones(2)], nonfinite=torch.tensor(False))
([tensor([1., 1.])], tensor(False))
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = [
    "world_size",
    "any_nonfinite",
    "all_reduce_mean",
    "start_all_reduce",
    "PendingMean",
    "broadcast_buffers",
    "reduce_scatter",
    "all_gather",
    "gather_floats",
]


def world_size(group: dist.ProcessGroup | None = None) -> int:
    """Number of ranks in ``group`` (the default group), 1 when torch.distributed is not initialised."""
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size(group)


def any_nonfinite(t: Tensor) -> Tensor:
    """Whether any element of ``t`` is NaN or infinite, as a bool scalar on ``t``'s device.

    On CPU one pass without a temporary: the sum is NaN or infinite if an element is (or if finite
    values overflow it), and only then the elements are checked one by one; ``torch.isfinite(t)``
    allocates and touches several temporaries of ``t``'s size. Elsewhere the element-wise check
    (reading the sum would wait for the device).

    >>> any_nonfinite(torch.tensor([3e38, 3e38])), any_nonfinite(torch.tensor([1.0, float("nan")]))
    (tensor(False), tensor(True))
    """
    if t.device.type == "cpu" and t.is_floating_point():
        if bool(torch.isfinite(t.sum())):
            return torch.zeros((), dtype=torch.bool)
    return ~torch.isfinite(t).all()


def all_reduce_mean(
    tensors: Sequence[Tensor], nonfinite: Tensor | None = None, group: dist.ProcessGroup | None = None
) -> tuple[list[Tensor], Tensor]:
    """Average ``tensors`` over the ranks with one ``all_reduce`` per dtype (one in practice).

    ``tensors`` are flattened into a single buffer per (device, dtype); each rank must pass the
    same shapes in the same order. ``nonfinite`` (a bool scalar: something on this rank is
    NaN/inf) is summed in the same buffer. Returns new averaged tensors (inputs are untouched) and
    a bool scalar: whether any rank flagged ``nonfinite`` or any averaged value is non-finite.
    With a world size of 1 the tensors come back as they are.

    >>> all_reduce_mean([torch.zeros(1)], nonfinite=torch.tensor(True))[1]
    tensor(True)
    """
    tensors = list(tensors)
    n = world_size(group)
    flag = torch.zeros((), dtype=torch.bool) if nonfinite is None else nonfinite.detach().reshape(())
    if n == 1:
        return tensors, flag.clone()
    if not tensors:
        raise ValueError("all_reduce_mean() needs at least one tensor.")
    # Group by (device, dtype); the flag rides in the first group.
    groups: dict[tuple[torch.device, torch.dtype], list[int]] = {}
    for i, t in enumerate(tensors):
        groups.setdefault((t.device, t.dtype), []).append(i)
    out: list[Tensor | None] = [None] * len(tensors)
    any_bad = torch.zeros((), dtype=torch.bool, device=tensors[0].device)
    for g, ((device, dtype), idx) in enumerate(groups.items()):
        parts = [tensors[i].detach().reshape(-1) for i in idx]
        if g == 0:
            parts.append(flag.to(device=device, dtype=dtype).reshape(1))
        buffer = torch.cat(parts)
        dist.all_reduce(buffer, op=dist.ReduceOp.SUM, group=group)
        if g == 0:
            any_bad = any_bad | (buffer[-1] != 0)
            buffer = buffer[:-1]
        buffer.div_(n)
        any_bad = any_bad | any_nonfinite(buffer)
        offset = 0
        for i in idx:
            numel = tensors[i].numel()
            out[i] = buffer[offset : offset + numel].view_as(tensors[i])
            offset += numel
    return [t for t in out if t is not None], any_bad


class PendingMean:
    """An all-reduce started by :func:`start_all_reduce`; :meth:`wait` gives what :func:`all_reduce_mean` returns."""

    def __init__(
        self, tensors: list[Tensor], buffers: list[tuple[Tensor, list[int], Any]], n: int, flagged: bool
    ) -> None:
        self.tensors, self.buffers, self.n, self.flagged = tensors, buffers, n, flagged

    def wait(self) -> tuple[list[Tensor], Tensor]:
        out: list[Tensor | None] = [None] * len(self.tensors)
        any_bad: Tensor | None = None
        for g, (buffer, idx, work) in enumerate(self.buffers):
            work.wait()
            bad = torch.zeros((), dtype=torch.bool, device=buffer.device)
            if g == 0 and self.flagged:
                bad = buffer[-1] != 0
                buffer = buffer[:-1]
            buffer.div_(self.n)
            bad = bad | any_nonfinite(buffer)
            any_bad = bad if any_bad is None else any_bad | bad.to(any_bad.device)
            offset = 0
            for i in idx:
                numel = self.tensors[i].numel()
                out[i] = buffer[offset : offset + numel].view_as(self.tensors[i])
                offset += numel
        assert any_bad is not None
        return [t for t in out if t is not None], any_bad


def start_all_reduce(
    tensors: Sequence[Tensor], nonfinite: Tensor | None = None, group: dist.ProcessGroup | None = None
) -> PendingMean:
    """Start (``async_op``) the all-reduce of :func:`all_reduce_mean`: one flat buffer per (device, dtype),
    ``nonfinite`` riding in the first; the caller goes on (e.g. with the next task's backward) and calls
    ``wait()`` on the result for the averaged tensors and the non-finite flag. The same numbers as
    :func:`all_reduce_mean` (each element is the same sum over the ranks, divided by their number)."""
    tensors = list(tensors)
    if not tensors:
        raise ValueError("start_all_reduce() needs at least one tensor.")
    n = world_size(group)
    groups: dict[tuple[torch.device, torch.dtype], list[int]] = {}
    for i, t in enumerate(tensors):
        groups.setdefault((t.device, t.dtype), []).append(i)
    buffers: list[tuple[Tensor, list[int], Any]] = []
    for g, ((device, dtype), idx) in enumerate(groups.items()):
        parts = [tensors[i].detach().reshape(-1) for i in idx]
        if g == 0 and nonfinite is not None:
            parts.append(nonfinite.detach().reshape(1).to(device=device, dtype=dtype))
        buffer = torch.cat(parts)
        work = dist.all_reduce(buffer, op=dist.ReduceOp.SUM, group=group, async_op=True)
        buffers.append((buffer, idx, work))
    return PendingMean(tensors, buffers, n, nonfinite is not None)


def broadcast_buffers(tensors: Sequence[Tensor], src: int = 0, group: dist.ProcessGroup | None = None) -> None:
    """Copy rank ``src``'s values of ``tensors`` (e.g. module buffers) into every rank's, in place: one
    ``broadcast`` per (device, dtype). Nothing happens with one process.

    >>> t = torch.ones(2)
    >>> broadcast_buffers([t]); t
    tensor([1., 1.])
    """
    tensors = list(tensors)
    if world_size(group) == 1 or not tensors:
        return
    groups: dict[tuple[torch.device, torch.dtype], list[Tensor]] = {}
    for t in tensors:
        groups.setdefault((t.device, t.dtype), []).append(t)
    for members in groups.values():
        buffer = torch.cat([t.detach().reshape(-1) for t in members])
        dist.broadcast(buffer, src=src, group=group)
        offset = 0
        for t in members:
            t.copy_(buffer[offset : offset + t.numel()].view_as(t))
            offset += t.numel()


def reduce_scatter(
    output: Tensor, input: Tensor, group: dist.ProcessGroup | None = None, async_op: bool = False
) -> Any:
    """Sum ``input`` (``world * output.numel()`` elements) over the ranks; rank ``r`` gets chunk ``r`` in
    ``output`` (``reduce_scatter_single``, ``reduce_scatter_tensor`` in torch before 2.12)."""
    fn = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
    return fn(output, input, group=group, async_op=async_op)


def all_gather(output: Tensor, input: Tensor, group: dist.ProcessGroup | None = None, async_op: bool = False) -> Any:
    """Every rank's ``input`` concatenated in rank order into ``output`` (``all_gather_single``,
    ``all_gather_into_tensor`` in torch before 2.12)."""
    fn = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    return fn(output, input, group=group, async_op=async_op)


def gather_floats(value: float, group: dist.ProcessGroup | None = None) -> list[float]:
    """``value`` from every rank, in rank order (``[value]`` without ``torch.distributed``).

    >>> gather_floats(3.0)
    [3.0]
    """
    if world_size(group) == 1:
        return [float(value)]
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend(group) == "nccl" else None
    mine = torch.tensor([float(value)], dtype=torch.float64, device=device)
    out = [torch.zeros_like(mine) for _ in range(world_size(group))]
    dist.all_gather(out, mine, group=group)
    return [float(t.item()) for t in out]
