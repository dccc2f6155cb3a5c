"""The gate's three ways through a step, and the decision they share.

* :meth:`GateStep.measured` (``similarity="parameters"``): per-task parameter gradients ->
  transforms -> per-layer Gramian -> (reduce) -> rule and state -> apply into ``.grad``;
* :meth:`GateStep.features` (``similarity="features"``): per-task *feature* gradients -> rule ->
  the combined feature gradient through the trunk, once;
* :meth:`GateStep.reused` (``every_n_steps``, between measured steps): one weighted backward with
  the last measured weights.

Each path checks once, on the device, that what it writes is finite (losses, heads, the combined
gradient), so a NaN/inf never reaches the optimizer unnoticed: the step is reported in
``GateStats.finite`` and counted as skipped.

>>> import torch
>>> from lightning_gradsim import GradientGate
>>> gate = GradientGate(every_n_steps=2)
>>> w = torch.nn.Parameter(torch.ones(2))
>>> [gate.backward(w.sum(), [2 * w.sum()], [w]) is not None for _ in range(3)], int(gate.state.measured_steps)
([True, True, True], 2)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from .gradients import backpropagate, feature_gradients, loss_gradients, weighted_gradients
from .graph import check_features_cut
from .options import GateConfig
from .state import GateState, Reuse
from .stats import GateStats
from .task_gradients import TaskGradients, accumulate_grad, all_finite
from .transforms import NON_FINITE, PENDING, READY, Transforms
from .weights import decide

__all__ = ["GateStep", "decide_step", "combine_vectors"]


def decide_step(
    config: GateConfig,
    state: GateState,
    grads: TaskGradients,
    names: list[str],
    aux_weight: Tensor,
    finite: Tensor | None = None,
    pipeline: Transforms | None = None,
    scale: Tensor | None = None,
    checks: Sequence[Tensor | None] = (),
    reference: bool = False,
    settle: Callable[[Tensor, list[Tensor] | None], Tensor | None] | None = None,
    problem_keys: Sequence[int] | None = None,
) -> tuple[Tensor, GateStats, list[Tensor] | None]:
    """Gramian -> (reduce) -> rule and ``state``; the loss weighting observes. Writes no gradient.

    ``aux_weight``: the lambdas of the auxiliary ``names``; ``reference``: the last row of ``grads`` is a
    held-out reference gradient to measure the cosines against (:func:`_decide_on_reference`). ``settle``:
    (weights, direction) -> finiteness, the caller's work that must succeed before the state moves (see
    :func:`decide`; not with ``reference``); ``problem_keys``: see :func:`decide`. Returns the weights, the
    step's statistics and the direction vectors (``None``: the main gradient).
    """
    if reference:
        return _decide_on_reference(
            config, state, grads, names, aux_weight, finite, pipeline, scale, checks, problem_keys
        )
    direction = None
    if config.rule.uses_main_direction and config.main_grad_ema > 0:
        direction = state.direction(grads.main(), config.main_grad_ema)
    gram = grads.gramian(direction)
    if pipeline:
        gram = pipeline.gramian(gram)
    k = grads.num_tasks
    weights, stats = decide(
        gram,
        rule=config.rule,
        state=state,
        aux_weight=aux_weight.to(gram.dtype),
        num_tasks=k,
        threshold=config.threshold,
        cosine_ema=config.cosine_ema,
        per_layer=config.per_layer,
        finite=finite,
        direction=direction,
        checks=checks,
        agree=pipeline.agree if pipeline else None,
        settle=None if settle is None else lambda w: settle(w, direction),
        problem_keys=problem_keys,
    )
    return weights, _observed(config, grads, names, gram, k, scale, stats), direction


def combine_vectors(
    config: GateConfig,
    state: GateState,
    names: list[str],
    main: list[Tensor],
    aux: list[list[Tensor]],
    batch_dims: int,
    aux_weight: Tensor,
    reference: bool = False,
    problem_keys: Sequence[int] | None = None,
) -> tuple[list[Tensor | None], GateStats]:
    """``GradientGate.combine`` once its inputs are checked: ``[main, aux..., (reference)]`` stacked per tensor,
    decided (a skipped step draws nothing from the gate's generator) and applied, in ``main``'s structure."""
    stacked: list[Tensor | None] = [torch.stack([m] + [a[i] for a in aux], dim=batch_dims) for i, m in enumerate(main)]
    grads = TaskGradients(stacked=stacked, batch_dims=batch_dims)
    mark = state.rng_mark(config.rule.deterministic)
    weights, stats, direction = decide_step(
        config, state, grads, names, aux_weight, reference=reference, problem_keys=problem_keys
    )
    state.undo_draws(mark, stats.finite)
    return grads.apply(weights, direction, per_tensor=config.rule.per_tensor_weights), stats


def _observed(
    config: GateConfig,
    grads: TaskGradients,
    names: list[str],
    gram: Tensor,
    k: int,
    scale: Tensor | None,
    stats: GateStats,
) -> GateStats:
    """The loss weighting observes the step; the statistics' weights become those on the raw auxiliary gradients."""
    lw = config.loss_weighting
    if lw is not None and scale is not None:
        applied = stats.weight * scale[1:].to(stats.weight.dtype)  # on the raw auxiliary gradient
        stats = stats._replace(weight=applied, gate_open=stats.gate_open & (applied > 0))
        if config.similarity == "parameters" and grads.params is not None:
            w = scale / lw.lambdas(names, scale)
            lw.observe(grads.losses, gram[..., :k, :k], grads.present(), grads.params, w, stats.finite)
    return stats


def _select(gram: Tensor, index: list[int]) -> Tensor:
    idx = torch.tensor(index, device=gram.device)
    return gram.index_select(-1, idx).index_select(-2, idx)


def _decide_on_reference(
    config: GateConfig,
    state: GateState,
    grads: TaskGradients,
    names: list[str],
    aux_weight: Tensor,
    finite: Tensor | None,
    pipeline: Transforms | None,
    scale: Tensor | None,
    checks: Sequence[Tensor | None],
    problem_keys: Sequence[int] | None = None,
) -> tuple[Tensor, GateStats, list[Tensor] | None]:
    """:func:`decide_step` when the last of ``grads``' rows is a held-out reference gradient ``g_ref``.

    The cosines, and so the rule's decision, are those of ``[g_ref, g_1, ...]``; the update is
    ``g_main + sum_k w_k g_k`` (the main weight is 1: the training main gradient enters unmodified); a rule
    that projects onto a direction (``projection``) takes ``g_ref`` (or its EMA) as the direction. The
    returned weights have one entry per row (the reference's is its direction weight, or 0), then the EMA
    direction's.
    """
    k = grads.num_tasks - 1  # the training tasks; row k is the reference
    rule = config.rule
    direction = None
    if rule.uses_main_direction and config.main_grad_ema > 0:
        direction = state.direction(grads.main(k), config.main_grad_ema)
    full = grads.gramian(direction)
    if pipeline:
        full = pipeline.gramian(full)
    against = [k] + list(range(1, k))  # the reference in the main slot
    if rule.uses_main_direction:  # [main, aux..., direction]: the reference itself or its EMA
        rule_layers = _select(full, list(range(k)) + [k + 1 if direction is not None else k])
    else:
        rule_layers = _select(full, against)
    every = full.flatten(-2).reshape(full.shape[0], -1)  # the training main gradient's entries join the check
    weights, stats = decide(
        rule_layers,
        rule=rule,
        state=state,
        aux_weight=aux_weight.to(full.dtype),
        num_tasks=k,
        threshold=config.threshold,
        cosine_ema=config.cosine_ema,
        per_layer=config.per_layer,
        finite=finite,
        direction=direction,
        checks=[*checks, every],
        cosine_layers=_select(full, against),
        agree=pipeline.agree if pipeline else None,
        problem_keys=problem_keys,
    )
    main_norm = full.sum(0)[..., 0, 0].clamp(min=0).sqrt()
    stats = stats._replace(main_norm=main_norm.detach(), against_reference=True)
    ones = torch.ones_like(weights[..., :1])
    if not rule.uses_main_direction:  # [1, w_1..., 0 for the reference]
        weights = torch.cat([ones, weights[..., 1:k], torch.zeros_like(ones)], dim=-1)
    elif direction is not None:  # [w_0, w_1..., 0 for the reference, w_direction]
        weights = torch.cat([weights[..., :k], torch.zeros_like(ones), weights[..., k:]], dim=-1)
    # else: [w_0, w_1..., w_direction] where the direction is the reference row itself
    return weights, _observed(config, grads, names, full, k, scale, stats), direction


class GateStep:
    """One call of ``gate.backward`` once its inputs are checked: the gate's settings and state, the
    losses (weighted), the parameters, the transforms, and what is known about finiteness.

    Each way through the step returns its :class:`GateStats` (``None``: a transform kept the gradients);
    it writes ``.grad`` and the ``state`` it was given, and nothing of the gate's.
    """

    def __init__(
        self,
        config: GateConfig,
        state: GateState,
        aux_weight: Tensor,
        names: list[str],
        losses: list[Tensor],
        raw: Tensor,
        scale: Tensor | None,
        shared: list[Tensor],
        others: list[Tensor],
        pipeline: Transforms,
        reference: bool = False,
    ) -> None:
        self.config, self.state, self.aux_weight = config, state, aux_weight
        self.names, self.losses, self.raw, self.scale = names, losses, raw, scale
        self.shared, self.others, self.pipeline = shared, others, pipeline
        #: whether the measured gradients' last row is a held-out reference gradient
        self.reference = reference

    def measured(self, grads: TaskGradients) -> GateStats | None:
        """``similarity="parameters"``: the per-task gradients through the transforms, decide, apply."""
        lw = self.config.loss_weighting
        if lw is not None and lw.needs_losses:
            grads.losses = self.raw
        status, finite = READY, None
        checks: list[Tensor | None] = [self.raw]  # the losses join the decision's one finiteness check
        if self.pipeline:
            grads.finite = torch.isfinite(self.raw).all()  # a window / the ranks AND it
            status = self.pipeline.task_gradients(grads)
            if status == PENDING:
                return None
            finite, checks = grads.finite, []
        if status == NON_FINITE:
            finite = torch.zeros((), dtype=torch.bool, device=self.raw.device)
        checks.append(grads.others_norms())  # the heads' gradients too
        mark = self.state.rng_mark(self.config.rule.deterministic)
        weights, stats, direction = self._decide(grads, finite, self.pipeline, checks)
        if status != NON_FINITE:
            per_tensor = self.config.rule.per_tensor_weights  # a sharding transform may point params at shards
            grads.apply(weights, direction, into=grads.params, per_tensor=per_tensor)
            grads.write_others()
            self._regularize()
        stats = self._combined(stats)
        self.state.undo_draws(mark, stats.finite)  # a skipped step leaves the generator alone too
        if self.config.every_n_steps > 1:
            self.state.keep_for_reuse(Reuse(self._reusable(weights).detach(), stats, grads.present()))
        return stats

    def features(self, feats: list[Tensor] | None) -> GateStats:
        """``similarity="features"``: gate on the feature gradients, one backward through the trunk."""
        if not feats:
            raise ValueError(
                "similarity='features' needs the shared features: call `h = gate.mark_features(trunk(x))` "
                "before computing the losses from h, or pass gate.backward(..., features=h)."
            )
        if any(not f.requires_grad for f in feats):
            raise ValueError(
                "A marked feature tensor does not require grad: mark the trunk's output (computed from "
                "the shared parameters, not detached or under torch.no_grad())."
            )
        check_features_cut(self.losses, feats, self.shared)
        grads = feature_gradients(self.losses, feats, self.others)
        if all(r is None for r in grads.rows[0]):  # type: ignore[index]
            raise ValueError(
                "The main loss does not depend on the marked features: mark the tensor the main head reads."
            )
        mark = self.state.rng_mark(self.config.rule.deterministic)
        present = grads.present()
        trunk: list[Tensor | None] = []

        def through_trunk(weights: Tensor, direction: list[Tensor] | None) -> Tensor | None:
            # before the state moves: a NaN/inf the trunk's backward makes skips the step like any other
            feature_grad = grads.apply(weights, direction)
            trunk.extend(backpropagate([feats[i] for i in present], [feature_grad[i] for i in present], self.shared))  # type: ignore[misc]
            return all_finite([g for g in trunk if g is not None])

        weights, stats, _ = self._decide(
            grads, None, self.pipeline, [self.raw, grads.others_norms()], settle=through_trunk
        )
        for p, g in zip(self.shared, trunk):
            if g is not None:
                accumulate_grad(p, g)
        grads.write_others()
        self._regularize()
        stats = self._combined(stats)
        self.state.undo_draws(mark, stats.finite)
        self.state.keep_for_reuse(Reuse(weights.detach(), stats, present))
        return stats

    def reused(self) -> GateStats:
        """``every_n_steps``: one weighted backward with the last measured weights (``last_stats`` stays)."""
        config, state, shared = self.config, self.state, self.shared
        weights, stats, present = state.reuse  # type: ignore[misc]
        k = len(self.losses)
        with_buffers = weights.shape[-1] > k and config.main_grad_ema > 0 and config.similarity == "parameters"
        task_w = (
            weights[:k]
            if with_buffers or weights.shape[-1] == k
            else torch.cat(
                [weights[:1] + weights[k:], weights[1:k]]  # the direction is this step's main gradient
            )
        )
        # The weights are in the losses: the shared gradient goes into .grad as backward writes it.
        combined, heads = weighted_gradients(self.losses, task_w, shared, self.others, into_grad=not with_buffers)
        # the losses, the gradients and the weights themselves (the direction EMA term below is finite: the
        # state keeps only finite steps' directions and weights)
        finite = all_finite([g for g in combined + heads if g is not None] + [weights], self.raw)
        state.count(finite)  # type: ignore[arg-type]
        bundle = TaskGradients(rows=[combined], others=heads, params=shared, other_params=self.others)
        if with_buffers:  # plus the main-gradient EMA of the last measured step as the direction
            buffers = dict(zip(present, state.directions()))
            bundle.rows = [
                [
                    torch.zeros_like(p) if g is None and i in buffers else g
                    for i, (g, p) in enumerate(zip(combined, shared))
                ]
            ]
            direction = [buffers.get(i) for i in bundle.present()]
            bundle.apply(torch.cat([torch.ones_like(weights[:1]), weights[k:]]), direction, into=shared)
        bundle.write_others()
        self._regularize()
        return self._combined(stats._replace(finite=finite.reshape(stats.finite.shape)), measured=False)  # type: ignore[union-attr]

    # ------------------------------------------------------------------ shared ends
    def _decide(
        self,
        grads: TaskGradients,
        finite: Tensor | None,
        pipeline: Transforms | None,
        checks: Sequence[Tensor | None],
        settle: Callable[[Tensor, list[Tensor] | None], Tensor | None] | None = None,
    ) -> tuple[Tensor, GateStats, list[Tensor] | None]:
        return decide_step(
            self.config,
            self.state,
            grads,
            self.names,
            self.aux_weight,
            finite,
            pipeline,
            self.scale,
            checks,
            self.reference,
            settle,
        )

    def _reusable(self, weights: Tensor) -> Tensor:
        """The weights in the layout a step that measures nothing (and takes no reference) applies: without
        the reference row's entry, unless that entry is the projection direction's weight (no EMA), which
        such a step applies to the training main gradient."""
        cfg = self.config
        if not self.reference or (cfg.rule.uses_main_direction and cfg.main_grad_ema <= 0):
            return weights
        k = len(self.losses)
        return torch.cat([weights[..., :k], weights[..., k + 1 :]], dim=-1)

    def _combined(self, stats: GateStats, measured: bool = True) -> GateStats:
        """The transforms' last word once ``.grad`` is written (e.g. all-gather combined shards, or
        average them over the ranks); ``measured``: whether the step was counted as measured."""
        if not self.pipeline:
            return stats
        return self._recheck(stats, self.pipeline.combined(self.shared, self.others, stats.finite), measured)

    def _recheck(self, stats: GateStats, finite: Tensor | None, measured: bool = True) -> GateStats:
        """A NaN/inf found once ``.grad`` is written (the transforms' last word, e.g. another rank): count the
        step as skipped."""
        if finite is None or finite is stats.finite:
            return stats
        after = stats.finite & finite
        self.state.recount(stats.finite, after, measured)
        return stats._replace(finite=after)

    def _regularize(self) -> None:
        """Add the loss weighting's regulariser gradient once per step, outside any loss scale or mean."""
        lw = self.config.loss_weighting
        reg = lw.regularizer() if lw is not None else None
        if reg is not None and reg.requires_grad:
            params = lw.own_parameters()  # type: ignore[union-attr]
            for p, g in zip(params, loss_gradients(reg, params)):
                if g is not None:
                    accumulate_grad(p, g)
