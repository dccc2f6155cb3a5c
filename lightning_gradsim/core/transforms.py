"""Gradient transforms: what happens to the gradients between autograd and the rule, as explicit objects.

The gate's step, with the three places a transform can act (see ``docs/architecture.md``)::

    per-task gradients (autograd)                         TaskGradients, this rank's, this micro-batch's
      -> transform.task_gradients(grads) -> status          accumulate / unscale / all-reduce / reduce-scatter
    local per-layer Gramian (L, K, K)                     from whatever gradients the bundle now holds
      -> transform.gramian(gram) -> gram                    e.g. all-reduce (sum) the Gramian of local shards
    rule: Gramian -> weights                              the seam: a rule never sees gradients
      -> transform.agree(finite) -> finite                  e.g. a NaN on another rank (before any state moves)
    state update
    apply weights to the (possibly sharded) gradients     TaskGradients.apply, into .grad
      -> transform.combined(params, others, finite)         e.g. all-gather the combined shards

``task_gradients`` returns a status: ``"pending"`` (the gradients were kept, e.g. an accumulation
window is not complete: the gate stops, writes nothing and returns ``None``), ``"ready"`` (go on),
or ``"non-finite"`` (the transform knows, on the host, that the step is bad: the gate skips the rule,
writes nothing and counts the step as skipped). A NaN/inf only known on the device (another rank's,
a head's) goes into ``grads.finite`` without a host sync; the gate and the mixin read it once.

:class:`~lightning_gradsim.GradSimMixin` builds the pipeline of each step from its settings
(``gradsim_accumulate_grad_batches``, a GradScaler, ``gradsim_sync`` under DDP) and hands it to
the gate: ``gate.backward(..., transforms=...)``. The same works without Lightning:

>>> import torch
>>> from lightning_gradsim import GradientGate
>>> w = torch.nn.Parameter(torch.tensor([1.0, 0.0]))
>>> gate, acc = GradientGate(rule="sum"), Accumulate()
>>> for final, scale in ((False, 4.0), (True, 4.0)):   # a window of two micro-batches, losses scaled by 4
...     acc.final = final
...     stats = gate.backward(scale * (w * w).sum(), [scale * w.sum()], [w], transforms=[acc, Unscale(1 / scale)])
>>> w.grad  # the mean over the window of grad(|w|^2) + grad(sum w), unscaled
tensor([3., 1.])
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, Literal

from torch import Tensor

from .task_gradients import TaskGradients

__all__ = [
    "Status",
    "PENDING",
    "READY",
    "NON_FINITE",
    "GradientTransform",
    "Transforms",
    "Accumulate",
    "Unscale",
    "as_transforms",
]

Status = Literal["pending", "ready", "non-finite"]
PENDING: Status = "pending"
READY: Status = "ready"
NON_FINITE: Status = "non-finite"


class GradientTransform:
    """Base class of gradient transforms; every hook is optional (the defaults change nothing).

    ``needs_task_gradients``: whether the transform acts on the per-task gradients
    (:meth:`task_gradients` or :meth:`gramian`), which only the gate's parameter path has
    (``similarity="features"`` and the reused steps of ``every_n_steps`` take no per-task
    parameter gradients; the gate refuses such transforms there).
    """

    #: whether the transform acts on the per-task gradients (see above).
    needs_task_gradients: bool = True
    #: whether the transform takes parameter gradients that are DTensor shards (FSDP2's ``.grad``) to local
    #: tensors and reduces the Gramian over the shards (the gate refuses DTensor parameters without one).
    handles_dtensor_shards: bool = False

    def task_ready(self, k: int, num_tasks: int, row: Sequence[Tensor | None], params: Sequence[Tensor]) -> None:
        """Task ``k``'s gradient on ``params`` (``None`` where it reaches nothing) as soon as autograd has it,
        before the next task's backward: a transform may start communicating it (overlap). Only the first
        transform of a pipeline is told, and only by the one-task-at-a-time strategies; it still gets the
        whole bundle in :meth:`task_gradients`."""

    def task_gradients(self, grads: TaskGradients) -> Status:
        """Transform ``grads`` in place (their tensors, ``finite``, ``losses``) and say how to go on."""
        return READY

    def gramian(self, gram: Tensor) -> Tensor:
        """Return the per-layer Gramian ``(L, *B, V, V)`` to decide on (e.g. summed over shards)."""
        return gram

    def agree(self, finite: Tensor) -> Tensor:
        """The step's finiteness as this rank decided it (``(*B,)`` bool: the Gramian, the weights, the losses,
        the heads), just before the gate commits its state: return it as every rank must take it (e.g.
        ``False`` where another rank saw a NaN), so that a step skipped anywhere changes no state anywhere."""
        return finite

    def combined(self, params: Sequence[Tensor], others: Sequence[Tensor], finite: Tensor) -> Tensor:
        """After the gate wrote ``.grad`` of ``params`` (shared) and ``others`` (heads): return the step's
        finiteness (a bool tensor; ``finite`` as given unless, e.g., another rank saw a NaN)."""
        return finite


class Transforms:
    """An ordered pipeline of :class:`GradientTransform` for one step (what ``gate.backward`` takes).

    ``calls`` counts the ``gate.backward`` calls that used it (the mixin checks it is one).

    >>> Transforms([Unscale(0.5)]).needs_task_gradients, bool(Transforms())
    (True, False)
    """

    def __init__(self, transforms: Iterable[GradientTransform] = ()) -> None:
        self.items = list(transforms)
        for t in self.items:
            if not isinstance(t, GradientTransform):
                raise TypeError(f"transforms must be GradientTransform objects, got {type(t).__name__}.")
        self.calls = 0

    def __bool__(self) -> bool:
        return bool(self.items)

    def __repr__(self) -> str:
        return f"Transforms({self.items!r})"

    @property
    def needs_task_gradients(self) -> bool:
        return any(t.needs_task_gradients for t in self.items)

    def task_ready(self, k: int, num_tasks: int, row: Sequence[Tensor | None], params: Sequence[Tensor]) -> None:
        if self.items:  # later transforms see the gradients only after the earlier ones changed them
            self.items[0].task_ready(k, num_tasks, row, params)

    def task_gradients(self, grads: TaskGradients) -> Status:
        for t in self.items:
            status = t.task_gradients(grads)
            if status not in (PENDING, READY, NON_FINITE):
                raise ValueError(f"{type(t).__name__}.task_gradients() returned {status!r}, not a Status.")
            if status != READY:
                return status
        return READY

    def gramian(self, gram: Tensor) -> Tensor:
        for t in self.items:
            gram = t.gramian(gram)
        return gram

    def agree(self, finite: Tensor) -> Tensor:
        for t in self.items:
            finite = t.agree(finite)
        return finite

    def combined(self, params: Sequence[Tensor], others: Sequence[Tensor], finite: Tensor) -> Tensor:
        for t in self.items:
            finite = t.combined(params, others, finite)
        return finite


def as_transforms(transforms: Transforms | Iterable[GradientTransform] | None) -> Transforms:
    """A :class:`Transforms` from ``None``, a list of transforms or a pipeline (returned as is)."""
    if isinstance(transforms, Transforms):
        return transforms
    return Transforms(() if transforms is None else transforms)


class Accumulate(GradientTransform):
    """Sum the per-task gradients over the micro-batches of a window; ``"pending"`` until ``final``.

    Set ``final`` before each micro-batch (``True`` on the last one of the window); on it the
    bundle becomes the window's mean (and its finiteness the AND over the window). The running
    sums are kept here between steps (:meth:`state_dict` for a mid-window checkpoint).

    >>> import torch
    >>> acc = Accumulate()
    >>> acc.final = False
    >>> acc.task_gradients(TaskGradients(rows=[[torch.ones(2)]], others=[]))
    'pending'
    >>> acc.final = True
    >>> g = TaskGradients(rows=[[3 * torch.ones(2)]], others=[])
    >>> acc.task_gradients(g), g.rows
    ('ready', [[tensor([2., 2.])]])
    """

    def __init__(self) -> None:
        self.final = True
        self.sums: TaskGradients | None = None
        self.count = 0

    def task_gradients(self, grads: TaskGradients) -> Status:
        if self.sums is None:
            self.sums = (
                grads._like(stacked=grads.stacked) if grads.stacked is not None else grads._like(rows=grads.rows)
            )
        else:
            self.sums.add(grads)
        self.count += 1
        if not self.final:
            return PENDING
        total, count = self.sums, self.count
        self.sums, self.count = None, 0
        if count > 1:
            inv = 1.0 / count
            total.map(lambda t: t * inv)
        grads.stacked, grads.rows, grads.others = total.stacked, total.rows, total.others
        grads.reached, grads.finite, grads.losses = total.reached, total.finite, total.losses
        grads._present = None
        return READY

    def state_dict(self) -> dict[str, Any]:
        """The window so far, stacked (``{}`` when empty); keys as the former ``TaskGradientAccumulator``'s."""
        if self.sums is None:
            return {}
        sums = self.sums.to_stacked()
        return {
            "shared": sums.stacked,
            "others": sums.others,
            "reached": sums.reached,
            "count": self.count,
            "nonfinite": None if sums.finite is None else ~sums.finite,
            "losses": sums.losses,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not state or not int(state.get("count", 0)):
            self.sums, self.count = None, 0
            return
        nonfinite = state.get("nonfinite")
        self.sums = TaskGradients(
            stacked=list(state["shared"]),
            others=list(state["others"]),
            reached=list(state["reached"]),
            finite=None if nonfinite is None else ~nonfinite,
            losses=state.get("losses"),
        )
        self.count = int(state["count"])


class Unscale(GradientTransform):
    """Multiply the per-task gradients (and losses) by ``inv_scale``: undo a GradScaler's loss scale.

    >>> import torch
    >>> g = TaskGradients(rows=[[torch.full((2,), 1024.0)]], others=[])
    >>> Unscale(1 / 1024).task_gradients(g), g.rows
    ('ready', [[tensor([1., 1.])]])
    """

    def __init__(self, inv_scale: float) -> None:
        self.inv_scale = float(inv_scale)

    def task_gradients(self, grads: TaskGradients) -> Status:
        inv = self.inv_scale
        if inv != 1.0:
            grads.map(lambda t: t * inv)
        return READY

    def __repr__(self) -> str:
        return f"Unscale({self.inv_scale!r})"
