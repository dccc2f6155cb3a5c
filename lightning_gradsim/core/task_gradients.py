"""``TaskGradients``: the per-task gradients of one step, their per-layer Gramian, and their combination.

However they were obtained (one ``autograd.grad`` per task, one vmap-batched backward, vectors
given to :meth:`GradientGate.combine`, gradients of marked features), the gate sees the per-task
gradients through this one class, in one of two layouts (whichever was cheapest to get):
``stacked[i]``, a ``(*B, K, *shape)`` tensor per shared tensor ``i`` (``B``: batch dimensions of
independent problems, :meth:`GradientGate.combine` only), or ``rows[k][i]``, task ``k``'s gradient
on tensor ``i`` (per-task backward: nothing stacked or copied); ``None`` where nothing reaches.
It owns the two operations on them: :meth:`TaskGradients.gramian` (per layer, ``(L, *B, V, V)``)
and :meth:`TaskGradients.apply` (``sum_k w_k g_k (+ w_d d)``, into ``.grad`` or returned: the
only place where weights meet gradients). It also carries what the gradient transforms
(:mod:`lightning_gradsim.core.transforms`) work on with them: the heads' summed gradients, the loss
values (when a loss weighting needs them) and a device-side ``finite`` flag.

>>> import torch
>>> g = TaskGradients(stacked=[torch.tensor([[1.0, 0.0], [1.0, 1.0]])])
>>> g.gramian()
tensor([[[1., 1.],
         [1., 2.]]])
>>> g.apply(torch.tensor([1.0, 0.5]))
[tensor([1.5000, 0.5000])]
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from .task_kernels import apply_per_tensor, combined_tensors, rows_gram, write_rows, write_stacked
from .tensor_ops import accumulate_grad, add_optional, all_finite, and_optional, dot, grad_norms, stat_dtype

__all__ = ["TaskGradients", "PerTaskGradients", "accumulate_grad", "stat_dtype", "grad_norms", "all_finite"]


class TaskGradients:
    """Per-task gradients on the shared tensors, summed gradients on the others (see the module doc).

    Attributes:
        stacked / rows: the per-task gradients on the shared tensors (exactly one is set).
        others: per other parameter (task heads), the sum over tasks of their gradients, or ``None``.
        reached: per task, whether its loss reaches a shared tensor.
        strategy: how they were obtained (``"separate"``, ``"batched"``, ``"sequential"``,
            ``"features"``, ``"given"``).
        batch_dims: leading dimensions of independent problems (``stacked`` only).
        finite: ``None`` or a bool tensor: ``False`` when a loss or a transform saw a NaN/inf.
        losses: ``None`` or the ``(K,)`` loss values (reduced along with the gradients).
        params / other_params: the tensors the gradients belong to (``.grad`` is written there).
        owned: the ``rows`` are fresh autograd outputs no one else holds: :meth:`apply` may write ``.grad`` in them.
    """

    __slots__ = (
        "stacked",
        "rows",
        "others",
        "reached",
        "strategy",
        "batch_dims",
        "finite",
        "losses",
        "params",
        "other_params",
        "owned",
        "_present",
    )

    def __init__(
        self,
        stacked: list[Tensor | None] | None = None,
        rows: list[list[Tensor | None]] | None = None,
        others: list[Tensor | None] | None = None,
        reached: list[bool] | None = None,
        strategy: str = "given",
        *,
        batch_dims: int = 0,
        finite: Tensor | None = None,
        losses: Tensor | None = None,
        params: Sequence[Tensor] | None = None,
        other_params: Sequence[Tensor] | None = None,
        owned: bool = False,
    ) -> None:
        if (stacked is None) == (rows is None):
            raise ValueError("TaskGradients takes exactly one of stacked= and rows=.")
        self.stacked = stacked
        self.rows = rows
        self.others: list[Tensor | None] = list(others) if others is not None else []
        if reached is None:  # every task (the number of rows, or of stacked vectors)
            first = rows if rows is not None else next(s for s in stacked if s is not None)  # type: ignore[union-attr]
            reached = [True] * (len(first) if rows is not None else first.shape[batch_dims])  # type: ignore[union-attr]
        self.reached = list(reached)
        self.strategy = strategy
        self.batch_dims = batch_dims
        self.finite = finite
        self.losses = losses
        self.params = list(params) if params is not None else None
        self.other_params = list(other_params) if other_params is not None else None
        self.owned = bool(owned)
        self._present: list[int] | None = None

    # ------------------------------------------------------------------ shape
    @property
    def num_tasks(self) -> int:
        return len(self.reached)

    @property
    def batch_shape(self) -> tuple[int, ...]:
        if self.stacked is None:
            return ()
        ref = next(s for s in self.stacked if s is not None)
        return tuple(ref.shape[: self.batch_dims])

    def present(self) -> list[int]:
        """Indices of the shared tensors that at least one task reaches."""
        if self._present is None:
            if self.stacked is not None:
                self._present = [i for i, s in enumerate(self.stacked) if s is not None]
            else:
                assert self.rows is not None
                n = len(self.rows[0]) if self.rows else 0
                self._present = [i for i in range(n) if any(r[i] is not None for r in self.rows)]
        return self._present

    def main(self, k: int = 0) -> list[Tensor]:
        """The main task's (or task ``k``'s) gradient on every present tensor (zeros where it does not reach one)."""
        if self.stacked is not None:
            return [self.stacked[i].select(self.batch_dims, k) for i in self.present()]  # type: ignore[union-attr]
        assert self.rows is not None
        out = []
        for i in self.present():
            g = self.rows[k][i]
            out.append(g if g is not None else torch.zeros_like(next(r[i] for r in self.rows if r[i] is not None)))  # type: ignore[arg-type]
        return out

    # ------------------------------------------------------------------ Gramian
    def gramian(self, direction: Sequence[Tensor] | None = None) -> Tensor:
        """Per-layer Gramian ``(L, *B, V, V)`` over the present tensors (float32 for half gradients).

        ``V = K``, or ``K + 1`` with ``direction`` (one tensor per present tensor) as the last vector.
        """
        present = self.present()
        if not present:
            raise ValueError("No task reaches any shared tensor: there is no Gramian to take.")
        if self.stacked is not None:
            shape = self.batch_shape + (self.num_tasks, -1)
            flats = [self.stacked[i].reshape(shape) for i in present]  # type: ignore[union-attr]  # views
            dt = stat_dtype(flats[0].dtype)
            gram = torch.stack([(f @ f.mT).to(dt) for f in flats])
            if direction is None:
                return gram
            cols = [d.reshape(self.batch_shape + (-1, 1)) for d in direction]
            cross = torch.stack([(f @ c.to(f.dtype)).squeeze(-1).to(dt) for f, c in zip(flats, cols)])
            dd = torch.stack([(c.mT @ c).reshape(self.batch_shape).to(dt) for c in cols])
            return _extend(gram, cross, dd)
        assert self.rows is not None
        rows = self.rows
        ref = next(r[present[0]] for r in rows if r[present[0]] is not None)
        zero = torch.zeros((), dtype=stat_dtype(ref.dtype), device=ref.device)  # type: ignore[union-attr]
        gram = rows_gram(rows, present, zero)
        if direction is None:
            return gram
        cross = torch.stack(
            [
                torch.stack([zero if g is None else dot(g, d).to(zero.dtype) for g in (r[i] for r in rows)])
                for i, d in zip(present, direction)
            ]
        )
        dd = torch.stack([dot(d, d).to(zero.dtype) for d in direction])
        return _extend(gram, cross, dd)

    # ------------------------------------------------------------------ combination
    def apply(
        self,
        weights: Tensor,
        direction: Sequence[Tensor | None] | None = None,
        into: Sequence[Tensor] | None = None,
        per_tensor: bool = False,
    ) -> list[Tensor | None]:
        """``sum_k w_k g_k (+ w_d d)`` on every shared tensor: the only place weights meet gradients.

        ``weights``: ``(*B, K)`` or ``(*B, K + 1)`` (last: the direction's coefficient). With
        ``direction=None`` the direction is the main gradient itself (its coefficient is folded into
        ``w_0``); otherwise one tensor (or ``None``: no direction there) per present tensor. With
        ``into`` (the shared parameters), the combination is accumulated into their
        ``.grad`` in place (and ``[]`` returned); otherwise one new tensor per shared tensor is
        returned (``None`` where no task reaches it). ``per_tensor``: ``weights`` is ``(L, *B, K)``, a row per
        present tensor (no direction).
        """
        num_tasks = self.num_tasks
        if per_tensor:
            return apply_per_tensor(self, weights, into)
        w, wd = _split_weights(weights, num_tasks, direction is None)
        if into is not None:
            (write_stacked if self.stacked is not None else write_rows)(self, into, w, wd, direction)
            return []
        return combined_tensors(self, w, wd, direction)

    def write_others(self) -> None:
        """Accumulate the heads' summed gradients into their ``.grad``."""
        assert self.other_params is not None
        for p, g in zip(self.other_params, self.others):
            if g is not None:
                accumulate_grad(p, g)

    def others_norms(self) -> Tensor | None:
        """The heads' gradient norms as one vector (for one finiteness check with the rest), or ``None``."""
        return grad_norms([g for g in self.others if g is not None])

    # ------------------------------------------------------------------ for transforms
    def map(self, fn: Callable[[Tensor], Tensor]) -> None:
        """Replace every gradient (and ``losses``) by ``fn(tensor)``, in this bundle."""
        if self.stacked is not None:
            self.stacked = [None if s is None else fn(s) for s in self.stacked]
        else:
            self.rows = [[None if g is None else fn(g) for g in row] for row in self.rows]  # type: ignore[union-attr]
        self.others = [None if g is None else fn(g) for g in self.others]
        if self.losses is not None:
            self.losses = fn(self.losses)
        self.owned = False

    def add(self, other: TaskGradients) -> None:
        """Add ``other`` (same tensors, any layout) into this bundle (accumulation over micro-batches)."""
        n_self = len(self.stacked) if self.stacked is not None else len(self.rows[0])  # type: ignore[index]
        n_other = len(other.stacked) if other.stacked is not None else len(other.rows[0])  # type: ignore[index]
        if n_self != n_other or len(self.others) != len(other.others) or self.num_tasks != other.num_tasks:
            raise ValueError(
                "The parameters given to the gate changed between accumulated micro-batches "
                f"({n_self}+{len(self.others)} before, {n_other}+{len(other.others)} now): "
                "shared_parameters() and the other parameters must be the same on every micro-batch."
            )
        if self.stacked is not None and other.stacked is not None:
            self.stacked = [add_optional(a, b) for a, b in zip(self.stacked, other.stacked)]
        else:
            # Rows as soon as one side has rows (views of the stacks: the same numbers, and the same
            # arithmetic downstream whether or not the window was restored from a checkpoint).
            mine, theirs = self.to_rows().rows, other.to_rows().rows
            self.stacked = None
            self.rows = [[add_optional(a, b) for a, b in zip(ra, rb)] for ra, rb in zip(mine, theirs)]  # type: ignore[arg-type]
        self.others = [add_optional(a, b) for a, b in zip(self.others, other.others)]
        self.reached = [a or b for a, b in zip(self.reached, other.reached)]
        self.finite = and_optional(self.finite, other.finite)
        self.losses = add_optional(self.losses, other.losses)
        self.owned = False
        self._present = None

    def flat(self) -> list[Tensor]:
        """Every gradient (zeros where not reached), shared tensor by task, heads, losses: what a rank all-reduces."""
        assert self.params is not None and self.other_params is not None
        out: list[Tensor] = []
        num_tasks = self.num_tasks
        for i, p in enumerate(self.params):
            if self.stacked is not None:
                s = self.stacked[i]
                out.append(s if s is not None else p.new_zeros((num_tasks,) + tuple(p.shape)))
            else:
                out.extend(g if g is not None else torch.zeros_like(p) for g in (r[i] for r in self.rows))  # type: ignore[union-attr]
        out.extend(g if g is not None else torch.zeros_like(p) for g, p in zip(self.others, self.other_params))
        if self.losses is not None:
            out.append(self.losses)
        return out

    def unflat(self, tensors: Sequence[Tensor]) -> None:
        """Take back the tensors of :meth:`flat` (e.g. all-reduced), in the same order."""
        it = iter(tensors)
        assert self.params is not None
        if self.stacked is not None:
            self.stacked = [next(it) for _ in self.params]
        else:
            per_param = [[next(it) for _ in range(self.num_tasks)] for _ in self.params]
            self.rows = [[col[k] for col in per_param] for k in range(self.num_tasks)]
        self.others = [next(it) for _ in self.others]
        if self.losses is not None:
            self.losses = next(it)
        self.owned = False
        self._present = None

    def to_stacked(self) -> TaskGradients:
        """This bundle in the stacked layout (copies rows into ``(K, *shape)`` stacks)."""
        if self.stacked is not None:
            return self
        stacked: list[Tensor | None] = []
        for col in zip(*self.rows):  # type: ignore[misc]
            ref = next((c for c in col if c is not None), None)
            stacked.append(
                None if ref is None else torch.stack([c if c is not None else torch.zeros_like(ref) for c in col])
            )
        return self._like(stacked=stacked)

    def to_rows(self) -> TaskGradients:
        """This bundle in the rows layout (views of the stacks)."""
        if self.rows is not None:
            return self
        rows = [[None if s is None else s[k] for s in self.stacked] for k in range(self.num_tasks)]  # type: ignore[union-attr]
        return self._like(rows=rows)

    def _like(self, **layout: Any) -> TaskGradients:
        return TaskGradients(
            **layout,
            others=self.others,
            reached=self.reached,
            strategy=self.strategy,
            batch_dims=self.batch_dims,
            finite=self.finite,
            losses=self.losses,
            params=self.params,
            other_params=self.other_params,
        )

    @property
    def shared(self) -> list[Tensor | None]:
        """The stacked ``(K, *shape)`` per-task gradients of every shared tensor (stacks rows if needed)."""
        return self.to_stacked().stacked  # type: ignore[return-value]

    def to_task_gradients(self, shared: Sequence[Tensor] | None = None) -> TaskGradients:
        """The stacked layout (kept for callers of the former ``PerTaskGradients``)."""
        return self.to_stacked()


#: The former name of :class:`TaskGradients` (one class now serves both layouts).
PerTaskGradients = TaskGradients


def _extend(gram: Tensor, cross: Tensor, dd: Tensor) -> Tensor:
    top = torch.cat([gram, cross.unsqueeze(-1)], dim=-1)
    bottom = torch.cat([cross, dd.unsqueeze(-1)], dim=-1).unsqueeze(-2)
    return torch.cat([top, bottom], dim=-2)


def _split_weights(weights: Tensor, num_tasks: int, direction_is_main: bool) -> tuple[Tensor, Tensor | None]:
    """Task weights ``(*B, K)`` and the direction weight (``None`` when folded into the main one)."""
    w = weights[..., :num_tasks]
    if weights.shape[-1] <= num_tasks:
        return w, None
    if direction_is_main:
        return torch.cat([w[..., :1] + weights[..., num_tasks:], w[..., 1:]], dim=-1), None
    return w, weights[..., num_tasks]
