"""GradNorm (Chen et al., ICML 2018): adapt task weights so the tasks train at similar rates.

With weights ``w_i`` (main included) the model is trained on ``sum_i w_i lambda_i L_i``. After each
step, with ``W`` the last shared layer's parameters:

* ``G_i = |grad_W w_i lambda_i L_i|`` (weighted gradient norm), ``G_bar = mean_i G_i``;
* ``r_i = (L_i / L_i(0)) / mean_j (L_j / L_j(0))`` (relative inverse training rate);
* ``L_grad = sum_i |G_i - G_bar r_i^alpha|`` with the target ``G_bar r_i^alpha`` held constant, so
  ``d L_grad / d w_i = sign(G_i - G_bar r_i^alpha) * |grad_W lambda_i L_i|``;
* ``w <- max(0, w - lr * d L_grad / d w)``, then ``w <- K w / sum(w)`` (sum to the number of tasks).

The weights are buffers updated by this gate (plain gradient descent with ``lr``), not by your
optimizer. ``L_i(0)`` are the losses at the first finite step.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from torch import Tensor

from ..gate import GateStats
from ..methods import register_method
from ._weighting import LossWeightingGate, drop_cosine_options

__all__ = ["GradNorm", "default_last_shared_layer"]


def default_last_shared_layer(shared: list[Tensor]) -> list[int]:
    """Indices into ``shared`` of the default "last shared layer".

    The last parameter tensor with at least 2 dimensions (a weight matrix or kernel) and every
    tensor after it (its bias, a following norm layer's affine parameters). If all tensors are
    1-D, the last one.
    """
    for i in range(len(shared) - 1, -1, -1):
        if shared[i].dim() >= 2:
            return list(range(i, len(shared)))
    return [len(shared) - 1]


class GradNorm(LossWeightingGate):
    """GradNorm task weighting (Chen et al., 2018) as a drop-in for the gate.

    Args:
        alpha: the asymmetry ``alpha`` (1.5 as in the paper's default; 0 pulls all weighted
            gradient norms to their mean).
        lr: learning rate of the weights' gradient-descent update.
        last_shared_layer: the parameters ``W`` on which gradient norms are measured (they must be
            among the shared parameters). Default: :func:`default_last_shared_layer` of the shared
            parameters passed to :meth:`backward`, in their order.
        aux_weight: fixed prior ``lambda`` multiplying the auxiliary losses throughout (the
            adapted weights ``w`` start at 1 and multiply ``lambda_i L_i``).
        seed: unused (kept for a uniform ``make_gate`` signature).

    Buffers: ``task_weights`` ``(K,)`` (``[w_main, w_aux...]``), ``initial_losses`` ``(K,)``,
    ``weight_updates`` (count). Logged by :class:`~lightning_gradsim.GradSimMonitor` as
    ``gradsim/task_weight/<task>`` (``w_i``) for ``main`` and every auxiliary task.

    Example::

        self.gradsim = GradNorm(alpha=1.5, last_shared_layer=self.trunk[-2].parameters())
    """

    task_weights: Tensor
    initial_losses: Tensor
    weight_updates: Tensor

    def __init__(
        self,
        alpha: float = 1.5,
        lr: float = 0.025,
        last_shared_layer: Iterable[Tensor] | None = None,
        aux_weight: float | Mapping[str, float] = 1.0,
        seed: int = 0,
    ) -> None:
        super().__init__(aux_weight=aux_weight, seed=seed)
        if not float(lr) > 0:
            raise ValueError(f"lr must be > 0, got {lr}.")
        self.alpha = float(alpha)
        self.lr = float(lr)
        self._last_layer = None if last_shared_layer is None else list(last_shared_layer)
        if self._last_layer is not None and not self._last_layer:
            raise ValueError("last_shared_layer is empty: pass the parameters of the last shared layer, or None.")
        self.register_buffer("task_weights", torch.zeros(0))
        self.register_buffer("initial_losses", torch.zeros(0))
        self.register_buffer("weight_updates", torch.zeros((), dtype=torch.long))

    def loss_weights(self, num_tasks: int, like: Tensor) -> list[Tensor]:
        if self.task_weights.numel() != num_tasks:
            if self.weight_updates > 0:
                raise ValueError(
                    f"GradNorm has weights for {self.task_weights.numel()} tasks but got {num_tasks}; "
                    "call gate.reset_state() to start over."
                )
            self.task_weights = torch.ones(num_tasks, dtype=like.dtype, device=like.device)
            self.initial_losses = torch.ones(num_tasks, dtype=like.dtype, device=like.device)
        return list(self.task_weights.clone().unbind(0))

    def backward(self, main_loss, aux_losses, shared_params, other_params=None) -> GateStats:  # type: ignore[override]
        """Train on ``sum_i w_i lambda_i L_i``, then update ``w`` (see the module docstring).

        Example::

            stats = gate.backward(main_loss, {"rotated": aux_loss}, model.trunk.parameters())
        """
        self._measured_norms: Tensor | None = None
        return super().backward(main_loss, aux_losses, shared_params, other_params)

    def _reduce_task_gradients(self, grads, shared, others):  # type: ignore[override]
        # The gate's hook between "per-task gradients computed" and "combined": read the weighted
        # per-task gradient norms on the last shared layer here, at no extra backward.
        grads = super()._reduce_task_gradients(grads, shared, others)
        idx = self._last_layer_indices(shared)
        k = grads.num_tasks
        terms: list[Tensor] = []
        for i in idx:
            if grads.stacked is not None:
                g = grads.stacked[i]
                if g is not None:
                    terms.append(g.reshape(k, -1).pow(2).sum(-1))
            else:
                ref = next((r[i] for r in grads.rows if r[i] is not None), None)
                if ref is not None:
                    zero = torch.zeros((), dtype=ref.dtype, device=ref.device)
                    terms.append(torch.stack([zero if r[i] is None else r[i].pow(2).sum() for r in grads.rows]))
        if not terms:
            raise ValueError(
                "No task reaches the last shared layer GradNorm measures: pass last_shared_layer= the parameters "
                "of the last layer the task heads read from."
            )
        self._measured_norms = torch.stack([t.to(terms[0].dtype) for t in terms]).sum(0).sqrt()
        return grads

    def _last_layer_indices(self, shared: list[Tensor]) -> list[int]:
        if self._last_layer is None:
            return default_last_shared_layer(shared)
        pos = {id(p): i for i, p in enumerate(shared)}
        missing = [tuple(p.shape) for p in self._last_layer if id(p) not in pos]
        if missing:
            raise ValueError(
                f"last_shared_layer has tensors of shapes {missing} that are not among the shared parameters; "
                "pass parameters of the last *shared* layer (or None for the default)."
            )
        return [pos[id(p)] for p in self._last_layer]

    def _after_step(self, losses: Tensor, weights: Tensor, finite: Tensor) -> None:
        norms = getattr(self, "_measured_norms", None)
        if norms is None:
            raise RuntimeError(
                "GradNorm did not see the per-task gradients this step (the gate took a path without them); "
                "use the default gate options."
            )
        norms = norms.to(weights.dtype)  # G_i = |grad_W w_i lambda_i L_i|
        names = self._task_names()
        lam = self.lambdas(names[1:], weights)
        scale = weights * lam
        raw_norms = torch.where(
            scale > 0, norms / torch.where(scale > 0, scale, torch.ones_like(scale)), torch.zeros_like(norms)
        )
        new, initial = gradnorm_update(
            weights,
            norms,
            raw_norms,
            losses.to(weights.dtype),
            self.initial_losses,
            self.weight_updates == 0,
            self.alpha,
            self.lr,
        )
        ok = finite.all()
        self.initial_losses.copy_(torch.where(ok, initial, self.initial_losses))
        self.task_weights.copy_(torch.where(ok, new, self.task_weights))
        self.weight_updates.add_(ok.long())

    def extra_metrics(self) -> dict[str, Tensor]:
        """``task_weight/<task>`` for the monitor."""
        names = self._task_names()
        if len(names) != self.task_weights.numel():
            return {}
        return {f"task_weight/{n}": self.task_weights[i] for i, n in enumerate(names)}

    def reset_state(self) -> None:
        super().reset_state()
        self.task_weights = torch.zeros(0, device=self.step.device)
        self.initial_losses = torch.zeros(0, device=self.step.device)
        self.weight_updates.zero_()

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):  # type: ignore[override]
        for name in ("task_weights", "initial_losses"):
            key = prefix + name
            if key in state_dict:
                setattr(self, name, torch.empty_like(state_dict[key], device=self.step.device))
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}, lr={self.lr}, aux_weight={self.aux_weight}"


def gradnorm_update(
    weights: Tensor,
    norms: Tensor,
    raw_norms: Tensor,
    losses: Tensor,
    initial_losses: Tensor,
    first: Tensor | bool,
    alpha: float,
    lr: float,
) -> tuple[Tensor, Tensor]:
    """One GradNorm step: returns the new (renormalised) weights and the initial losses used.

    ``norms`` are the weighted gradient norms ``G_i`` and ``raw_norms`` the unweighted ones
    ``|grad_W lambda_i L_i|`` (the derivative of ``G_i`` with respect to ``w_i``).
    """
    first_t = torch.as_tensor(first, device=losses.device)
    initial = torch.where(first_t, losses, initial_losses)
    safe_initial = torch.where(initial != 0, initial, torch.ones_like(initial))
    ratio = losses / safe_initial
    rel = ratio / ratio.mean().clamp(min=torch.finfo(ratio.dtype).tiny)
    target = norms.mean() * rel.clamp(min=0).pow(alpha)
    grad = torch.sign(norms - target) * raw_norms
    new = (weights - lr * grad).clamp(min=0)
    total = new.sum()
    k = weights.shape[0]
    new = torch.where(
        total > 0, new * (k / torch.where(total > 0, total, torch.ones_like(total))), torch.ones_like(new)
    )
    return new, initial


@register_method("gradnorm")
def _make_gradnorm(**kwargs) -> GradNorm:
    """``make_gate("gradnorm", alpha=1.5, lr=0.025, last_shared_layer=None, aux_weight=1.0)``."""
    return GradNorm(**drop_cosine_options("gradnorm", kwargs))
