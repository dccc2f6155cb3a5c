"""Gradient synchronisation for the gate under data parallelism (DDP), with one bucketed all-reduce.

Per-task gradients come from ``torch.autograd.grad``, which never passes through DDP's reducer,
so :class:`~lightning_gradsim.GradSimMixin` averages them over the ranks itself:

* ``gradsim_sync = "global"`` (default, exact): the stacked per-task gradients on the shared parameters
  and the task heads' gradients are flattened into one buffer per dtype and averaged with a
  single ``all_reduce``. Every rank then gates on the *global* per-task gradients and takes the
  same decision; the run equals a single process on the concatenated batch. Volume per step:
  ``K * S + H`` elements (``K`` tasks, ``S`` shared and ``H`` other parameter elements), against
  ``S + H`` for plain DDP.
* ``gradsim_sync = "local"`` (cheaper): each rank gates on its own local cosine, and only the combined
  gradient is averaged (``S + H`` elements, like plain DDP). Ranks may take different gate
  decisions and keep different gate state; the update is the average of the per-rank updates.

A non-finite flag rides along in the same buffer, so every rank agrees on skipping a step.

Example::

    from lightning_gradsim.distributed import all_reduce_mean, world_size
    if world_size() > 1:
        grads, any_nonfinite = all_reduce_mean([g1, g2], nonfinite=torch.tensor(False))
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = [
    "SYNC_MODES",
    "world_size",
    "all_reduce_mean",
    "check_sync_mode",
    "AccumulateOnly",
    "TaskGradientAccumulator",
    "TaskGradientHook",
]

#: Valid values of ``GradSimMixin.gradsim_sync``.
SYNC_MODES = ("global", "local")


def check_sync_mode(mode: str) -> str:
    """Return ``mode`` if it is a valid sync mode, else raise a ``ValueError`` naming the choices."""
    if mode not in SYNC_MODES:
        raise ValueError(
            f"gradsim_sync must be 'global' (exact: gate on the all-reduced per-task gradients) or 'local' "
            f"(cheaper: gate on each rank's own gradients, all-reduce the combined one), got {mode!r}."
        )
    return mode


def world_size(group: dist.ProcessGroup | None = None) -> int:
    """Number of ranks in ``group`` (the default group), 1 when torch.distributed is not initialised."""
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size(group)


def all_reduce_mean(
    tensors: Sequence[Tensor], nonfinite: Tensor | None = None, group: dist.ProcessGroup | None = None
) -> tuple[list[Tensor], Tensor]:
    """Average ``tensors`` over the ranks with one ``all_reduce`` per dtype (one in practice).

    ``tensors`` are flattened into a single buffer per (device, dtype); each rank must pass the
    same shapes in the same order. ``nonfinite`` (a bool scalar: something on this rank is
    NaN/inf) is summed in the same buffer. Returns new averaged tensors (inputs are untouched) and
    a bool scalar: whether any rank flagged ``nonfinite`` or any averaged value is non-finite.
    With a world size of 1 the tensors come back as they are.

    Example::

        averaged, bad = all_reduce_mean([w.grad for w in params], nonfinite=torch.tensor(False))
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
        any_bad = any_bad | ~torch.isfinite(buffer).all()
        offset = 0
        for i in idx:
            numel = tensors[i].numel()
            out[i] = buffer[offset : offset + numel].view_as(tensors[i])
            offset += numel
    return [t for t in out if t is not None], any_bad


class AccumulateOnly(Exception):
    """Raised by :class:`TaskGradientHook` inside ``gate.backward`` on a non-final micro-batch.

    The per-task gradients were stored; the gate must not combine them yet. ``GradSimMixin``
    catches it.
    """


class TaskGradientAccumulator:
    """Sums per-task gradients (the gate's ``TaskGradients``) over micro-batches, positionally."""

    def __init__(self) -> None:
        self.shared: list[Tensor | None] | None = None
        self.others: list[Tensor | None] | None = None
        self.reached: list[bool] | None = None
        self.count = 0
        self.nonfinite = torch.zeros((), dtype=torch.bool)

    def add(self, grads: object, loss_nonfinite: Tensor | None = None) -> None:
        """Add this micro-batch's ``grads`` (``.shared``, ``.others``, ``.reached``) to the sums."""
        shared, others, reached = list(grads.shared), list(grads.others), list(grads.reached)  # type: ignore[attr-defined]
        if loss_nonfinite is not None:
            self.nonfinite = self.nonfinite.to(loss_nonfinite.device) | loss_nonfinite.detach().reshape(())
        if self.count == 0:
            self.shared, self.others, self.reached = shared, others, reached
        else:
            assert self.shared is not None and self.others is not None and self.reached is not None
            if len(shared) != len(self.shared) or len(others) != len(self.others):
                raise ValueError(
                    "The parameters given to the gate changed between accumulated micro-batches "
                    f"({len(self.shared)}+{len(self.others)} before, {len(shared)}+{len(others)} now): "
                    "shared_parameters() and the other parameters must be the same on every micro-batch."
                )
            self.shared = [_add(a, b) for a, b in zip(self.shared, shared)]
            self.others = [_add(a, b) for a, b in zip(self.others, others)]
            self.reached = [a or b for a, b in zip(self.reached, reached)]
        self.count += 1

    def pop(self) -> tuple[list[Tensor | None], list[Tensor | None], list[bool], int, Tensor]:
        """Return ``(shared, others, reached, count, nonfinite)`` and start a new window."""
        out = (self.shared or [], self.others or [], self.reached or [], self.count, self.nonfinite)
        self.__init__()  # type: ignore[misc]
        return out

    def state_dict(self) -> dict[str, object]:
        return {
            "shared": self.shared,
            "others": self.others,
            "reached": self.reached,
            "count": self.count,
            "nonfinite": self.nonfinite,
        }

    def load_state_dict(self, state: dict[str, object]) -> None:
        self.shared = state["shared"]  # type: ignore[assignment]
        self.others = state["others"]  # type: ignore[assignment]
        self.reached = state["reached"]  # type: ignore[assignment]
        self.count = int(state["count"])  # type: ignore[arg-type]
        self.nonfinite = state["nonfinite"]  # type: ignore[assignment]


