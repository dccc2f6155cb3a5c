"""PCGrad (Yu et al., 2020, *Gradient Surgery for Multi-Task Learning*) as a gate rule.

Each task's gradient is projected onto the normal plane of every *other* task's (original)
gradient it conflicts with (negative dot product), visiting the others in a random order drawn
per task and per step, and the projected gradients are summed. Every projection is a linear
combination of the original task gradients, so the rule works on their Gramian alone (as
torchjd's ``PCGradWeighting`` does) and returns one coefficient per task gradient.

With a main task and auxiliary tasks the *main gradient is projected too*: unlike the cosine
rules (``unweighted``, ``weighted``, ``projection``), PCGrad gives up the guarantee
``g . g_main >= |g_main|^2`` (``keeps_main_descent()`` is ``False`` whatever the options).

>>> import torch
>>> from lightning_gradsim import GradientGate
>>> GradientGate(rule="pcgrad", seed=0).combine(torch.tensor([1.0, 0.0]), [torch.tensor([-1.0, 1.0])])[0]
tensor([0.5000, 1.5000])
"""

from __future__ import annotations

import torch
from torch import Tensor

from .base import Rule, RuleInput, register_rule

__all__ = ["PCGrad", "pcgrad_coefficients", "draw_pcgrad_orders"]


def draw_pcgrad_orders(
    batch_shape: tuple[int, ...],
    num_tasks: int,
    generator: torch.Generator | None = None,
    problem_generators: tuple[torch.Generator, ...] | None = None,
) -> Tensor:
    """Random visiting orders, ``(*batch_shape, K, K)`` long: row ``i`` is a permutation of the tasks.

    Drawn on the CPU from ``generator`` (the gate's seeded generator), one permutation per task and
    per independent problem; with ``problem_generators`` (keyed problems) each problem's from its own.
    """
    shape = (num_tasks, num_tasks)
    if problem_generators is None:
        keys = torch.rand(tuple(batch_shape) + shape, generator=generator)
    else:
        keys = torch.stack([torch.rand(shape, generator=g) for g in problem_generators]).reshape(batch_shape + shape)
    return keys.argsort(dim=-1)


def pcgrad_coefficients(gramian: Tensor, orders: Tensor) -> Tensor:
    """Coefficients ``C`` with ``C[..., i, :] @ [g_1..g_K]`` = task ``i``'s PCGrad-projected gradient.

    Args:
        gramian: ``(..., K, K)`` dot products of the task gradients.
        orders: ``(..., K, K)`` integer; row ``i`` is the order in which task ``i`` is projected
            against the other tasks (entries equal to ``i`` are skipped).

    Task ``i``'s vector starts as ``g_i``; for each ``j`` in its order (``j != i``), if
    ``v . g_j < 0`` it becomes ``v - (v . g_j) / |g_j|^2 g_j`` (``g_j`` the *original* gradient,
    as in the paper's Algorithm 1). A zero ``g_j`` is skipped.
    """
    k = gramian.shape[-1]
    if gramian.shape[-2] != k or orders.shape[-2:] != (k, k):
        raise ValueError(
            f"gramian must be (..., K, K) and orders (..., K, K); got {tuple(gramian.shape)} and {tuple(orders.shape)}."
        )
    if gramian.dim() == 2 and gramian.device.type == "cpu" and not gramian.requires_grad and not _is_functorch(gramian):
        return _coefficients_cpu(gramian, orders)  # same result, far fewer tiny tensor ops
    orders = orders.to(gramian.device)
    batch_shape = gramian.shape[:-2]
    coef = torch.eye(k, dtype=gramian.dtype, device=gramian.device).expand(batch_shape + (k, k))
    # one_hot[..., i, p, :] selects the task that row i projects against at position p.
    tasks = torch.arange(k, device=gramian.device)
    one_hot = (orders.unsqueeze(-1) == tasks).to(gramian.dtype)  # (..., K, K, K)
    sq_norms = torch.diagonal(gramian, dim1=-2, dim2=-1)  # (..., K)
    g_jj = one_hot @ sq_norms.unsqueeze(-2).unsqueeze(-1)  # (..., K, K, 1): |g_j|^2 per (row, position)
    not_self = (orders != tasks.unsqueeze(-1)).unsqueeze(-1)  # skip j == i
    inv = torch.where(
        (g_jj > 0) & not_self, 1.0 / torch.where(g_jj > 0, g_jj, torch.ones_like(g_jj)), torch.zeros_like(g_jj)
    )
    for position in range(k):
        pick = one_hot[..., position, :]  # (..., K, K)
        dots = (coef * (pick @ gramian)).sum(-1, keepdim=True)  # (..., K, 1): v_i . g_j
        coef = coef - (dots.clamp(max=0.0) * inv[..., position, :]) * pick
    return coef


def _is_functorch(t: Tensor) -> bool:
    try:
        return bool(torch._C._functorch.is_functorch_wrapped_tensor(t))
    except AttributeError:  # pragma: no cover - older torch
        return False


def _coefficients_cpu(gramian: Tensor, orders: Tensor) -> Tensor:
    """:func:`pcgrad_coefficients` for one CPU problem, in Python floats (K is small)."""
    k = gramian.shape[-1]
    gram = gramian.tolist()
    order = orders.tolist()
    coef = [[1.0 if a == b else 0.0 for b in range(k)] for a in range(k)]
    for i in range(k):
        row = coef[i]
        for j in order[i]:
            if j == i or not gram[j][j] > 0:
                continue
            dot = sum(row[m] * gram[m][j] for m in range(k))
            if dot < 0:
                row[j] -= dot / gram[j][j]
    return torch.tensor(coef, dtype=gramian.dtype)


@register_rule("pcgrad")
class PCGrad(Rule):
    """PCGrad: project every task gradient (main included) off the gradients it conflicts with, then sum.

    ``aux_weight`` (lambda) scales each auxiliary gradient; since conflicts and projections do not
    depend on the other vector's length, this is the same as running PCGrad on ``lambda * g_aux``.
    The random visiting order comes from the gate's seeded generator (saved in its state).
    An auxiliary task counts as "open" (``GateStats.gate_open``) when its own gradient conflicts
    with no other task's gradient, i.e. when it was not projected this step.

    >>> from lightning_gradsim import GradientGate
    >>> GradientGate(rule="pcgrad", aux_weight=0.5).combine(torch.tensor([1.0, 2.0]), [torch.tensor([3.0, -1.0])])[0]
    tensor([2.5000, 1.5000])
    """

    deterministic = False

    def weights(self, inp: RuleInput) -> Tensor:
        gram = inp.gramian
        k = gram.shape[-1]
        orders = draw_pcgrad_orders(tuple(gram.shape[:-2]), k, inp.generator, inp.problem_generators)
        coef = pcgrad_coefficients(gram, orders)  # (..., K, K)
        lam = torch.cat([torch.ones(1, dtype=gram.dtype, device=gram.device), inp.aux_weight.to(gram.dtype)])
        return (lam.unsqueeze(-1) * coef).sum(-2)

    def gate_open(self, inp: RuleInput, weights: Tensor) -> Tensor:
        # Task i's vector is left untouched iff it conflicts with no other original gradient.
        gram = inp.gramian
        k = gram.shape[-1]
        off_diag = ~torch.eye(k, dtype=torch.bool, device=gram.device)
        no_conflict = ((gram >= 0) | ~off_diag).all(-1)  # (..., K)
        return no_conflict[..., 1:]
