"""Shared machinery of the loss-weighting baselines (uncertainty weighting, GradNorm)."""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Mapping, Sequence

import torch
from torch import Tensor

from ..gate import MAIN_TASK, GateStats, GradientGate
from ..rules import Rule, RuleInput

__all__ = ["LossWeightingGate", "drop_cosine_options"]

#: Options of the cosine gate that a loss weighting has no use for.
COSINE_OPTIONS = ("threshold", "cosine_ema", "main_grad_ema", "per_layer")


def drop_cosine_options(method: str, kwargs: dict) -> dict:
    """Remove the cosine gate's options from ``kwargs`` with a warning (for ``make_gate`` factories).

    ``gradsim compare --gate threshold=0.1`` passes the same gate options to every method; a loss
    weighting has no cosine threshold, so it ignores them instead of failing the comparison.
    """
    dropped = {k: kwargs.pop(k) for k in list(kwargs) if k in COSINE_OPTIONS}
    if dropped:
        warnings.warn(
            f"{method!r} ignores the cosine-gate option(s) {dropped} (it weights losses).", UserWarning, stacklevel=3
        )
    return kwargs


class _UnitSum(Rule):
    """Sum of the (already weighted) task gradients; measures statistics so per-task gradients exist."""

    name = "loss_weighting"
    keeps_main_descent = False
    needs_statistics = True

    def weights(self, inp: RuleInput) -> Tensor:
        return inp.with_main(torch.ones_like(inp.cosine))


class LossWeightingGate(GradientGate):
    """A :class:`GradientGate` whose update is ``sum_i w_i * lambda_i * grad L_i`` with learned/adapted ``w``.

    Subclasses implement :meth:`loss_weights` (``(K,)`` weights on [main, aux...], may carry
    autograd history for terms that train parameters) and optionally :meth:`extra_loss` and
    :meth:`_after_step`. The gate still measures the per-task gradients on the shared
    parameters, so ``GateStats`` (cosines, norms) are comparable with the gate rules; the
    ``weight`` field is the coefficient applied to each raw auxiliary gradient (``w_aux *
    lambda_aux``) and the norms are those of the *weighted* task gradients. Heads (other
    parameters) get the gradient of the weighted loss of their task, as plain backward of
    ``sum_i w_i lambda_i L_i`` would give them.
    """

    def __init__(self, aux_weight: float | Mapping[str, float] = 1.0, seed: int = 0) -> None:
        super().__init__(rule=_UnitSum(), aux_weight=aux_weight, seed=seed)

    # ------------------------------------------------------------------ subclass hooks
    def loss_weights(self, num_tasks: int, like: Tensor) -> list[Tensor]:
        """The ``K`` weights ``w`` on [main, aux...] for this step, as 0-d tensors.

        Compute each from its own graph nodes (e.g. ``exp(-s[i])`` per task, not one ``exp(-s)``
        unbound): tasks that share autograd nodes make the gate take its slower shared-graph path.
        """
        raise NotImplementedError

    def extra_loss(self, like: Tensor) -> Tensor | None:
        """A term added to the total loss that reaches no model parameter (e.g. regularisers)."""
        return None

    def own_parameters(self) -> list[Tensor]:
        """Parameters of the weighting itself that the user's optimizer trains."""
        return [p for p in self.parameters() if p.requires_grad]

    def _after_step(self, losses: Tensor, weights: Tensor, finite: Tensor) -> None:
        """Called after the gradients are written (``losses``: ``(K,)`` raw, detached)."""

    # ------------------------------------------------------------------ gate API
    def lambda_values(self, names: Sequence[str]) -> list[float]:
        """The ``K`` fixed prior weights: 1 for the main task, ``aux_weight`` for the auxiliary ``names``."""
        if isinstance(self.aux_weight, dict):
            return [1.0] + [float(self.aux_weight[n]) for n in names]
        return [1.0] + [float(self.aux_weight)] * len(names)

    def lambdas(self, names: Sequence[str], like: Tensor) -> Tensor:
        """:meth:`lambda_values` as a ``(K,)`` tensor like ``like``."""
        return torch.tensor(self.lambda_values(names), dtype=like.dtype, device=like.device)

    def backward(
        self,
        main_loss: Tensor,
        aux_losses: Sequence[Tensor] | Mapping[str, Tensor],
        shared_params: Iterable[Tensor],
        other_params: Iterable[Tensor] | None = None,
    ) -> GateStats:
        """Weight the task losses, accumulate the weighted gradients into ``.grad``, update the weights.

        Same contract as :meth:`GradientGate.backward`; the weighting's own parameters (e.g.
        log-variances) always get their gradient too.

        Example::

            stats = gate.backward(main_loss, {"rotated": aux_loss}, model.trunk.parameters())
        """
        names, losses = self._named_losses(main_loss, aux_losses)
        like = losses[0].detach()
        if not like.is_floating_point():
            like = like.float()
        weight_terms = self.loss_weights(len(losses), like)
        weights = torch.stack([w.detach() for w in weight_terms])
        lam = self.lambdas(names, weights)
        weighted = [w * l * loss for w, l, loss in zip(weight_terms, self.lambda_values(names), losses)]
        extra = self.extra_loss(weights)
        if extra is not None:
            weighted[0] = weighted[0] + extra  # regulariser: reaches only the weighting's own parameters
        if other_params is not None:
            other_params = list(other_params) + self.own_parameters()
        raw = torch.stack([loss.detach() for loss in losses])
        # The gate with a unit-weight sum rule does the rest (per-task statistics, DDP and
        # accumulation hooks, heads): the weights are inside the losses.
        stats = super().backward(weighted[0], dict(zip(names, weighted[1:])), shared_params, other_params)
        applied = (weights * lam)[1:]
        stats = stats._replace(weight=applied, gate_open=applied > 0)
        self.last_stats = stats
        finite = stats.finite & torch.isfinite(raw).all() & torch.isfinite(weights).all()
        self._after_step(raw, weights, finite)
        return stats

    def combine(self, main, aux, batch_dims: int = 0):  # type: ignore[override]
        raise NotImplementedError(
            f"{type(self).__name__} weights task *losses*; it has no combine() on given vectors. "
            "Call gate.backward(main_loss, aux_losses, shared_params) (the mixin does)."
        )

    def _task_names(self) -> list[str]:
        return [MAIN_TASK] + list(self.aux_names or [])
