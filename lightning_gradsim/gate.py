"""The gradient-similarity gate (Du et al., *Adapting Auxiliary Losses Using Gradient Similarity*)."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from .gradients import STRATEGIES, PerTaskGradients, inspect_graph, per_task_gradients, reachable_parameters
from .rules import Rule, RuleInput, get_rule

__all__ = ["GradientGate", "GateStats"]

MAIN_TASK = "main"


class GateStats(NamedTuple):
    """Per-step statistics of the gate, as tensors on the gradients' device (no host sync).

    Shapes: ``(..., K-1)`` for per-auxiliary fields, ``(...)`` for the others, where ``...`` are
    the leading batch dimensions of :meth:`GradientGate.combine` (none for ``backward``).
    """

    cosine: Tensor  #: this step's cosine of each auxiliary vector with the main one
    smoothed_cosine: Tensor  #: the cosine the rule used (EMA over steps when ``cosine_ema > 0``)
    weight: Tensor  #: coefficient applied to each auxiliary vector (lambda times the gate)
    gate_open: Tensor  #: bool, whether each auxiliary vector was used (unmodified) this step
    main_norm: Tensor  #: L2 norm of the main vector
    aux_norm: Tensor  #: L2 norm of each auxiliary vector
    finite: Tensor  #: bool, whether every task's vector was finite (state is only updated if so)


def _as_list(x: Tensor | Sequence[Tensor]) -> tuple[list[Tensor], bool]:
    if isinstance(x, Tensor):
        return [x], True
    return list(x), False


class GradientGate(nn.Module):
    """Combine a main gradient with auxiliary ones, using each auxiliary only while it helps.

    At each step the gate measures the cosine between the main task's gradient and each auxiliary
    task's gradient on the shared parameters, and combines them with a rule (see
    :mod:`lightning_gradsim.rules`): ``unweighted`` (the paper's default: add ``lambda * g_aux``
    iff ``cos >= threshold``), ``weighted`` (scale by ``max(0, cos)``), ``projection`` (remove the
    component that conflicts with the main direction), ``sum`` and ``main_only`` (baselines), or
    any rule you register. Each auxiliary task is gated against the main one on its own.

    The state (smoothed cosine, main-gradient EMA, step and open counts) lives in buffers, so it is
    part of ``state_dict`` and of Lightning checkpoints.

    Args:
        rule: a registered rule name or a :class:`~lightning_gradsim.rules.Rule` instance.
        aux_weight: lambda, one number for every auxiliary task or a mapping from task name to
            number (every auxiliary task must then be named).
        threshold: the cosine at or above which an auxiliary gradient is used.
        cosine_ema: EMA factor ``beta`` of the cosine, ``s_t = beta s_{t-1} + (1 - beta) cos_t``
            (``s_0 = cos_0``); the rule uses ``s_t``. 0 uses this step's cosine.
        main_grad_ema: EMA factor of the main gradient used as the ``projection`` direction,
            ``d_t = beta d_{t-1} + (1 - beta) g_t`` (``d_0 = g_0``). 0 uses this step's gradient.
            (A blog's ``M_t = alpha g_t + (1 - alpha) M_{t-1}`` is ``main_grad_ema = 1 - alpha``.)
        per_layer: measure the cosine per shared parameter tensor and average over the tensors on
            which both gradients are non-zero (the paper's Atari setup) instead of over the
            concatenated vector.
        seed: seed of the generator handed to rules that draw random numbers.
        similarity: where the cosine is measured. ``"parameters"`` (default): on the gradients of
            the shared parameters (exact; costs one extra backward through the trunk per
            auxiliary task when the tasks share one forward pass, nothing extra when each task has
            its own batch). ``"features"``: on the gradients of the shared *features* marked with
            :meth:`mark_features` (or passed as ``backward(..., features=h)``); only the heads are
            differentiated per task, then one backward runs through the trunk with the gated
            feature gradient. The combination is then exactly ``sum_k w_k g_k`` on the trunk for
            linear rules (``unweighted``, ``weighted``, ``sum``, ``main_only``), with the gate
            decided by the cosine in feature space; ``projection`` projects in feature space.
        every_n_steps: measure the cosine every ``k`` calls of :meth:`backward` and reuse the
            last measured weights in between (a single weighted backward on those steps). The
            statistics are those of the last measured step (``last_stats`` is only updated when
            measuring).

    Speed notes: see ``docs/speed.md``. How per-task gradients are taken (``"auto"``: one
    backward per task when the tasks' graphs are disjoint, one vmap-batched backward when they
    share trunk work) can be forced with the attribute ``gate.grad_strategy`` (``"separate"``,
    ``"batched"``, ``"sequential"``).

    Example::

        gate = GradientGate(rule="unweighted", aux_weight=0.5)
        out = trunk(x)
        stats = gate.backward(loss_main(out), {"rotated": loss_aux(out)}, trunk.parameters())
        optimizer.step()
    """

    cosine_state: Tensor
    open_steps: Tensor
    measured_steps: Tensor
    skipped_steps: Tensor
    step: Tensor

    def __init__(
        self,
        rule: str | Rule = "unweighted",
        aux_weight: float | Mapping[str, float] = 1.0,
        threshold: float = 0.0,
        cosine_ema: float = 0.0,
        main_grad_ema: float = 0.0,
        per_layer: bool = False,
        seed: int = 0,
        similarity: str = "parameters",
        every_n_steps: int = 1,
    ) -> None:
        super().__init__()
        self.rule = get_rule(rule)
        if isinstance(aux_weight, Mapping):
            self.aux_weight: float | dict[str, float] = {str(k): float(v) for k, v in aux_weight.items()}
        else:
            self.aux_weight = float(aux_weight)
        for name, value in (("threshold", threshold), ("cosine_ema", cosine_ema), ("main_grad_ema", main_grad_ema)):
            if not math.isfinite(float(value)):
                raise ValueError(f"{name} must be a finite number, got {value!r}.")
        if not 0.0 <= cosine_ema < 1.0:
            raise ValueError(f"cosine_ema must be in [0, 1), got {cosine_ema}.")
        if not 0.0 <= main_grad_ema < 1.0:
            raise ValueError(f"main_grad_ema must be in [0, 1), got {main_grad_ema}.")
        self.threshold = float(threshold)
        self.cosine_ema = float(cosine_ema)
        self.main_grad_ema = float(main_grad_ema)
        self.per_layer = bool(per_layer)
        self.seed = int(seed)
        if similarity not in ("parameters", "features"):
            raise ValueError(f"similarity must be 'parameters' or 'features', got {similarity!r}.")
        if isinstance(every_n_steps, bool) or not isinstance(every_n_steps, int) or every_n_steps < 1:
            raise ValueError(f"every_n_steps must be an integer >= 1, got {every_n_steps!r}.")
        self.similarity = similarity
        self.every_n_steps = every_n_steps
        #: How per-task gradients are taken: "auto", "separate", "batched" or "sequential".
        self.grad_strategy = "auto"
        self._features: list[Tensor] | None = None
        self._calls = 0
        self._reuse: tuple[Tensor, GateStats, list[int]] | None = None
        self._weight_cache: tuple[tuple, Tensor] | None = None
        self._grad_state: dict[str, bool] = {}
        self.aux_names: list[str] | None = None
        self._generator: torch.Generator | None = None
        self._num_direction_buffers = 0
        self.last_stats: GateStats | None = None
        # Lazily shaped once the number of auxiliary tasks (and batch shape) is known.
        self.register_buffer("cosine_state", torch.zeros(0))
        self.register_buffer("open_steps", torch.zeros(0, dtype=torch.long))
        self.register_buffer("measured_steps", torch.zeros((), dtype=torch.long))
        self.register_buffer("skipped_steps", torch.zeros((), dtype=torch.long))
        self.register_buffer("step", torch.zeros((), dtype=torch.long))

    # ------------------------------------------------------------------ public API
    @property
    def rule_name(self) -> str:
        return self.rule.name or type(self.rule).__name__

    def backward(
        self,
        main_loss: Tensor,
        aux_losses: Sequence[Tensor] | Mapping[str, Tensor],
        shared_params: Iterable[Tensor],
        other_params: Iterable[Tensor] | None = None,
        features: Tensor | Sequence[Tensor] | None = None,
    ) -> GateStats:
        """Gate-combine the tasks' gradients on ``shared_params`` and accumulate them into ``.grad``.

        Every other parameter reached by the losses (``other_params``, or found in the autograd
        graph when ``None``) gets the gradient that plain ``backward`` of its own task's loss
        gives it, accumulated into ``.grad``. Returns this step's :class:`GateStats`.

        ``features``: with ``similarity="features"``, the shared features the heads read (else
        the ones marked with :meth:`mark_features` are used).

        Example::

            stats = gate.backward(main_loss, [aux_loss], model.trunk.parameters())
        """
        marked, self._features = self._features, None
        names, losses = self._named_losses(main_loss, aux_losses)
        shared = self._shared_list(shared_params)
        shared_ids = {id(p) for p in shared}
        if other_params is None:
            others = [p for p in reachable_parameters(losses) if id(p) not in shared_ids]
        else:
            others = [p for p in _unique(other_params) if p.requires_grad and id(p) not in shared_ids]
        losses_finite = torch.stack([torch.isfinite(loss.detach()) for loss in losses]).all()
        measure = self._reuse is None or self.every_n_steps == 1 or self._calls % self.every_n_steps == 0
        self._calls += 1
        if not measure:
            return self._reuse_step(losses, shared, others, losses_finite)
        if self.similarity == "features":
            feats = _as_list(features)[0] if features is not None else marked
            return self._features_step(names, losses, shared, others, feats, losses_finite)
        info = inspect_graph(losses, shared)
        if not info.reaches_shared[0]:
            raise ValueError(
                "The main loss does not depend on any shared parameter: shared_params (the mixin's "
                "shared_parameters()) must be the backbone parameters that the main head reads from."
            )
        strategy = self.grad_strategy
        if strategy not in STRATEGIES:
            raise ValueError(f"gate.grad_strategy must be one of {STRATEGIES}, got {strategy!r}.")
        grads = per_task_gradients(losses, shared, others, strategy=strategy, info=info, state=self._grad_state)
        grads = self._reduce_task_gradients(grads, shared, others)
        stats = self._combine_into_grad(grads, shared, names, losses_finite)
        for p, g in zip(others, grads.others):
            if g is not None:
                _accumulate_grad(p, g)
        return stats

    def mark_features(self, features: Tensor) -> Tensor:
        """Mark the shared features (trunk output) for ``similarity="features"``; returns them.

        Call it in ``task_losses`` (or before :meth:`backward`) on every tensor the heads read
        from the trunk; the next :meth:`backward` uses and forgets them.

        Example::

            h = self.gradsim.mark_features(self.trunk(x))
            return {"main": F.cross_entropy(self.head(h), y), "rot": F.cross_entropy(self.rot(h), r)}
        """
        if not isinstance(features, Tensor):
            raise TypeError(f"mark_features() takes a tensor, got {type(features).__name__}.")
        if self._features is None:
            self._features = []
        self._features.append(features)
        return features

    def _reduce_task_gradients(
        self, grads: PerTaskGradients, shared: list[Tensor], others: list[Tensor]
    ) -> PerTaskGradients:
        """Between "per-task gradients computed" and "statistics/combination": a no-op by default.

        Override (or install ``gate.__dict__["_task_gradient_hook"]``, as ``GradSimMixin`` does
        for DDP, accumulation and AMP) to transform the per-task gradients, e.g. all-reduce them.
        A hook receives and returns the stacked :class:`~lightning_gradsim.gradients.TaskGradients`.
        """
        hook = self.__dict__.get("_task_gradient_hook")
        if hook is None:
            return grads
        out = hook(grads.to_task_gradients(shared), shared, others)
        return PerTaskGradients(list(out.shared), None, list(out.others), list(out.reached), grads.strategy)

    def _check_no_hook_work(self, what: str) -> None:
        hook = self.__dict__.get("_task_gradient_hook")
        if hook is None:
            return
        if (
            not getattr(hook, "final", True)
            or getattr(hook, "sync_global", False)
            or getattr(hook, "inv_scale", None) is not None
        ):
            raise ValueError(
                f"{what} does not support gradient accumulation, DDP with gradsim_sync='global' or 16-mixed "
                "precision yet: use similarity='parameters' and every_n_steps=1 there."
            )

    # ------------------------------------------------------------------ fast paths
    def _reuse_step(
        self, losses: list[Tensor], shared: list[Tensor], others: list[Tensor], losses_finite: Tensor
    ) -> GateStats:
        """``every_n_steps``: one weighted backward with the last measured weights."""
        self._check_no_hook_work("every_n_steps > 1")
        assert self._reuse is not None
        weights, stats, present = self._reuse
        num_tasks = len(losses)
        if others:
            # The heads get their own tasks' gradients (a backward through the heads only).
            head_grads = torch.autograd.grad(_sum(losses), others, retain_graph=True, allow_unused=True)
            for p, g in zip(others, head_grads):
                if g is not None:
                    _accumulate_grad(p, g)
        w = weights[:num_tasks]
        use_buffers = weights.shape[-1] > num_tasks and self.main_grad_ema > 0 and self.similarity == "parameters"
        if weights.shape[-1] > num_tasks and not use_buffers:
            # The direction vector is this step's main gradient: fold its coefficient in.
            w = torch.cat([w[:1] + weights[num_tasks:], w[1:]])
        total = _sum([wk.to(loss.dtype) * loss for wk, loss in zip(w, losses)])
        if total.requires_grad:
            torch.autograd.backward(total, inputs=shared)
        if use_buffers:
            wd = weights[num_tasks]
            for b, i in enumerate(present):
                if b < self._num_direction_buffers:
                    buf = getattr(self, f"main_grad_ema_{b}")
                    p = shared[i]
                    if p.grad is None:
                        p.grad = (buf * wd.to(buf.dtype)).to(p.dtype)
                    else:
                        p.grad.addcmul_(buf.to(p.grad.dtype), wd.to(p.grad.dtype))
        bad = (~losses_finite).long()
        self.skipped_steps.add_(bad)
        self.step.add_(1)
        return stats._replace(finite=losses_finite.reshape(stats.finite.shape))

    def _features_step(
        self,
        names: list[str],
        losses: list[Tensor],
        shared: list[Tensor],
        others: list[Tensor],
        feats: list[Tensor] | None,
        losses_finite: Tensor,
    ) -> GateStats:
        """``similarity="features"``: gate on the feature gradients, one backward through the trunk."""
        self._check_no_hook_work("similarity='features'")
        if not feats:
            raise ValueError(
                "similarity='features' needs the shared features: call `h = gate.mark_features(trunk(x))` "
                "before computing the losses from h, or pass gate.backward(..., features=h)."
            )
        for f in feats:
            if not f.requires_grad:
                raise ValueError(
                    "A marked feature tensor does not require grad: mark the trunk's output (computed from "
                    "the shared parameters, not detached or under torch.no_grad())."
                )
        _check_features_cut(losses, feats, shared)
        num_feats = len(feats)
        inputs = list(feats) + list(others)
        rows: list[list[Tensor | None]] = []
        other_sum: list[Tensor | None] = [None] * len(others)
        for loss in losses:
            if loss.grad_fn is None:
                rows.append([None] * num_feats)
                continue
            g = torch.autograd.grad(loss, inputs, retain_graph=True, allow_unused=True)
            rows.append(list(g[:num_feats]))
            for j, r in enumerate(g[num_feats:]):
                if r is not None:
                    other_sum[j] = r if other_sum[j] is None else other_sum[j] + r
        if all(r is None for r in rows[0]):
            raise ValueError(
                "The main loss does not depend on the marked features: mark the tensor the main head reads."
            )
        reached = [any(r is not None for r in row) for row in rows]
        grads = PerTaskGradients(None, rows, other_sum, reached, "features")
        present = grads.present()
        weights, stats, direction = self._decide_rows(rows, present, names, losses_finite)
        feature_grad = _combine_rows(rows, present, weights, direction, len(losses))
        used = [feats[i] for i in present]
        torch.autograd.backward(used, [feature_grad[i] for i in present], inputs=shared)
        self._reuse = (weights.detach(), stats, present)
        for p, g in zip(others, other_sum):
            if g is not None:
                _accumulate_grad(p, g)
        return stats

    def _combine_into_grad(
        self, grads: PerTaskGradients, shared: list[Tensor], names: list[str], losses_finite: Tensor
    ) -> GateStats:
        """Statistics, rule and in-place combination into the shared parameters' ``.grad``."""
        num_tasks = grads.num_tasks
        present = grads.present()
        if grads.stacked is not None:
            flats = [grads.stacked[i].reshape(num_tasks, -1) for i in present]  # views
            gram_dtype = _stat_dtype(flats[0].dtype)
            layer_gram = torch.stack([(f @ f.mT).to(gram_dtype) for f in flats])

            def direction_fn(first: Tensor, finite: Tensor) -> tuple[Tensor, Tensor, list[Tensor]]:
                mains = [grads.stacked[i][0] for i in present]  # type: ignore[index]
                d = [x.reshape(-1) for x in self._update_direction_list(mains, first, finite)]
                cross = torch.stack([(f @ dl).to(gram_dtype) for f, dl in zip(flats, d)]).sum(0)
                dd = torch.stack([torch.dot(dl, dl).to(gram_dtype) for dl in d]).sum(0)
                return cross, dd, d

            weights, stats, direction = self._decide(layer_gram, names, (), losses_finite, direction_fn)
            w, wd = _split_weights(weights, num_tasks, direction is None)
            for b, i in enumerate(present):
                p, f = shared[i], flats[b]
                wf = w.to(f.dtype)
                grad = p.grad
                if grad is None or not grad.is_contiguous() or grad.dtype != f.dtype:
                    _accumulate_grad(p, (wf @ f).view(p.shape))
                else:
                    grad.view(-1).addmv_(f.mT, wf)
                if wd is not None and direction is not None:
                    p.grad.add_((direction[b] * wd.to(direction[b].dtype)).view(p.shape).to(p.grad.dtype))  # type: ignore[union-attr]
            self._reuse = (weights.detach(), stats, present) if self.every_n_steps > 1 else None
            return stats
        assert grads.rows is not None
        rows = grads.rows
        weights, stats, direction = self._decide_rows(rows, present, names, losses_finite)
        w, wd = _split_weights(weights, num_tasks, direction is None)
        # Per task, one multi-tensor pass: grad += w_k * g_k (the first term initialises .grad).
        targets: list[list[Tensor]] = [[] for _ in range(num_tasks + 1)]
        sources: list[list[Tensor]] = [[] for _ in range(num_tasks + 1)]
        cast: dict[tuple[int, torch.dtype], Tensor] = {}

        def coef(k: int, dtype: torch.dtype) -> Tensor:
            c = cast.get((k, dtype))
            if c is None:
                c = cast[(k, dtype)] = (w[k] if k < num_tasks else wd).to(dtype)  # type: ignore[union-attr]
            return c

        for b, i in enumerate(present):
            p = shared[i]
            col = [(k, rows[k][i]) for k in range(num_tasks) if rows[k][i] is not None]
            start = 0
            if p.grad is None:
                k0, g0 = col[0]
                p.grad = torch.mul(g0, coef(k0, g0.dtype)).to(p.dtype)
                start = 1
            for k, g in col[start:]:
                targets[k].append(p.grad)
                sources[k].append(g if g.dtype == p.grad.dtype else g.to(p.grad.dtype))
            if wd is not None and direction is not None:
                targets[num_tasks].append(p.grad)
                sources[num_tasks].append(direction[b].view(p.shape).to(p.grad.dtype))
        for k, (t, src) in enumerate(zip(targets, sources)):
            if t:
                torch._foreach_addcmul_(t, src, [coef(k, x.dtype) for x in t])
        self._reuse = (weights.detach(), stats, present) if self.every_n_steps > 1 else None
        return stats

    def _decide_rows(
        self, rows: list[list[Tensor | None]], present: list[int], names: list[str], losses_finite: Tensor
    ) -> tuple[Tensor, GateStats, list[Tensor] | None]:
        num_tasks = len(rows)
        ref = next(r[present[0]] for r in rows if r[present[0]] is not None)
        gram_dtype = _stat_dtype(ref.dtype)
        zero = torch.zeros((), dtype=gram_dtype, device=ref.device)
        layer_gram = torch.stack([_rows_gram([r[i] for r in rows], zero) for i in present])

        def direction_fn(first: Tensor, finite: Tensor) -> tuple[Tensor, Tensor, list[Tensor]]:
            mains = []
            for i in present:
                g = rows[0][i]
                if g is None:
                    other = next(r[i] for r in rows if r[i] is not None)
                    g = torch.zeros_like(other)
                mains.append(g)
            d = self._update_direction_list(mains, first, finite)
            cross = torch.stack(
                [
                    torch.stack([zero if r[i] is None else _dot(r[i], dl).to(gram_dtype) for r in rows])
                    for i, dl in zip(present, d)
                ]
            ).sum(0)
            dd = torch.stack([_dot(dl, dl).to(gram_dtype) for dl in d]).sum(0)
            return cross, dd, d

        del num_tasks
        return self._decide(layer_gram, names, (), losses_finite, direction_fn)

    def combine(
        self,
        main: Tensor | Sequence[Tensor],
        aux: Sequence[Tensor | Sequence[Tensor]] | Mapping[str, Tensor | Sequence[Tensor]],
        batch_dims: int = 0,
    ) -> tuple[Tensor | list[Tensor], GateStats]:
        """Apply the rule to given update vectors (not necessarily gradients of a loss).

        ``main`` is a tensor or a list of tensors (e.g. one per parameter); each auxiliary entry
        has the same structure and shapes. The first ``batch_dims`` dimensions of every tensor
        index independent problems (e.g. one gridworld each), each gated on its own with its own
        state. Returns the combined update, in ``main``'s structure, and the statistics.

        Example::

            update, stats = gate.combine(policy_gradient, {"distill": distillation_gradient})
        """
        main_list, single = _as_list(main)
        if isinstance(aux, Mapping):
            names = [str(n) for n in aux.keys()]
            aux_items = list(aux.values())
        else:
            aux_items = list(aux)
            names = [f"aux{i}" for i in range(len(aux_items))]
        if not aux_items:
            raise ValueError("combine() needs at least one auxiliary vector.")
        aux_lists = []
        for name, a in zip(names, aux_items):
            a_list, _ = _as_list(a)
            if len(a_list) != len(main_list) or any(x.shape != m.shape for x, m in zip(a_list, main_list)):
                raise ValueError(
                    f"Auxiliary vector {name!r} has shapes {[tuple(x.shape) for x in a_list]} but the main "
                    f"vector has {[tuple(m.shape) for m in main_list]}; they must match tensor for tensor."
                )
            aux_lists.append(a_list)
        for m in main_list:
            if m.dim() < batch_dims:
                raise ValueError(f"batch_dims={batch_dims} but a tensor has only {m.dim()} dimensions.")
        stacked = [torch.stack([m] + [a[i] for a in aux_lists], dim=batch_dims) for i, m in enumerate(main_list)]
        self._check_names(names)
        combined, stats = self._combine_stacked(stacked, names, batch_dims=batch_dims)
        return (combined[0] if single else combined), stats

    def open_fraction(self) -> Tensor:
        """Fraction of measured steps on which each auxiliary task's gate was open."""
        return self.open_steps.to(torch.float32) / self.measured_steps.clamp(min=1).to(torch.float32)

    def extra_metrics(self) -> dict[str, Tensor]:
        """Extra scalar state to log, ``{name: 0-d tensor}``; :class:`GradSimMonitor` logs each as
        ``gradsim/<name>``. Empty here; loss weightings return e.g. ``task_weight/<task>``."""
        return {}

    def reset_state(self) -> None:
        """Forget the smoothed cosine, the main-gradient EMA and the counters."""
        self.cosine_state = torch.zeros(0, device=self.step.device)
        self.open_steps = torch.zeros(0, dtype=torch.long, device=self.step.device)
        for name in list(self._direction_buffer_names()):
            delattr(self, name)
        self._num_direction_buffers = 0
        for b in (self.measured_steps, self.skipped_steps, self.step):
            b.zero_()
        self._reuse = None
        self._calls = 0

    def extra_repr(self) -> str:
        return (
            f"rule={self.rule_name!r}, aux_weight={self.aux_weight}, threshold={self.threshold}, "
            f"cosine_ema={self.cosine_ema}, main_grad_ema={self.main_grad_ema}, per_layer={self.per_layer}, "
            f"similarity={self.similarity!r}, every_n_steps={self.every_n_steps}"
        )

    # ------------------------------------------------------------------ state
    def get_extra_state(self) -> Any:
        return {"aux_names": self.aux_names, "generator": self._generator.get_state() if self._generator else None}

    def set_extra_state(self, state: Any) -> None:
        if not state:
            return
        self.aux_names = state.get("aux_names")
        if state.get("generator") is not None:
            self._rng().set_state(state["generator"])

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):  # type: ignore[override]
        # Lazily shaped buffers take the shape of the checkpoint's.
        for name in ("cosine_state", "open_steps"):
            key = prefix + name
            if key in state_dict:
                setattr(self, name, torch.empty_like(state_dict[key], device=getattr(self, name).device))
        n = 0
        while prefix + f"main_grad_ema_{n}" in state_dict:
            n += 1
        for name in list(self._direction_buffer_names()):
            delattr(self, name)
        for i in range(n):
            src = state_dict[prefix + f"main_grad_ema_{i}"]
            self.register_buffer(f"main_grad_ema_{i}", torch.empty_like(src, device=self.step.device))
        self._num_direction_buffers = n
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def _direction_buffer_names(self) -> Iterable[str]:
        return [f"main_grad_ema_{i}" for i in range(self._num_direction_buffers)]

    def _rng(self) -> torch.Generator:
        if self._generator is None:
            self._generator = torch.Generator()
            self._generator.manual_seed(self.seed)
        return self._generator

    # ------------------------------------------------------------------ internals
    def _named_losses(
        self, main_loss: Tensor, aux_losses: Sequence[Tensor] | Mapping[str, Tensor]
    ) -> tuple[list[str], list[Tensor]]:
        if isinstance(aux_losses, Mapping):
            names = [str(n) for n in aux_losses.keys()]
            aux = list(aux_losses.values())
        elif isinstance(aux_losses, Tensor):
            names, aux = ["aux0"], [aux_losses]
        else:
            aux = list(aux_losses)
            names = [f"aux{i}" for i in range(len(aux))]
        if not aux:
            raise ValueError(
                "No auxiliary loss was given: the gate needs at least one. Train with plain backward() "
                "(automatic optimization) when there is no auxiliary task."
            )
        for name, loss in [(MAIN_TASK, main_loss)] + list(zip(names, aux)):
            if not isinstance(loss, Tensor):
                raise TypeError(f"Loss {name!r} must be a torch.Tensor, got {type(loss).__name__}.")
            if loss.numel() != 1:
                raise ValueError(
                    f"Loss {name!r} has shape {tuple(loss.shape)}; the gate needs a scalar loss per task. "
                    "Reduce it first, e.g. loss.mean()."
                )
        if not main_loss.requires_grad:
            raise ValueError(
                "The main loss does not require grad: it must be computed from the model's parameters "
                "(not under torch.no_grad() and not detached)."
            )
        self._check_names(names)
        return names, [main_loss.reshape(())] + [a.reshape(()) for a in aux]

    def _check_names(self, names: list[str]) -> None:
        if MAIN_TASK in names:
            raise ValueError(f"{MAIN_TASK!r} names the main task; give auxiliary tasks other names.")
        if self.aux_names is None:
            if isinstance(self.aux_weight, dict):
                missing = [n for n in names if n not in self.aux_weight]
                extra = [n for n in self.aux_weight if n not in names]
                if missing or extra:
                    raise ValueError(
                        f"aux_weight names tasks {sorted(self.aux_weight)} but the auxiliary tasks are {names}; "
                        "give one weight per auxiliary task name."
                    )
            self.aux_names = list(names)
        elif list(names) != self.aux_names:
            raise ValueError(
                f"The auxiliary tasks changed from {self.aux_names} to {names}; the gate keeps state per task. "
                "Always pass the same tasks in the same order, or call gate.reset_state() and set gate.aux_names = None."
            )

    def _aux_weight_tensor(self, names: list[str], like: Tensor) -> Tensor:
        if isinstance(self.aux_weight, dict):
            values = [self.aux_weight[n] for n in names]
        else:
            values = [self.aux_weight] * len(names)
        key = (tuple(values), like.dtype, like.device)
        cache = self._weight_cache
        if cache is None or cache[0] != key:
            # Built once: no host-to-device copy on every step.
            cache = (key, torch.tensor(values, dtype=like.dtype, device=like.device))
            self._weight_cache = cache
        return cache[1]

    @staticmethod
    def _shared_list(shared_params: Iterable[Tensor]) -> list[Tensor]:
        if isinstance(shared_params, Tensor):
            shared_params = [shared_params]
        params = list(_unique(shared_params))
        trainable = [p for p in params if p.requires_grad]
        if not trainable:
            raise ValueError(
                "shared_params is empty"
                + (" (all of them have requires_grad=False)" if params else "")
                + ": pass the parameters of the backbone the tasks share, e.g. model.trunk.parameters()."
            )
        return trainable

    def _combine_stacked(
        self, stacked: list[Tensor], names: list[str], batch_dims: int, extra_finite: Tensor | None = None
    ) -> tuple[list[Tensor], GateStats]:
        """``stacked[l]``: (*batch, K, *rest) per parameter. Returns combined tensors and stats."""
        num_tasks = stacked[0].shape[batch_dims]
        batch_shape = stacked[0].shape[:batch_dims]
        flat = [s.reshape(batch_shape + (num_tasks, -1)) for s in stacked]
        layer_gram = torch.stack([f @ f.transpose(-1, -2) for f in flat], dim=0)  # (L, *B, K, K)

        def direction_fn(first: Tensor, finite: Tensor) -> tuple[Tensor, Tensor, list[Tensor]]:
            direction = self._update_direction(stacked, batch_dims, first, finite)
            d_flat = [d.reshape(batch_shape + (1, -1)) for d in direction]
            cross = torch.stack([(f * d).sum(-1) for f, d in zip(flat, d_flat)], 0).sum(0)  # (*B, K)
            dd = torch.stack([(d * d).sum((-1, -2)) for d in d_flat], 0).sum(0)  # (*B)
            return cross, dd, direction

        weights, stats, direction = self._decide(layer_gram, names, batch_shape, extra_finite, direction_fn)
        # Combine: sum_v weights[v] * vectors[v].
        combined = []
        for i, s in enumerate(stacked):
            w = weights[..., :num_tasks].reshape(batch_shape + (num_tasks,) + (1,) * (s.dim() - batch_dims - 1))
            c = (w.to(s.dtype) * s).sum(batch_dims)
            if weights.shape[-1] > num_tasks:
                wd = weights[..., num_tasks].reshape(batch_shape + (1,) * (s.dim() - batch_dims - 1)).to(s.dtype)
                d = direction[i] if direction is not None else s.select(batch_dims, 0)
                c = c + wd * d
            combined.append(c)
        return combined, stats

    def _decide(
        self,
        layer_gram: Tensor,
        names: list[str],
        batch_shape: tuple[int, ...],
        extra_finite: Tensor | None,
        direction_fn: Any,
    ) -> tuple[Tensor, GateStats, list[Tensor] | None]:
        """From per-layer Gramians ``(L, *B, K, K)``: rule weights, statistics and state updates.

        ``direction_fn(first, finite) -> (cross (*B, K), dd (*B), direction)`` is called for
        rules that use the main-gradient EMA as direction. Returns ``(weights, stats, direction)``
        (``direction`` is ``None`` when the direction is this step's main vector).
        """
        num_tasks = layer_gram.shape[-1]
        gram = layer_gram.sum(0)
        ref = gram
        finite = torch.isfinite(gram).flatten(-2).all(-1)
        if extra_finite is not None:
            finite = finite & extra_finite
        raw_cos = _cosine_from_gram(layer_gram, per_layer=self.per_layer)  # (*B, K-1)
        self._ensure_state(tuple(batch_shape) + (num_tasks - 1,), ref)
        first = self.measured_steps == 0
        if self.cosine_ema > 0:
            smoothed = torch.where(
                first, raw_cos, self.cosine_ema * self.cosine_state + (1 - self.cosine_ema) * raw_cos
            )
        else:
            smoothed = raw_cos
        direction: list[Tensor] | None = None
        if self.rule.uses_main_direction:
            if self.main_grad_ema > 0:
                cross, dd, direction = direction_fn(first, finite)
            else:
                cross = gram[..., :, 0]
                dd = gram[..., 0, 0]
            top = torch.cat([gram, cross.unsqueeze(-1)], dim=-1)
            bottom = torch.cat([cross, dd.unsqueeze(-1)], dim=-1).unsqueeze(-2)
            rule_gram = torch.cat([top, bottom], dim=-2)
        else:
            rule_gram = gram
        aux_weight = self._aux_weight_tensor(names, ref)
        inp = RuleInput(
            gramian=rule_gram,
            cosine=smoothed,
            raw_cosine=raw_cos,
            aux_weight=aux_weight,
            threshold=self.threshold,
            generator=self._rng(),
        )
        weights = self.rule.weights(inp)
        gate_open = self.rule.gate_open(inp, weights)
        # State: only finite steps count.
        if self.cosine_ema > 0:
            self.cosine_state.copy_(torch.where(finite.unsqueeze(-1), smoothed, self.cosine_state))
        self.open_steps.add_((gate_open & finite.unsqueeze(-1)).long())
        self.measured_steps.add_(finite.all().long())
        self.skipped_steps.add_((~finite.all()).long())
        self.step.add_(1)
        diag = torch.diagonal(gram, dim1=-2, dim2=-1).clamp(min=0).sqrt()
        stats = GateStats(
            cosine=raw_cos.detach(),
            smoothed_cosine=smoothed.detach(),
            weight=weights[..., 1:num_tasks].detach(),
            gate_open=gate_open.detach(),
            main_norm=diag[..., 0].detach(),
            aux_norm=diag[..., 1:].detach(),
            finite=finite.detach(),
        )
        self.last_stats = stats
        return weights, stats, direction

    def _ensure_state(self, shape: tuple[int, ...], like: Tensor) -> None:
        if tuple(self.cosine_state.shape) != tuple(shape):
            if self.cosine_state.numel() and self.measured_steps > 0:
                raise ValueError(
                    f"The gate's state has shape {tuple(self.cosine_state.shape)} (batch + auxiliary tasks) "
                    f"but this step has {tuple(shape)}; call gate.reset_state() to start over."
                )
            self.cosine_state = torch.zeros(shape, dtype=like.dtype, device=like.device)
            self.open_steps = torch.zeros(shape, dtype=torch.long, device=like.device)
        elif self.cosine_state.dtype != like.dtype:
            self.cosine_state = self.cosine_state.to(like.dtype)

    def _update_direction(self, stacked: list[Tensor], batch_dims: int, first: Tensor, finite: Tensor) -> list[Tensor]:
        return self._update_direction_list([s.select(batch_dims, 0) for s in stacked], first, finite)

    def _update_direction_list(self, mains: list[Tensor], first: Tensor, finite: Tensor) -> list[Tensor]:
        """Update the main-gradient EMA buffers (one per entry of ``mains``) and return them."""
        if self._num_direction_buffers != len(mains) or any(
            getattr(self, f"main_grad_ema_{i}").shape != m.shape for i, m in enumerate(mains)
        ):
            for name in list(self._direction_buffer_names()):
                delattr(self, name)
            for i, m in enumerate(mains):
                self.register_buffer(f"main_grad_ema_{i}", torch.zeros_like(m))
            self._num_direction_buffers = len(mains)
        beta = self.main_grad_ema
        out = []
        keep = finite.reshape(finite.shape + (1,) * 0)
        for i, m in enumerate(mains):
            buf = getattr(self, f"main_grad_ema_{i}")
            new = torch.where(first, m, beta * buf + (1 - beta) * m)
            k = keep.reshape(keep.shape + (1,) * (m.dim() - keep.dim()))
            buf.copy_(torch.where(k, new, buf))
            out.append(new)
        return out


def _cosine_from_gram(layer_gram: Tensor, per_layer: bool) -> Tensor:
    """Cosine of each auxiliary vector with the main one from (L, *B, K, K) per-layer Gramians."""
    if per_layer:
        main_sq = layer_gram[..., 0, 0].unsqueeze(-1)  # (L, *B, 1)
        aux_sq = torch.diagonal(layer_gram, dim1=-2, dim2=-1)[..., 1:]  # (L, *B, K-1)
        dots = layer_gram[..., 0, 1:]
        valid = (main_sq > 0) & (aux_sq > 0)
        denom = torch.where(valid, (main_sq * aux_sq).sqrt(), torch.ones_like(aux_sq))
        cos = torch.where(valid, dots / denom, torch.zeros_like(dots))
        count = valid.sum(0)
        return (cos.sum(0) / count.clamp(min=1)).clamp(-1.0, 1.0)
    gram = layer_gram.sum(0)
    main_sq = gram[..., 0, 0].unsqueeze(-1)
    aux_sq = torch.diagonal(gram, dim1=-2, dim2=-1)[..., 1:]
    dots = gram[..., 0, 1:]
    valid = (main_sq > 0) & (aux_sq > 0)
    denom = torch.where(valid, (main_sq * aux_sq).sqrt(), torch.ones_like(aux_sq))
    return torch.where(valid, dots / denom, torch.zeros_like(dots)).clamp(-1.0, 1.0)


def _unique(params: Iterable[Tensor]) -> Iterable[Tensor]:
    seen: set[int] = set()
    for p in params:
        if id(p) not in seen:
            seen.add(id(p))
            yield p


def _accumulate_grad(p: Tensor, g: Tensor) -> None:
    g = g.to(p.dtype)
    if p.grad is None:
        p.grad = g.detach().clone() if g.data_ptr() == p.data_ptr() else g.detach()
    else:
        p.grad.add_(g.detach())


def _sum(tensors: Sequence[Tensor]) -> Tensor:
    total = tensors[0]
    for t in tensors[1:]:
        total = total + t
    return total


def _stat_dtype(dtype: torch.dtype) -> torch.dtype:
    """Gramians and cosines of half-precision gradients are kept in float32."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _dot(a: Tensor, b: Tensor) -> Tensor:
    a = a.reshape(-1)
    b = b.reshape(-1)
    if a.dtype != b.dtype:
        a, b = a.float(), b.float()
    return torch.dot(a, b)


def _rows_gram(col: list[Tensor | None], zero: Tensor) -> Tensor:
    """(K, K) Gramian of one parameter's per-task gradients (``None``: the task does not reach it)."""
    k = len(col)
    if all(c is not None for c in col) and len({c.dtype for c in col}) == 1:  # type: ignore[union-attr]
        # Two kernels: a (K, P) temporary of this one parameter, and its Gramian.
        f = torch.stack([c.reshape(-1) for c in col])  # type: ignore[union-attr]
        return (f @ f.mT).to(zero.dtype)
    entries: list[list[Tensor]] = [[zero] * k for _ in range(k)]
    for i in range(k):
        a = col[i]
        if a is None:
            continue
        for j in range(i, k):
            b = col[j]
            if b is not None:
                v = _dot(a, b).to(zero.dtype)
                entries[i][j] = v
                entries[j][i] = v
    return torch.stack([torch.stack(r) for r in entries])


def _split_weights(weights: Tensor, num_tasks: int, direction_is_main: bool) -> tuple[Tensor, Tensor | None]:
    """Task weights ``(K,)`` and the direction weight (``None`` when folded into the main one)."""
    w = weights[:num_tasks]
    if weights.shape[-1] <= num_tasks:
        return w, None
    if direction_is_main:
        return torch.cat([w[:1] + weights[num_tasks:], w[1:]]), None
    return w, weights[num_tasks]


def _combine_rows(
    rows: list[list[Tensor | None]], present: list[int], weights: Tensor, direction: list[Tensor] | None, num_tasks: int
) -> list[Tensor | None]:
    """``sum_k w_k rows[k][i]`` (+ ``w_d d_i``) for every present ``i``, as new tensors."""
    w, wd = _split_weights(weights, num_tasks, direction is None)
    n = len(rows[0])
    out: list[Tensor | None] = [None] * n
    for b, i in enumerate(present):
        acc: Tensor | None = None
        for k in range(num_tasks):
            g = rows[k][i]
            if g is None:
                continue
            acc = torch.mul(g, w[k].to(g.dtype)) if acc is None else acc.addcmul_(g, w[k].to(g.dtype))
        assert acc is not None
        if wd is not None and direction is not None:
            acc.addcmul_(direction[b].view(acc.shape).to(acc.dtype), wd.to(acc.dtype))
        out[i] = acc
    return out


def _check_features_cut(losses: Sequence[Tensor], feats: Sequence[Tensor], shared: Sequence[Tensor]) -> None:
    """Raise unless every path from the losses to a shared parameter goes through ``feats``."""
    stop = {f.grad_fn for f in feats if f.grad_fn is not None}
    shared_ids = {id(p) for p in shared}
    feat_ids = {id(f) for f in feats}
    seen: set = set()
    for k, loss in enumerate(losses):
        stack = [loss.grad_fn] if loss.grad_fn is not None else []
        while stack:
            node = stack.pop()
            if node in seen or node in stop:
                continue
            seen.add(node)
            variable = getattr(node, "variable", None)
            if variable is not None:
                if id(variable) in shared_ids and id(variable) not in feat_ids:
                    task = "the main loss" if k == 0 else f"auxiliary loss #{k}"
                    raise ValueError(
                        f"With similarity='features', {task} reaches a shared parameter (shape "
                        f"{tuple(variable.shape)}) without going through the marked features. Mark every "
                        "trunk output the heads read with gate.mark_features(h), and give all tasks the same "
                        "features; tasks with their own batches should use similarity='parameters' (which "
                        "costs no extra backward for them)."
                    )
                continue
            for next_node, _ in node.next_functions:
                if next_node is not None:
                    stack.append(next_node)
