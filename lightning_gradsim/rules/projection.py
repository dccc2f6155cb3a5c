"""``projection``: remove the component of each auxiliary gradient that conflicts with the main direction."""

from __future__ import annotations

import torch
from torch import Tensor

from .base import Rule, RuleInput, exact_gradients, register_rule

__all__ = ["Projection"]


@register_rule("projection")
class Projection(Rule):
    """g_main + lambda * (g_aux - min(0, g_aux . u) u), u the unit direction of d.

    ``d`` is the main gradient, or its EMA when the gate has ``main_grad_ema > 0``. Only the
    conflicting component is removed; a zero ``d`` removes nothing. The auxiliary vector counts
    as "open" when it was not projected.

    >>> import torch
    >>> from lightning_gradsim import GradientGate
    >>> GradientGate(rule="projection").combine(torch.tensor([2.0, 0.0]), [torch.tensor([-1.0, 1.0])])[0]
    tensor([2., 1.])
    """

    uses_main_direction = True

    def weights(self, inp: RuleInput) -> Tensor:
        k = inp.num_aux + 1
        g = inp.gramian
        dd = g[..., k, k]
        aux_dot_d = g[..., 1:k, k]  # (..., K-1)
        safe_dd = torch.where(dd > 0, dd, torch.ones_like(dd))
        conflict = torch.clamp(aux_dot_d, max=0.0) / safe_dd.unsqueeze(-1)
        conflict = torch.where((dd > 0).unsqueeze(-1), conflict, torch.zeros_like(conflict))
        lam = inp.aux_weight.to(g.dtype)
        direction_coef = -(lam * conflict).sum(-1, keepdim=True)
        return torch.cat([inp.with_main(lam.expand_as(conflict)), direction_coef], dim=-1)

    def gate_open(self, inp: RuleInput, weights: Tensor) -> Tensor:
        k = inp.num_aux + 1
        return inp.gramian[..., 1:k, k] >= 0

    def keeps_main_descent(
        self,
        *,
        threshold: float = 0.0,
        cosine_ema: float = 0.0,
        main_grad_ema: float = 0.0,
        per_layer: bool = False,
        similarity: str = "parameters",
        every_n_steps: int = 1,
    ) -> bool:
        """With ``d = g_main`` (no ``main_grad_ema``), projected in parameter space, every step (the
        cosine options do not enter: the rule reads the whole-vector Gramian)."""
        return main_grad_ema == 0 and exact_gradients(False, similarity, every_n_steps)
