"""``main_only``: single-task training of the trunk (a baseline)."""

from __future__ import annotations

import torch
from torch import Tensor

from .base import Rule, RuleInput, register_rule

__all__ = ["MainOnly"]


@register_rule("main_only")
class MainOnly(Rule):
    """g_main alone on the shared parameters: single-task training of the trunk.

    >>> from lightning_gradsim import GradientGate
    >>> GradientGate(rule="main_only").combine(torch.tensor([1.0, 0.0]), [torch.tensor([1.0, 1.0])])[0]
    tensor([1., 0.])
    """

    needs_statistics = False

    def weights(self, inp: RuleInput) -> Tensor:
        return inp.with_main(torch.zeros_like(inp.cosine))

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
        """Always: the update is ``g_main`` (``g . g_main = |g_main|^2``)."""
        return True
