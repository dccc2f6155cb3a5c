"""From per-layer Gramians to weights and statistics: cosines, the rule, the state update.

:func:`decide` is the step of the gate between "the Gramian is known" (local, or reduced over
ranks or shards) and "apply the weights": it never touches a gradient.

>>> import torch
>>> from lightning_gradsim.rules import get_rule
>>> from lightning_gradsim.core.state import GateState
>>> gram = torch.tensor([[[1.0, -1.0], [-1.0, 2.0]]])   # one layer: g_main = (1, 0), g_aux = (-1, 1)
>>> weights, stats = decide(gram, rule=get_rule("unweighted"), state=GateState(), aux_weight=torch.ones(1))
>>> weights, stats.cosine, stats.gate_open
(tensor([1., 0.]), tensor([-0.7071]), tensor([False]))
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from ..rules import Rule, RuleInput
from .state import GateState
from .stats import GateStats
from .streams import keyed_generators

__all__ = ["GateStats", "decide", "cosine_from_gram", "problem_streams"]


def decide(
    layer_gram: Tensor,
    *,
    rule: Rule,
    state: GateState,
    aux_weight: Tensor,
    num_tasks: int | None = None,
    threshold: float = 0.0,
    cosine_ema: float = 0.0,
    per_layer: bool = False,
    finite: Tensor | None = None,
    direction: list[Tensor] | None = None,
    checks: Sequence[Tensor | None] = (),
    cosine_layers: Tensor | None = None,
    agree: Callable[[Tensor], Tensor] | None = None,
    settle: Callable[[Tensor], Tensor | None] | None = None,
    problem_keys: Sequence[int] | None = None,
) -> tuple[Tensor, GateStats]:
    """Weights and statistics from per-layer Gramians ``(L, *B, V, V)``, and the state update.

    ``V = num_tasks`` (``K``), or ``K + 1`` when the last vector is the direction EMA ``direction``
    (its new values, stored in ``state`` if the step is finite). For a rule that uses the main
    direction without an EMA, the direction is the main gradient (no extra vector needed).
    ``finite``: what else the caller knows about the step (losses, heads, other ranks); ``checks``:
    1-D tensors (e.g. loss values, gradient norms) whose finiteness joins the step's one check.
    ``cosine_layers``: per-layer Gramians ``(L, *B, K, K)`` to take the cosines from instead (a held-out
    reference in the main slot). A rule with ``per_tensor_weights`` gets the per-layer Gramians and returns
    ``(L, *B, K)`` weights (the statistics report their mean over the layers). ``agree``: the step's
    finiteness as this process found it -> as every process takes it (e.g. over the ranks of the
    ``local`` sync), before any state moves. ``settle``: the caller's work that needs the weights before the
    state may move (the feature path's backward through the trunk): weights -> the finiteness of what it
    made (``None``: nothing to check), which joins the step's before ``agree``. ``problem_keys``: one int per
    problem of the batch; a random rule (``rule.deterministic`` false) then draws each problem's numbers
    from its own keyed stream (:func:`problem_streams`). Returns ``weights``
    (``(*B, K)``, ``(*B, K+1)`` or ``(L, *B, K)``) and the step's :class:`GateStats`.
    """
    k = layer_gram.shape[-1] if num_tasks is None else num_tasks
    gram = layer_gram.sum(0)
    task_gram = gram[..., :k, :k]
    cos_layers = layer_gram[..., :k, :k] if cosine_layers is None else cosine_layers
    cos_gram = cos_layers.sum(0)
    raw_cos = cosine_from_gram(cos_layers if per_layer else cos_gram, per_layer=per_layer)
    state.ensure(tuple(gram.shape[:-2]) + (k - 1,), gram)
    smoothed = state.smooth(raw_cos, cosine_ema)
    per_tensor = rule.per_tensor_weights
    if per_tensor:  # (L, *B, K, K) in, (L, *B, K) out (the gate refuses a direction with it)
        rule_gram = layer_gram[..., :k, :k]
    elif rule.uses_main_direction and gram.shape[-1] == k:
        # The direction is this step's main gradient: its row is the main one.
        cross = gram[..., :, 0]
        top = torch.cat([gram, cross.unsqueeze(-1)], dim=-1)
        bottom = torch.cat([cross, gram[..., 0, 0].unsqueeze(-1)], dim=-1).unsqueeze(-2)
        rule_gram = torch.cat([top, bottom], dim=-2)
    elif rule.uses_main_direction:
        rule_gram = gram
    else:
        rule_gram = task_gram
    inp = RuleInput(
        gramian=rule_gram,
        cosine=smoothed,
        raw_cosine=raw_cos,
        aux_weight=aux_weight,
        threshold=threshold,
        generator=state.rng(),
        problem_generators=None if problem_keys is None or rule.deterministic else problem_streams(state, problem_keys),
    )
    weights = rule.weights(inp)
    summary = weights.mean(0) if per_tensor else weights  # the statistics' weights: the mean over the tensors
    diag = torch.diagonal(task_gram, dim1=-2, dim2=-1).clamp(min=0).sqrt()
    cos_diag = torch.diagonal(cos_gram, dim1=-2, dim2=-1)
    measured = (cos_diag[..., :1] > 0) & (cos_diag[..., 1:] > 0)  # a zero vector has no cosine: not measured
    gate_open = rule.gate_open(inp, weights) & measured
    flat_weights = weights.movedim(0, -2).flatten(-2) if per_tensor else weights
    parts = [gram.flatten(-2), flat_weights.to(gram.dtype)]
    parts += [c.reshape(-1).to(gram.dtype).expand(gram.shape[:-2] + (-1,)) for c in checks if c is not None]
    ok = torch.isfinite(torch.cat(parts, dim=-1)).all(-1)  # one check
    if finite is not None:
        ok = ok & finite
    settled = settle(weights) if settle is not None else None
    if settled is not None:
        ok = ok & settled
    if agree is not None:
        ok = agree(ok)
    commit = getattr(rule, "commit", None)
    if commit is not None:  # a stateful rule keeps what it staged in weights() only on a finite step
        commit(ok)
    state.commit(
        smoothed,
        gate_open,
        ok,
        keep_cosine=cosine_ema > 0,
        direction=direction,
        raw=raw_cos,
        measured=measured,
        threshold=threshold,
    )
    stats = GateStats(
        cosine=raw_cos.detach(),
        smoothed_cosine=smoothed.detach(),
        weight=summary[..., 1:k].detach(),
        gate_open=gate_open.detach(),
        main_norm=diag[..., 0].detach(),
        aux_norm=diag[..., 1:].detach(),
        finite=ok.detach(),
        measured=measured.detach(),
    )
    return weights, stats


def problem_streams(state: GateState, keys: Sequence[int]) -> tuple[torch.Generator, ...]:
    """One generator per keyed problem, seeded from (the gate's ``seed``, the key, the finite measured steps
    so far): a problem draws the same whatever shares its batch, a skipped step draws again, and a resumed
    run (the counter is in ``state_dict``) draws on. One host read of the counter."""
    return keyed_generators(state.seed, keys, int(state.measured_steps))


def cosine_from_gram(gram: Tensor, per_layer: bool = False) -> Tensor:
    """Cosine of each auxiliary vector with the main one from a ``(*B, K, K)`` Gramian, or from
    per-layer Gramians ``(L, *B, K, K)`` averaged over the layers where both vectors are non-zero.

    >>> cosine_from_gram(torch.tensor([[4.0, 2.0, 0.0], [2.0, 4.0, 0.0], [0.0, 0.0, 0.0]]))  # a zero vector: 0
    tensor([0.5000, 0.0000])
    """
    main_sq = gram[..., 0, 0].unsqueeze(-1)
    aux_sq = torch.diagonal(gram, dim1=-2, dim2=-1)[..., 1:]
    dots = gram[..., 0, 1:]
    valid = (main_sq > 0) & (aux_sq > 0)
    denom = torch.where(valid, (main_sq * aux_sq).sqrt(), torch.ones_like(aux_sq))
    cos = torch.where(valid, dots / denom, torch.zeros_like(dots))
    if per_layer:
        return (cos.sum(0) / valid.sum(0).clamp(min=1)).clamp(-1.0, 1.0)
    return cos.clamp(-1.0, 1.0)
