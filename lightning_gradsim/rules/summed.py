"""``sum``: plain multi-task learning with fixed weights (a baseline)."""

from __future__ import annotations

from torch import Tensor

from .base import Rule, RuleInput, register_rule

__all__ = ["Sum"]


@register_rule("sum")
class Sum(Rule):
    """g_main + lambda * g_aux: plain multi-task learning with fixed weights.

    >>> import torch
    >>> from lightning_gradsim import GradientGate
    >>> GradientGate(rule="sum").combine(torch.tensor([1.0, 0.0]), [torch.tensor([-3.0, 0.0])])[0]
    tensor([-2.,  0.])
    """

    needs_statistics = False

    def weights(self, inp: RuleInput) -> Tensor:
        return inp.with_main(inp.aux_weight.to(inp.cosine.dtype).expand_as(inp.cosine))
