"""The two kernels of :class:`~lightning_gradsim.core.task_gradients.TaskGradients` that touch every
gradient element: the per-layer Gramian of per-task rows (dot products, no copy of the gradients) and the weighted
combination written into ``.grad`` (one multi-tensor pass per task, in place where the bundle owns
its gradients).

>>> import torch
>>> rows = [[torch.tensor([1.0, 0.0]), None], [torch.tensor([1.0, 1.0]), torch.tensor([2.0])]]
>>> rows_gram(rows, [0, 1], torch.zeros(()))
tensor([[[1., 1.],
         [1., 2.]],
<BLANKLINE>
        [[0., 0.],
         [0., 4.]]])
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from .tensor_ops import accumulate_grad, dot

if TYPE_CHECKING:
    from .task_gradients import TaskGradients

__all__ = ["rows_gram", "write_rows", "write_stacked", "apply_per_tensor", "combined_tensors"]


def write_stacked(
    grads: TaskGradients,
    params: Sequence[Tensor],
    w: Tensor,
    wd: Tensor | None,
    direction: Sequence[Tensor | None] | None,
) -> None:
    """``.grad += sum_k w_k g_k (+ w_d d)`` from stacked gradients: one ``addmv_`` per tensor."""
    for b, i in enumerate(grads.present()):
        p, s = params[i], grads.stacked[i]  # type: ignore[index]
        f = s.reshape(grads.num_tasks, -1)  # type: ignore[union-attr]
        wf = w.to(f.dtype)
        grad = p.grad
        if grad is None or not grad.is_contiguous() or grad.dtype != f.dtype:
            accumulate_grad(p, (wf @ f).view(p.shape))
        else:
            grad.view(-1).addmv_(f.mT, wf)
        d = direction[b] if direction is not None else None
        if wd is not None and d is not None:
            grad = p.grad
            assert grad is not None  # written just above
            grad.add_((d * wd.to(d.dtype)).view(p.shape).to(grad.dtype))


def combined_tensors(
    grads: TaskGradients,
    w: Tensor,
    wd: Tensor | None = None,
    direction: Sequence[Tensor | None] | None = None,
    per_tensor: bool = False,
) -> list[Tensor | None]:
    """``sum_k w_k g_k (+ w_d d)`` on every shared tensor as new tensors (``None`` where no task reaches it);
    the gradients themselves are not changed. ``per_tensor``: ``w`` is ``(L, *B, K)``, row ``b`` for the
    ``b``-th present tensor."""
    present = grads.present()
    n = len(grads.stacked if grads.stacked is not None else grads.rows[0])  # type: ignore[index]
    out: list[Tensor | None] = [None] * n
    for b, i in enumerate(present):
        wb = w[b] if per_tensor else w  # (*B, K)
        c: Tensor | None = None
        if grads.stacked is not None:
            s = grads.stacked[i]
            assert s is not None
            tail = (1,) * (s.dim() - grads.batch_dims - 1)
            c = (wb.reshape(wb.shape + tail).to(s.dtype) * s).sum(grads.batch_dims)
        else:
            assert grads.rows is not None
            for k, row in enumerate(grads.rows):
                g = row[i]
                if g is not None:
                    c = torch.mul(g, wb[k].to(g.dtype)) if c is None else c.addcmul_(g, wb[k].to(g.dtype))
        assert c is not None
        d = direction[b] if direction is not None else None
        if wd is not None and d is not None and grads.stacked is not None:
            c = c + wd.reshape(wd.shape + (1,) * (c.dim() - wd.dim())).to(c.dtype) * d.to(c.dtype)
        elif wd is not None and d is not None:
            c.addcmul_(d.view(c.shape).to(c.dtype), wd.to(c.dtype))
        out[i] = c
    return out


def apply_per_tensor(grads: TaskGradients, weights: Tensor, into: Sequence[Tensor] | None) -> list[Tensor | None]:
    """``sum_k w[l, k] g_k`` on each present tensor ``l`` with its own row of ``weights`` (``(L, *B, K)``):
    accumulated into the ``.grad`` of ``into`` (the shared parameters; ``[]`` returned), or returned as new
    tensors (``None`` where no task reaches a tensor)."""
    out = combined_tensors(grads, weights, per_tensor=True)
    if into is None:
        return out
    for p, c in zip(into, out):
        if c is not None:
            accumulate_grad(p, c.view(p.shape))
    return []


def write_rows(
    grads: TaskGradients,
    params: Sequence[Tensor],
    w: Tensor,
    wd: Tensor | None,
    direction: Sequence[Tensor | None] | None,
) -> None:
    """``.grad += sum_k w_k g_k (+ w_d d)`` from per-task rows: per task, one multi-tensor pass.

    Where ``.grad`` is ``None`` it starts as ``w_0 g_0`` (the first task reaching the tensor): built
    in place in that gradient when the bundle owns it (:attr:`TaskGradients.owned`), else in a new
    tensor; when ``w_0`` is known to be 1 without a device sync (CPU weights), the product is
    skipped (``g * 1 == g`` exactly), so a two-task step writes ``.grad`` in one pass, as a second
    ``backward`` accumulating into it does.
    """
    num_tasks, rows = grads.num_tasks, grads.rows
    assert rows is not None
    targets: list[list[Tensor]] = [[] for _ in range(num_tasks + 1)]
    sources: list[list[Tensor]] = [[] for _ in range(num_tasks + 1)]
    firsts: list[list[tuple[Tensor, Tensor]]] = [[] for _ in range(num_tasks)]  # (param, g) that start .grad
    cast: dict[tuple[int, torch.dtype], Tensor] = {}

    def coef(k: int, dtype: torch.dtype) -> Tensor:
        c = cast.get((k, dtype))
        if c is None:
            c = cast[(k, dtype)] = (w[k] if k < num_tasks else wd).to(dtype)  # type: ignore[union-attr]
        return c

    inplace = _owned_tensors(grads, params) if grads.owned else set()
    for b, i in enumerate(grads.present()):
        p = params[i]
        col = [(k, g) for k, g in enumerate(r[i] for r in rows) if g is not None]
        start = 0
        grad = p.grad
        if grad is None:
            k0, g0 = col[0]
            firsts[k0].append((p, g0))
            grad = g0 if id(g0) in inplace else None
            start = 1
        for k, g in col[start:]:
            if grad is None:  # .grad = w_0 g_0 + w_k g_k in one new tensor (below)
                k0, g0 = col[0]
                grad = _start_grad(p, g0, coef(k0, g0.dtype), g, coef(k, p.dtype))
                firsts[k0].pop()
                continue
            targets[k].append(grad)
            sources[k].append(g if g.dtype == grad.dtype else g.to(grad.dtype))
        if grad is None:  # one task only, not owned
            k0, g0 = col[0]
            grad = torch.mul(g0, coef(k0, g0.dtype)).to(p.dtype)
            firsts[k0].pop()
            p.grad = grad
        d = direction[b] if direction is not None else None
        if wd is not None and d is not None:
            targets[num_tasks].append(grad)
            sources[num_tasks].append(d.view(p.shape).to(grad.dtype))
    for k, pairs in enumerate(firsts):  # owned first rows: scale in place (one pass), become .grad
        if pairs:
            gs = [g for _, g in pairs]
            if not _is_one(w[k]):
                torch._foreach_mul_(gs, coef(k, gs[0].dtype))
            for p, g in pairs:
                p.grad = g
    for k, (t, src) in enumerate(zip(targets, sources)):
        if t:
            torch._foreach_addcmul_(t, src, [coef(k, x.dtype) for x in t])


def _start_grad(p: Tensor, g0: Tensor, c0: Tensor, g1: Tensor, c1: Tensor) -> Tensor:
    """``p.grad = c0 g0 + c1 g1`` in one new tensor (one pass when ``c0`` is known to be 1)."""
    first = g0 if _is_one(c0) else torch.mul(g0, c0)
    grad = torch.addcmul(first.to(p.dtype), g1.to(p.dtype), c1)
    p.grad = grad
    return grad


def _is_one(c: Tensor) -> bool:
    """Whether the 0-d weight ``c`` is exactly 1, when reading it costs no device sync (CPU only)."""
    return c.device.type == "cpu" and bool(c == 1)


def _owned_tensors(grads: TaskGradients, params: Sequence[Tensor]) -> set[int]:
    """``id``s of the first task's gradients that may become ``.grad`` in place: contiguous, of the
    parameter's dtype, device and shape, and sharing memory with no other gradient or parameter
    (autograd may hand one tensor to several inputs, or an expanded one)."""
    rows = grads.rows
    assert rows is not None
    seen: dict[int, int] = {}
    tensors = [g for row in rows for g in row if g is not None] + [g for g in grads.others if g is not None]
    for t in tensors:
        ptr = t.untyped_storage().data_ptr()
        seen[ptr] = seen.get(ptr, 0) + 1
    for p in list(params) + list(grads.other_params or []):
        ptr = p.untyped_storage().data_ptr()
        seen[ptr] = seen.get(ptr, 0) + 1
    out: set[int] = set()
    for i in grads.present():
        p = params[i]
        g = next((r[i] for r in rows if r[i] is not None), None)
        if (
            g is not None
            and p.grad is None
            and g.is_contiguous()
            and g.dtype == p.dtype
            and g.device == p.device
            and g.shape == p.shape
            and not g.requires_grad
            and seen[g.untyped_storage().data_ptr()] == 1
            and g.untyped_storage().nbytes() == g.numel() * g.element_size()
        ):
            out.add(id(g))
    return out


def rows_gram(rows: list[list[Tensor | None]], present: list[int], zero: Tensor) -> Tensor:
    """Per-layer ``(L, K, K)`` Gramian of per-task rows (``None``: the task does not reach the tensor),
    over the ``present`` tensors, in ``zero``'s dtype: one dot product per pair of tasks and tensor, on
    the gradients as they are (no stacked copy, no temporary)."""
    k, n = len(rows), len(present)
    entries: list[list[Tensor]] = [[zero.expand(n)] * k for _ in range(k)]
    for a in range(k):
        idx = [j for j, i in enumerate(present) if rows[a][i] is not None]
        for b in range(a, k):
            both = [j for j in idx if rows[b][present[j]] is not None]
            if both:
                pairs = [(rows[a][present[j]], rows[b][present[j]]) for j in both]
                dots = torch.stack([dot(x, y).to(zero.dtype) for x, y in pairs])  # type: ignore[arg-type]
                entries[a][b] = entries[b][a] = _scatter(dots, both, n, zero)
    return torch.stack([torch.stack(row, dim=-1) for row in entries], dim=-2)


def _scatter(values: Tensor, idx: list[int], n: int, zero: Tensor) -> Tensor:
    """``values`` at positions ``idx`` of a length-``n`` vector of zeros (``values`` itself when dense)."""
    if len(idx) == n:
        return values
    out = zero.new_zeros(n)
    out[torch.tensor(idx, device=zero.device)] = values
    return out