def _add(a: Tensor | None, b: Tensor | None) -> Tensor | None:
    if a is None:
        return b
    if b is None:
        return a
    return a + b


class TaskGradientHook:
    """What ``GradientGate._reduce_task_gradients`` runs for a ``GradSimMixin`` step.

    In order: add this micro-batch to ``accumulator`` (and stop with :class:`AccumulateOnly` unless
    ``final``); average over the micro-batches and undo the loss scale (``inv_scale``) in one
    multiply; when ``sync_global``, average the per-task shared gradients and the heads' gradients
    over the ranks in one bucketed all-reduce. If any rank saw a non-finite loss or gradient, the
    shared gradients are replaced by NaN so that the gate marks the step non-finite and leaves its
    state (cosine EMA, main-gradient EMA, counters) untouched; ``self.nonfinite`` tells the mixin.
    """

    def __init__(
        self,
        accumulator: TaskGradientAccumulator,
        final: bool,
        inv_scale: float | None = None,
        sync_global: bool = False,
        loss_nonfinite: Tensor | None = None,
        group: dist.ProcessGroup | None = None,
    ) -> None:
        self.accumulator = accumulator
        self.final = final
        self.inv_scale = inv_scale
        self.sync_global = sync_global
        self.loss_nonfinite = loss_nonfinite
        self.group = group
        self.calls = 0
        self.nonfinite: Tensor | None = None
        self.count = 0

    def __call__(self, grads: object, shared_params: list[Tensor], other_params: list[Tensor]) -> object:
        self.calls += 1
        if self.calls > 1:
            raise RuntimeError("gate.backward() was called twice in one GradSimMixin step; call it once.")
        self.accumulator.add(grads, self.loss_nonfinite)
        if not self.final:
            raise AccumulateOnly()
        shared, others, reached, count, nonfinite = self.accumulator.pop()
        self.count = count
        factor = (1.0 / count) * (self.inv_scale if self.inv_scale is not None else 1.0)
        if factor != 1.0:
            shared = [None if g is None else g * factor for g in shared]
            others = [None if g is None else g * factor for g in others]
        if self.sync_global and world_size(self.group) > 1:
            num_tasks = len(reached)
            # Every rank must send the same layout: a parameter no task reached here is a zero.
            shared = [
                torch.zeros((num_tasks,) + tuple(p.shape), dtype=p.dtype, device=p.device) if g is None else g
                for g, p in zip(shared, shared_params)
            ]
            others = [torch.zeros_like(p) if g is None else g for g, p in zip(others, other_params)]
            averaged, nonfinite = all_reduce_mean(shared + others, nonfinite=nonfinite, group=self.group)
            shared, others = averaged[: len(shared)], averaged[len(shared) :]
        else:
            # The gate itself sees non-finite shared gradients (its Gramian); check the heads here.
            present = [g for g in others if g is not None]
            if present:
                finite = torch.stack([torch.isfinite(g).all() for g in present]).all()
                nonfinite = nonfinite.to(finite.device) | ~finite
        self.nonfinite = nonfinite
        if bool(nonfinite) and not self._gate_sees_it(shared):
            # The NaN/inf is in a head's gradient or on another rank only: poison the shared
            # gradients so that the gate marks the step non-finite and leaves its state alone.
            shared = [None if g is None else torch.full_like(g, float("nan")) for g in shared]
        grads.shared, grads.others, grads.reached = shared, others, reached  # type: ignore[attr-defined]
        return grads

    def _gate_sees_it(self, shared: list[Tensor | None]) -> bool:
        # The gate checks this rank's losses and the shared gradients itself (and names the task).
        if self.loss_nonfinite is not None and bool(self.loss_nonfinite):
            return True
        return any(g is not None and not bool(torch.isfinite(g).all()) for g in shared)
