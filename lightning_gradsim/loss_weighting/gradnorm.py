"""GradNorm (Chen et al., ICML 2018), a :class:`LossWeighting`: task weights that balance training rates.

With weights ``w_i`` (main included) the model is trained on ``sum_i w_i lambda_i L_i``. After each
step, with ``W`` the last shared layer's parameters:

* ``G_i = |grad_W w_i lambda_i L_i|`` (weighted gradient norm), ``G_bar = mean_i G_i``;
* ``r_i = (L_i / L_i(0)) / mean_j (L_j / L_j(0))`` (relative inverse training rate);
* ``L_grad = sum_i |G_i - G_bar r_i^alpha|`` with the target ``G_bar r_i^alpha`` held constant, so
  ``d L_grad / d w_i = sign(G_i - G_bar r_i^alpha) * |grad_W lambda_i L_i|``;
* ``w <- max(0, w - lr * d L_grad / d w)``, then ``w <- K w / sum(w)`` (sum to the number of tasks).

``G_i^2`` is read from the diagonal of the per-layer Gramian the gate already has (no extra
backward), and the losses are the step's global ones (averaged over accumulated micro-batches and
DDP ranks, unscaled), so every rank takes the same update, equal to one process on the whole batch.
The weights are buffers updated here (plain gradient descent with ``lr``), not by your optimizer.
``L_i(0)`` are the losses at the first finite step.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from ..core.gate import GradientGate
from ..core.loss_weighting import LossWeighting
from ._gate import weighting_gate

__all__ = ["make_gate", "GradNorm", "default_last_shared_layer", "gradnorm_update"]


def default_last_shared_layer(shared: Sequence[Tensor]) -> list[int]:
    """Indices into ``shared`` of the default "last shared layer".

    The last parameter tensor with at least 2 dimensions (a weight matrix or kernel) and every
    tensor after it (its bias, a following norm layer's affine parameters). If all tensors are
    1-D, the last one.

    >>> default_last_shared_layer([torch.ones(3, 2), torch.ones(3), torch.ones(4, 3), torch.ones(4)])
    [2, 3]
    """
    for i in range(len(shared) - 1, -1, -1):
        if shared[i].dim() >= 2:
            return list(range(i, len(shared)))
    return [len(shared) - 1]


class GradNorm(LossWeighting):
    """GradNorm task weighting (Chen et al., 2018).

    Args:
        alpha: the asymmetry ``alpha`` (1.5 as in the paper's default; 0 pulls all weighted
            gradient norms to their mean).
        lr: learning rate of the weights' gradient-descent update.
        last_shared_layer: the parameters ``W`` on which gradient norms are measured (they must be
            among the shared parameters). Default: :func:`default_last_shared_layer` of the shared
            parameters passed to the gate, in their order.
        aux_weight: fixed prior ``lambda`` multiplying the auxiliary losses throughout (the
            adapted weights ``w`` start at 1 and multiply ``lambda_i L_i``).

    Buffers: ``task_weights`` ``(K,)`` (``[w_main, w_aux...]``), ``initial_losses`` ``(K,)``,
    ``weight_updates`` (count). Logged by :class:`~lightning_gradsim.GradSimMonitor` as
    ``gradsim/task_weight/<task>`` (``w_i``) for ``main`` and every auxiliary task.
    ``make_gate("gradnorm", ...)`` builds ``GradientGate(rule="sum", loss_weighting=GradNorm(...))``.

    >>> from lightning_gradsim import GradientGate
    >>> W = torch.nn.Parameter(torch.tensor([[2.0, 1.0]]))
    >>> gate = GradientGate(rule="sum", loss_weighting=GradNorm(alpha=1.5, lr=0.1))
    >>> stats = gate.backward((W[0, 0] ** 2) / 2, [(2 * W[0, 1]) ** 2 / 2], [W])  # G = (2, 4): w moves to G's mean
    >>> gate.loss_weighting.task_weights
    tensor([1.3333, 0.6667])
    """

    shaped_on_load = ("task_weights", "initial_losses")

    task_weights: Tensor
    initial_losses: Tensor
    weight_updates: Tensor
    needs_parameter_gramian = True
    needs_losses = True

    def __init__(
        self,
        alpha: float = 1.5,
        lr: float = 0.025,
        last_shared_layer: Iterable[Tensor] | None = None,
        aux_weight: float | Mapping[str, float] = 1.0,
    ) -> None:
        super().__init__(aux_weight=aux_weight)
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

    def check(self, names: Sequence[str], shared: Sequence[Tensor]) -> None:
        self.last_layer_indices(shared)

    def last_layer_indices(self, shared: Sequence[Tensor]) -> list[int]:
        """Indices into ``shared`` of the tensors whose gradient norms GradNorm balances."""
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

    def observe(
        self,
        losses: Tensor | None,
        layer_gram: Tensor,
        layers: Sequence[int],
        shared: Sequence[Tensor],
        weights: Tensor,
        finite: Tensor,
    ) -> None:
        wanted = set(self.last_layer_indices(shared))
        rows = [r for r, i in enumerate(layers) if i in wanted]
        if not rows:
            raise ValueError(
                "No task reaches the last shared layer GradNorm measures: pass last_shared_layer= the parameters "
                "of the last layer the task heads read from."
            )
        assert losses is not None
        sq = torch.diagonal(layer_gram[rows], dim1=-2, dim2=-1).sum(0).clamp(min=0)
        weights = weights.to(self.task_weights.dtype)
        norms = sq.sqrt().to(weights.dtype)  # G_i = |grad_W w_i lambda_i L_i|
        positive = weights > 0
        # d G_i / d w_i = |grad_W lambda_i L_i| = G_i / w_i (0 for a task switched off, w_i = 0).
        raw_norms = torch.where(
            positive, norms / torch.where(positive, weights, torch.ones_like(weights)), torch.zeros_like(norms)
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
        ok = finite.all() & torch.isfinite(losses).all()
        self.initial_losses.copy_(torch.where(ok, initial, self.initial_losses))
        self.task_weights.copy_(torch.where(ok, new, self.task_weights))
        self.weight_updates.add_(ok.long())

    def extra_metrics(self, names: Sequence[str]) -> dict[str, Tensor]:
        """``task_weight/<task>`` for the monitor."""
        if len(names) != self.task_weights.numel():
            return {}
        return {f"task_weight/{n}": self.task_weights[i] for i, n in enumerate(names)}

    def reset(self) -> None:
        self.task_weights = torch.zeros(0, device=self.weight_updates.device)
        self.initial_losses = torch.zeros(0, device=self.weight_updates.device)
        self.weight_updates.zero_()

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

    ``norms`` are the weighted gradient norms ``G_i`` and ``raw_norms`` their derivatives with
    respect to ``w_i``, ``|grad_W lambda_i L_i|``.

    >>> gradnorm_update(torch.ones(2), torch.tensor([2.0, 4.0]), torch.tensor([2.0, 4.0]), torch.tensor([2.0, 2.0]),
    ...                 torch.ones(2), True, 1.5, 0.1)[0]
    tensor([1.3333, 0.6667])
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


def make_gate(**kwargs: Any) -> GradientGate:
    """The method ``gradnorm`` of :func:`lightning_gradsim.methods.make_gate`: ``make_gate("gradnorm", alpha=1.5,
    lr=0.025, last_shared_layer=None, aux_weight=1.0, seed=0, rule="sum")``."""
    return weighting_gate("gradnorm", GradNorm, kwargs)
