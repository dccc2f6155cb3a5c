"""Cosine rules measured against the gate's main *direction* (the main gradient or its EMA).

The projection blog smooths the main gradient, ``M(t) = alpha g(t) + (1 - alpha) M(t - 1)``, and
adjusts the auxiliary gradient against ``M(t)`` instead of ``g(t)``. Its Figure 13 compares the
cosine rules with multitask and projection "in the case alpha = 0.01"; we read that as the cosine
rules also measuring their cosine against ``M(t)`` (see ``docs/protocols.md``, the blog section). These two rules
do exactly that, and nothing else differs from ``unweighted`` / ``weighted``:

* :class:`DirectionUnweighted`: ``g_main + lambda * 1[cos(M, g_aux) >= threshold] * g_aux``;
* :class:`DirectionWeighted`: ``g_main + lambda * max(0, cos(M, g_aux)) * g_aux``.

``M`` is the gate's direction vector: its main-gradient EMA with
``GradientGate(main_grad_ema=1 - alpha)``, this step's main gradient with ``main_grad_ema=0``
(then the rules equal ``unweighted`` and ``weighted``). They are rule *instances* for
:class:`~lightning_gradsim.GradientGate` and are not registered by name.

Example:

>>> import torch
>>> from lightning_gradsim import GradientGate
>>> gate = GradientGate(rule=DirectionUnweighted(), main_grad_ema=0.5)
>>> _ = gate.combine(torch.tensor([1.0, 0.0]), {"aux": torch.tensor([1.0, 1.0])})
>>> out, stats = gate.combine(torch.tensor([-1.0, 0.1]), {"aux": torch.tensor([1.0, 1.0])})
>>> out.tolist()  # M = 0.5 (1, 0) + 0.5 (-1, 0.1) = (0, 0.05): cos(M, aux) > 0, the gate stays open
[0.0, 1.100000023841858]
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..rules import Rule, RuleInput

__all__ = ["DirectionUnweighted", "DirectionWeighted", "direction_cosine"]


def direction_cosine(inp: RuleInput) -> Tensor:
    """``(..., K-1)`` cosine of each auxiliary vector with the direction vector (last in the Gramian)."""
    k = inp.num_aux + 1
    g = inp.gramian
    dd = g[..., k, k]
    aux_sq = torch.diagonal(g, dim1=-2, dim2=-1)[..., 1:k]
    denom = (aux_sq * dd.unsqueeze(-1)).clamp(min=0).sqrt()
    safe = torch.where(denom > 0, denom, torch.ones_like(denom))
    return torch.where(denom > 0, g[..., 1:k, k] / safe, torch.zeros_like(denom))


class DirectionUnweighted(Rule):
    """``g_main + lambda * g_aux`` iff ``cos(direction, g_aux) >= threshold``."""

    uses_main_direction = True
    name = "unweighted_direction"

    def weights(self, inp: RuleInput) -> Tensor:
        cos = direction_cosine(inp)
        aux = inp.aux_weight.to(cos.dtype) * (cos >= inp.threshold).to(cos.dtype)
        return torch.cat([inp.with_main(aux), torch.zeros_like(cos[..., :1])], dim=-1)


class DirectionWeighted(Rule):
    """``g_main + lambda * max(0, cos(direction, g_aux)) * g_aux`` (zero below the threshold)."""

    uses_main_direction = True
    name = "weighted_direction"

    def weights(self, inp: RuleInput) -> Tensor:
        cos = direction_cosine(inp)
        scale = cos.clamp(min=0.0) * (cos >= inp.threshold).to(cos.dtype)
        aux = inp.aux_weight.to(cos.dtype) * scale
        return torch.cat([inp.with_main(aux), torch.zeros_like(cos[..., :1])], dim=-1)
