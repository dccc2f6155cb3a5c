"""The gradient-similarity gate (Du et al., *Adapting Auxiliary Losses Using Gradient Similarity*).

``GradientGate`` orchestrates one step: losses (through a loss weighting, if any) -> per-task
gradients (:mod:`~lightning_gradsim.core.gradients`) -> gradient transforms
(:mod:`~lightning_gradsim.core.transforms`) -> per-layer Gramian
(:class:`~lightning_gradsim.core.task_gradients.TaskGradients`) -> (reduce) -> rule and state
(:mod:`~lightning_gradsim.core.weights`, :mod:`~lightning_gradsim.core.state`) -> apply the weights into
``.grad``. See ``docs/architecture.md``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn  # noqa: F401  (the examples use nn)

from ..rules import Rule, get_rule
from .checkpoint import CheckpointedGate
from .gradients import STRATEGIES, per_task_gradients
from .graph import walk_graph
from .loss_weighting import LossWeighting, check_aux_weight
from .options import (
    MAIN_TASK,
    GateConfig,
    as_list,
    aux_weight_values,
    cached_tensor,
    check_dtensor_inputs,
    check_names,
    check_options,
    check_per_tensor,
    check_reference,
    check_transforms,
    check_update_vectors,
    named_losses,
    other_parameters,
    shared_list,
    warn_unreached,
    weigh,
    with_reference,
)
from .state import GateState
from .stats import GateStats
from .step import GateStep, combine_vectors
from .streams import check_keys
from .tensor_ops import is_dtensor
from .transforms import GradientTransform, Transforms, as_transforms

__all__ = ["GradientGate", "GateStats", "MAIN_TASK"]


class GradientGate(CheckpointedGate):
    """Combine a main gradient with auxiliary ones, using each auxiliary only while it helps.

    At each step the gate measures the cosine between the main task's gradient and each auxiliary
    task's gradient on the shared parameters, and combines them with a rule (see
    :mod:`lightning_gradsim.rules`): ``unweighted`` (the paper's default: add ``lambda * g_aux``
    iff ``cos >= threshold``), ``weighted`` (scale by ``max(0, cos)``), ``projection`` (remove the
    component that conflicts with the main direction), ``sum`` and ``main_only`` (baselines),
    ``pcgrad``, or any rule you register. Each auxiliary task is gated against the main one on its own.

    The state (smoothed cosine, main-gradient EMA, counters, see :class:`~lightning_gradsim.core.state.GateState`)
    is the submodule ``state``, so it is part of ``state_dict`` and of Lightning checkpoints.

    Args:
        rule: a registered rule name or a :class:`~lightning_gradsim.rules.Rule` instance.
        aux_weight: lambda (finite, >= 0), one number for every auxiliary task or a mapping from
            task name to number (every auxiliary task must then be named).
        threshold: the cosine (in [-1, 1]) at or above which an auxiliary gradient is used.
        cosine_ema: EMA factor ``beta`` of the cosine, ``s_t = beta s_{t-1} + (1 - beta) cos_t``
            (``s_0 = cos_0``); the rule uses ``s_t``. 0 uses this step's cosine.
        main_grad_ema: EMA factor of the main gradient used as the ``projection`` direction,
            ``d_t = beta d_{t-1} + (1 - beta) g_t`` (``d_0 = g_0``). 0 uses this step's gradient.
            (A blog's ``M_t = alpha g_t + (1 - alpha) M_{t-1}`` is ``main_grad_ema = 1 - alpha``.)
        per_layer: measure the cosine per shared parameter tensor and average over the tensors on
            which both gradients are non-zero (the paper's Atari setup) instead of over the
            concatenated vector.
        seed: integer seed of the generator handed to rules that draw random numbers.
        similarity: ``"parameters"`` (default, exact: the cosine of the shared parameters'
            gradients; one extra backward through the trunk per auxiliary task when the tasks share
            one forward pass, nothing extra when each task has its own batch) or ``"features"``
            (the cosine of the gradients of the shared *features* marked with :meth:`mark_features`
            or passed as ``backward(..., features=h)``; only the heads are differentiated per task,
            then one backward runs through the trunk with the gated feature gradient: exactly
            ``sum_k w_k g_k`` on the trunk for linear rules, ``projection`` projects in feature space).
        every_n_steps: measure every ``k`` calls of :meth:`backward` and reuse the last measured
            weights in between (a single weighted backward on those steps). ``last_stats`` is only
            updated when measuring (or when a reused step is skipped as non-finite).
        loss_weighting: a :class:`~lightning_gradsim.loss_weighting.LossWeighting` (uncertainty
            weighting, GradNorm, yours) weighting the task losses before the gate sees them.

    Speed notes: see ``docs/speed.md``. How per-task gradients are taken (``"auto"``) can be forced
    with the attribute ``gate.grad_strategy`` (``"separate"``, ``"batched"``, ``"sequential"``).

    >>> trunk, head, aux_head = nn.Linear(3, 4), nn.Linear(4, 1), nn.Linear(4, 1)
    >>> h = trunk(torch.ones(2, 3))
    >>> gate = GradientGate(rule="unweighted", aux_weight=0.5)
    >>> stats = gate.backward(head(h).pow(2).mean(), {"rotated": aux_head(h).mean()}, trunk.parameters())
    >>> stats.gate_open.shape, trunk.weight.grad.shape, head.weight.grad is not None
    (torch.Size([1]), torch.Size([4, 3]), True)
    """

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
        loss_weighting: LossWeighting | None = None,
    ) -> None:
        super().__init__()
        self.rule = get_rule(rule)
        self.aux_weight = check_aux_weight(aux_weight)
        check_options(threshold, cosine_ema, main_grad_ema, seed, similarity, every_n_steps, loss_weighting)
        check_per_tensor(self.rule, similarity, every_n_steps)
        self.threshold, self.cosine_ema, self.main_grad_ema = float(threshold), float(cosine_ema), float(main_grad_ema)
        self.per_layer, self.seed = bool(per_layer), int(seed)
        self.similarity, self.every_n_steps = similarity, every_n_steps
        self.loss_weighting = loss_weighting
        #: The state (cosine and direction EMAs, counters, the cosine's moments, reused weights): a submodule.
        self.state = GateState(seed=self.seed)
        #: How per-task gradients are taken: "auto", "separate", "batched" or "sequential".
        self.grad_strategy = "auto"
        #: The auxiliary tasks' names, fixed by the first step (checkpointed).
        self.aux_names: list[str] | None = None
        self._last_stats: GateStats | None = None
        self._features: list[Tensor] | None = None
        self._weight_cache: dict[tuple[Any, ...], Tensor] = {}
        self._grad_state: dict[str, bool] = {}
        self._warned_unreached: set[str] = set()

    @property
    def config(self) -> GateConfig:
        """The settings a step reads (built from the attributes at each call: changing one applies next step)."""
        return GateConfig(*(getattr(self, name) for name in GateConfig._fields))

    @property
    def rule_name(self) -> str:
        """The rule's registered name (or its class name)."""
        return self.rule.name or type(self.rule).__name__

    @property
    def last_stats(self) -> GateStats | None:
        """The statistics of the last measured step (restored with the reused weights on resume)."""
        if self._last_stats is None and self.state.reuse is not None:
            reused: GateStats = self.state.reuse.stats
            return reused
        return self._last_stats

    @last_stats.setter
    def last_stats(self, stats: GateStats | None) -> None:
        self._last_stats = stats

    # ------------------------------------------------------------------ public API
    def backward(
        self,
        main_loss: Tensor,
        aux_losses: Sequence[Tensor] | Mapping[str, Tensor],
        shared_params: Iterable[Tensor],
        other_params: Iterable[Tensor] | None = None,
        features: Tensor | Sequence[Tensor] | None = None,
        transforms: Transforms | Iterable[GradientTransform] | None = None,
        reference_loss: Tensor | None = None,
    ) -> GateStats | None:
        """Gate-combine the tasks' gradients on ``shared_params`` and accumulate them into ``.grad``.

        Every other parameter reached by the losses (``other_params``, or found in the autograd
        graph when ``None``) gets the gradient that plain ``backward`` of its own task's loss
        gives it, accumulated into ``.grad``. Returns this step's :class:`GateStats` (check
        ``stats.finite`` before stepping: a NaN/inf anywhere is reported there, and the state is
        left alone), or ``None`` when a transform kept the gradients (``"pending"``).

        ``features``: with ``similarity="features"``, the shared features the heads read (else
        the ones marked with :meth:`mark_features`). ``transforms``: the step's gradient
        transforms (:mod:`lightning_gradsim.core.transforms`; the mixin passes them).
        ``reference_loss``: the main task's loss on a held-out batch. Each auxiliary gradient's cosine, and so
        the rule's decision, is then measured against this loss's gradient on ``shared_params`` (for
        ``projection`` it is the direction) while the update is still ``g_main + sum_k w_k g_k``; its gradient
        touches no ``.grad``. One more backward through the trunk, on measured steps only.

        >>> w = nn.Parameter(torch.tensor([1.0, 2.0]))
        >>> stats = GradientGate(aux_weight=0.5).backward(0.5 * w.pow(2).sum(), [0.5 * (w - 3).pow(2).sum()], [w])
        >>> w.grad, stats.gate_open  # the auxiliary gradient (-2, -1) conflicts with (1, 2): closed
        (tensor([1., 2.]), tensor([False]))
        """
        pipeline = as_transforms(transforms)
        pipeline.calls += 1
        if pipeline.calls > 1:
            raise RuntimeError("A Transforms pipeline serves one gate.backward() call; build one per step.")
        marked, self._features = self._features, None
        names, losses = named_losses(main_loss, aux_losses)
        check_reference(reference_loss, self.similarity, self.rule)
        self.aux_names = check_names(names, self.aux_names, self.aux_weight)
        shared = shared_list(shared_params)
        check_transforms(pipeline, self.similarity, self.every_n_steps)
        lw, scale = self.loss_weighting, None
        raw = torch.stack([loss.detach() for loss in losses])
        if lw is not None:
            lw.check(names, shared)
            losses, scale = weigh(lw, names, losses)
        measure = self.state.next_call(self.every_n_steps)
        others, info = other_parameters(losses, shared, other_params, lw)
        aux_weight = self.aux_weight_tensor(names, raw)
        ref = reference_loss is not None and measure
        step = GateStep(self.config, self.state, aux_weight, names, losses, raw, scale, shared, others, pipeline, ref)
        if any(is_dtensor(p) for p in shared):  # FSDP2: autograd.grad cannot reach the shards; .grad has them
            check_dtensor_inputs(
                pipeline, other_params is not None, self.similarity, self.every_n_steps, lw, reference_loss
            )
            return self._measured(
                step.measured(
                    per_task_gradients(
                        losses, shared, others, "backward", on_task=pipeline.task_ready if pipeline else None
                    )
                )
            )
        if not measure:
            return step.reused()
        if self.similarity == "features":
            return self._measured(step.features(as_list(features)[0] if features is not None else marked))
        if ref:  # the reference as a last task: reduced and accumulated with the others, on shared only
            losses, info = with_reference(losses, reference_loss, shared)  # type: ignore[arg-type]
        if info is None:
            info = walk_graph(losses, shared)
        if not info.reaches_shared[0]:
            raise ValueError(
                "The main loss does not depend on any shared parameter: shared_params (the mixin's "
                "shared_parameters()) must be the backbone parameters that the main head reads from."
            )
        if self.grad_strategy not in STRATEGIES:
            raise ValueError(f"gate.grad_strategy must be one of {STRATEGIES}, got {self.grad_strategy!r}.")
        grads = per_task_gradients(
            losses,
            shared,
            others,
            self.grad_strategy,
            info,
            state=self._grad_state,
            on_task=pipeline.task_ready if pipeline else None,
            head_tasks=len(names) + 1,
        )
        warn_unreached(names, grads.reached[: len(names) + 1], self._warned_unreached)
        return self._measured(step.measured(grads))

    def _measured(self, stats: GateStats | None) -> GateStats | None:
        """A measured step's statistics become :attr:`last_stats` (``None``: a transform kept the gradients)."""
        if stats is not None:
            self.last_stats = stats
        return stats

    def mark_features(self, features: Tensor) -> Tensor:
        """Mark the shared features (trunk output) for ``similarity="features"``; returns them.

        Call it in ``task_losses`` (or before :meth:`backward`) on every tensor the heads read
        from the trunk; the next :meth:`backward` uses and forgets them.

        >>> gate = GradientGate(similarity="features")
        >>> trunk, heads = nn.Linear(3, 4), [nn.Linear(4, 1), nn.Linear(4, 1)]
        >>> h = gate.mark_features(trunk(torch.ones(2, 3)))
        >>> stats = gate.backward(heads[0](h).mean(), [heads[1](h).mean()], trunk.parameters())
        >>> trunk.weight.grad.shape
        torch.Size([4, 3])
        """
        if not isinstance(features, Tensor):
            raise TypeError(f"mark_features() takes a tensor, got {type(features).__name__}.")
        if self._features is None:
            self._features = []
        self._features.append(features)
        return features

    def combine(
        self,
        main: Tensor | Sequence[Tensor],
        aux: Sequence[Tensor | Sequence[Tensor]] | Mapping[str, Tensor | Sequence[Tensor]],
        batch_dims: int = 0,
        reference: Tensor | Sequence[Tensor] | None = None,
        weights_applied: bool = False,
        problem_keys: Sequence[int] | None = None,
    ) -> tuple[Tensor | list[Tensor], GateStats]:
        """Apply the rule to given update vectors (not necessarily gradients of a loss).

        ``main`` is a tensor or a list of tensors (e.g. one per parameter); each auxiliary entry
        has the same structure and shapes. The first ``batch_dims`` dimensions of every tensor
        index independent problems (e.g. one gridworld each), each gated on its own with its own
        state. ``reference``: a vector of the same structure to measure the cosines against instead of
        ``main`` (a held-out estimate of the main direction); the update is still ``main + sum_k w_k aux_k``.
        ``weights_applied``: the vectors already carry this gate's loss weighting (the caller scaled them and
        tells the weighting what it saw); a gate with a ``loss_weighting`` combines vectors only then.
        ``problem_keys``: one int per problem (the batch flattened): a random rule draws each problem's numbers
        from its own stream keyed by (``seed``, key, finite steps so far), not by its place in the batch.
        Returns the combined update, in ``main``'s structure, and the statistics.

        >>> main, aux = torch.tensor([1.0, 0.0]), {"distill": torch.tensor([1.0, 1.0])}
        >>> update, stats = GradientGate(rule="weighted").combine(main, aux)
        >>> update, stats.weight
        (tensor([1.7071, 0.7071]), tensor([0.7071]))
        """
        if self.loss_weighting is not None and not weights_applied:
            raise NotImplementedError(
                f"This gate weights task *losses* ({type(self.loss_weighting).__name__}); it has no combine() on given "
                "vectors. Call gate.backward(main_loss, aux_losses, shared_params) (the mixin does), or scale the "
                "vectors by the weighting yourself and pass weights_applied=True."
            )
        names, main_list, aux_lists, single = check_update_vectors(main, aux, batch_dims)
        keys = None if problem_keys is None else check_keys(problem_keys, math.prod(main_list[0].shape[:batch_dims]))
        if reference is not None:  # measured against, never added: the last stacked vector
            _, _, (ref_list,), _ = check_update_vectors(main, [reference], batch_dims)
            aux_lists = [*aux_lists, ref_list]
        self.aux_names = check_names(names, self.aux_names, self.aux_weight)
        aux_weight = self.aux_weight_tensor(names, main_list[0])
        combined, stats = combine_vectors(
            self.config, self.state, names, main_list, aux_lists, batch_dims, aux_weight, reference is not None, keys
        )
        self.last_stats = stats
        return (combined[0] if single else combined), stats  # type: ignore[return-value]

    def open_fraction(self) -> Tensor:
        """Fraction of measured steps on which each auxiliary task's gate was open."""
        return self.state.open_steps.to(torch.float32) / self.state.measured_steps.clamp(min=1).to(torch.float32)

    def extra_metrics(self) -> dict[str, Tensor]:
        """Extra scalar state to log, ``{name: 0-d tensor}``; :class:`GradSimMonitor` logs each as
        ``gradsim/<name>``: the loss weighting's (e.g. ``task_weight/<task>``), else nothing."""
        if self.loss_weighting is None:
            return {}
        return self.loss_weighting.extra_metrics([MAIN_TASK] + list(self.aux_names or []))  # type: ignore[no-any-return]

    def reset_state(self) -> None:
        """Forget the smoothed cosine, the main-gradient EMA, the counters (and a loss weighting's adapted state)."""
        self.state.reset()
        for reset in (getattr(part, "reset", None) for part in (self.rule, self.loss_weighting)):
            if callable(reset):  # a stateful rule (GradVac's targets), a loss weighting
                reset()

    def extra_repr(self) -> str:
        return (
            f"rule={self.rule_name!r}, aux_weight={self.aux_weight}, threshold={self.threshold}, "
            f"cosine_ema={self.cosine_ema}, main_grad_ema={self.main_grad_ema}, per_layer={self.per_layer}, "
            f"similarity={self.similarity!r}, every_n_steps={self.every_n_steps}"
        )

    def aux_weight_tensor(self, names: list[str], like: Tensor) -> Tensor:
        """The lambdas of the auxiliary ``names`` on ``like``'s device, in float32 or wider (cached: no copy
        per step)."""
        return cached_tensor(self._weight_cache, aux_weight_values(self.aux_weight, names), like)
