"""``weighted``: the auxiliary gradient scaled by the positive part of its cosine."""

from __future__ import annotations

from torch import Tensor

from .base import Rule, RuleInput, exact_gradients, register_rule

__all__ = ["Weighted"]


@register_rule("weighted")
class Weighted(Rule):
    """g_main + lambda * max(0, cos) * g_aux (zero below the threshold as well).

    >>> import torch
    >>> from lightning_gradsim import GradientGate
    >>> GradientGate(rule="weighted").combine(torch.tensor([1.0, 0.0]), [torch.tensor([1.0, 1.0])])[1].weight
    tensor([0.7071])
    """

    def weights(self, inp: RuleInput) -> Tensor:
        scale = inp.cosine.clamp(min=0.0) * (inp.cosine >= inp.threshold).to(inp.cosine.dtype)
        return inp.with_main(inp.aux_weight * scale)

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
        """With any threshold (``max(0, cos)`` is 0 below zero), no cosine EMA and the exact per-step cosine."""
        return cosine_ema == 0 and exact_gradients(per_layer, similarity, every_n_steps)
