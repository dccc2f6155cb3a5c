"""Small helpers on tensors and lists of tensors that the gradient layout and the paths share.

>>> import torch
>>> from lightning_gradsim.core.tensor_ops import all_finite, grad_norms
>>> grad_norms([torch.tensor([3.0, 4.0]), torch.tensor([1.0])])
tensor([5., 1.])
>>> bool(all_finite([torch.tensor([1.0, float("inf")])]))
False
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = [
    "is_dtensor",
    "stat_dtype",
    "accumulate_grad",
    "grad_norms",
    "all_finite",
    "dot",
    "add_optional",
    "and_optional",
]


def stat_dtype(dtype: torch.dtype) -> torch.dtype:
    """Gramians and cosines of half-precision gradients are kept in float32."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def accumulate_grad(p: Tensor, g: Tensor) -> None:
    """``p.grad += g`` like autograd does (``g`` becomes ``p.grad`` when there is none)."""
    g = g.to(p.dtype)
    if p.grad is None:
        p.grad = g.detach().clone() if g.data_ptr() == p.data_ptr() else g.detach()
    else:
        p.grad.add_(g.detach())


def grad_norms(tensors: Sequence[Tensor]) -> Tensor | None:
    """The L2 norms of ``tensors`` as one vector (one fused kernel where torch has it; float32 for half
    precision), or ``None``.

    NaN/inf propagate into them; like the Gramian, a squared norm that overflows (an element above
    ~1e19) counts as non-finite.
    """
    if not tensors:
        return None
    tensors = list(tensors)
    if not any(t.dtype in (torch.float16, torch.bfloat16) for t in tensors):
        return torch.stack(torch._foreach_norm(tensors, 2.0))
    norms: Sequence[Tensor]
    try:  # half precision: accumulate and return the norms in float32 (no overflow at 65504)
        norms = torch._foreach_norm(tensors, 2.0, dtype=torch.float32)
    except (TypeError, RuntimeError):  # older torch: no dtype argument
        norms = [t.float().norm() for t in tensors]
    return torch.stack(norms)


def all_finite(tensors: Sequence[Tensor], values: Tensor | None = None) -> Tensor | None:
    """One bool tensor: whether every element of ``tensors`` (and of ``values``) is finite; ``None``
    when there is nothing to check. A handful of kernels whatever the number of tensors."""
    parts = [t for t in (grad_norms(tensors), values) if t is not None]
    if not parts:
        return None
    return torch.isfinite(torch.cat([t.reshape(-1).to(torch.float32) for t in parts])).all()


def dot(a: Tensor, b: Tensor) -> Tensor:
    a = a.reshape(-1)
    b = b.reshape(-1)
    if a.dtype != b.dtype:
        a, b = a.float(), b.float()
    return torch.dot(a, b)


def add_optional(a: Tensor | None, b: Tensor | None) -> Tensor | None:
    if a is None:
        return b
    if b is None:
        return a
    return a + b


def and_optional(a: Tensor | None, b: Tensor | None) -> Tensor | None:
    if a is None:
        return b
    if b is None:
        return a
    return a & b.to(a.device)


def _dtensor_class() -> type | None:
    """DTensor's class if torch.distributed.tensor was imported (nothing can be a DTensor otherwise)."""
    for name in ("torch.distributed.tensor", "torch.distributed._tensor"):
        cls = getattr(sys.modules.get(name), "DTensor", None)
        if cls is not None:
            return cls
    return None


def is_dtensor(t: object) -> bool:
    """Whether ``t`` is a DTensor (e.g. a parameter sharded by ``fully_shard``), without importing DTensor."""
    cls = _dtensor_class()
    return cls is not None and isinstance(t, cls)
