"""``PoisonGrad``: the identity whose backward returns NaN when asked, so a test can make the backward
through part of a network non-finite while its forward pass (and every loss) stays finite."""

from __future__ import annotations

import torch


class PoisonGrad(torch.autograd.Function):
    """``PoisonGrad.apply(x, on)``: ``x``; its gradient times NaN when ``on``."""

    @staticmethod
    def forward(ctx, x, on):  # type: ignore[override]
        ctx.on = bool(on)
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        return (grad * float("nan") if ctx.on else grad), None
