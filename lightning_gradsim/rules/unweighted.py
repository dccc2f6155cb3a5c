"""``unweighted``: the paper's default rule."""

from __future__ import annotations

from torch import Tensor

from .base import Rule, RuleInput, exact_gradients, register_rule

__all__ = ["Unweighted"]


@register_rule("unweighted")
class Unweighted(Rule):
    """g_main + lambda * g_aux if cos >= threshold, else g_main (the paper's default).

    >>> import torch
    >>> from lightning_gradsim import GradientGate
    >>> GradientGate(rule="unweighted", aux_weight=0.5).combine(torch.tensor([1.0, 0.0]), [torch.tensor([1.0, 1.0])])[0]
    tensor([1.5000, 0.5000])
    """

    def weights(self, inp: RuleInput) -> Tensor:
        open_ = inp.cosine >= inp.threshold
        return inp.with_main(inp.aux_weight * open_.to(inp.cosine.dtype))

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
        """Only with ``threshold >= 0``, no cosine EMA and the exact per-step cosine (``Rule.keeps_main_descent``)."""
        return threshold >= 0 and cosine_ema == 0 and exact_gradients(per_layer, similarity, every_n_steps)
