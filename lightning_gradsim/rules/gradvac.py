"""GradVac (Wang, Tsvetkov, Firat & Cao, ICLR 2021, *Gradient Vaccine*), asymmetric, as a gate rule.

Each auxiliary gradient is moved toward the main one until their cosine reaches an adaptive target:
the EMA of that pair's cosine. With ``phi`` the cosine of ``g_k`` with ``g_main`` and ``t`` the
target, if ``phi < t``::

    g_k <- g_k + c_k g_main,   c_k = |g_k| (t sqrt(1 - phi^2) - phi sqrt(1 - t^2)) / (|g_main| sqrt(1 - t^2))

(the paper's Eq. for ``g_i`` moved toward ``g_j``, with ``i`` the auxiliary task and ``j`` the main
one), after which ``cos(g_k, g_main) = t``. Then ``t <- (1 - beta) t + beta phi`` at every step
(the paper's Algorithm 1; ``t_0 = 0``). Only the auxiliary gradients are adjusted (the main one is
never moved, as in the gate's other rules), so the combination is, on the Gramian alone::

    g = (1 + sum_k lambda_k c_k) g_main + sum_k lambda_k g_k.

``beta = 0.01`` by default (the paper's setting as issue 24 cites it; not re-checked against the
paper's text here; torchjd's ``GradVacWeighting`` and LibMTL default to 0.5). The targets are state (the
buffer ``target``, ``(*B, K-1)``): the rule is a module, so the gate's ``state_dict`` carries it as ``rule.target``.
Differences from the peers: torchjd's ``GradVacWeighting`` is symmetric (every task, main
included, is moved toward every other in a random order); with one auxiliary task its main weight
equals ours and its auxiliary weight is ``1 + c`` (the main gradient moved toward the auxiliary
one) where ours is ``lambda``. LibMTL's updates the EMA only on the steps where ``phi < t``.

``per_tensor=True`` measures and adjusts each shared parameter tensor on its own (the paper's
per-layer variant): one target per tensor and auxiliary task, and the main gradient's weight
``1 + sum_k lambda_k c_{k,l}`` differs per tensor ``l`` (the gate applies per-tensor weights:
``Rule.per_tensor_weights``); a step's finiteness is checked over all tensors at once.
``min_target=0`` keeps Proposition 1 (``g . g_main >= |g_main|^2``, per tensor and so in sum): every
adjusted auxiliary gradient then has a non-negative cosine with the main one.

>>> import torch
>>> from lightning_gradsim import GradientGate
>>> gate = GradientGate(rule=GradVac(beta=0.5))
>>> gate.combine(torch.tensor([1.0, 0.0]), [torch.tensor([-1.0, 1.0])])[0]  # t = 0: g_aux made (0, 1)
tensor([1., 1.])
>>> gate.rule.target  # (1 - 0.5) * 0 + 0.5 * cos = -0.3536
tensor([-0.3536])
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .base import Rule, RuleInput, ShapedOnLoad, exact_gradients, register_rule

__all__ = ["GradVac", "gradvac_coefficients"]


def gradvac_coefficients(gram: Tensor, target: Tensor, eps: float = 0.0) -> tuple[Tensor, Tensor, Tensor]:
    """GradVac's correction of each auxiliary vector from a ``(..., K, K)`` Gramian (main first).

    Returns ``(c, adjusted, cosine)``, each ``(..., K-1)``: ``g_k + c_k g_main`` has cosine ``target_k``
    with ``g_main`` where ``adjusted`` (``cosine < target``), ``c_k = 0`` elsewhere (and where a
    norm is zero). ``cosine = g_k . g_main / (|g_k| |g_main| + eps)``; torchjd and LibMTL use ``eps = 1e-8``
    (here and in the denominator of ``c``), which leaves the moved cosine slightly below the target.

    >>> c, adjusted, cos = gradvac_coefficients(torch.tensor([[1.0, -1.0], [-1.0, 2.0]]), torch.zeros(1))
    >>> c, adjusted  # (-1, 1) + 1 * (1, 0) = (0, 1): orthogonal to (1, 0)
    (tensor([1.0000]), tensor([True]))
    """
    main_sq = gram[..., 0, 0].clamp(min=0)
    aux_sq = torch.diagonal(gram, dim1=-2, dim2=-1)[..., 1:].clamp(min=0)
    main_norm, aux_norm = main_sq.sqrt().unsqueeze(-1), aux_sq.sqrt()
    norms = main_norm * aux_norm + eps
    cos = gram[..., 0, 1:] / torch.where(norms > 0, norms, torch.ones_like(norms))
    target = target.to(gram.dtype)
    sin_cos = (1 - cos * cos).clamp(min=0).sqrt()
    sin_target = (1 - target * target).clamp(min=0).sqrt()
    denom = main_norm * sin_target + eps
    c = aux_norm * (target * sin_cos - cos * sin_target) / torch.where(denom > 0, denom, torch.ones_like(denom))
    adjusted = (cos < target) & (main_norm > 0) & (aux_norm > 0) & (denom > 0)
    return torch.where(adjusted, c, torch.zeros_like(c)), adjusted, cos


@register_rule("gradvac")
class GradVac(ShapedOnLoad, Rule, nn.Module):
    """Asymmetric GradVac; see the module docstring.

    Args:
        beta: EMA factor of the targets, ``t <- (1 - beta) t + beta phi``.
        per_tensor: per shared parameter tensor (the paper's per-layer variant) instead of the whole trunk.
        min_target: a floor on the target used (``None``: the paper's rule; ``0`` keeps Proposition 1).
        eps: added to the denominators (0: exact, zero norms handled apart; torchjd and LibMTL use 1e-8).

    An auxiliary task counts as "open" (``GateStats.gate_open``) when it was not adjusted this step.
    """

    target: Tensor
    updates: Tensor
    shaped_on_load = ("target",)

    def __init__(
        self, beta: float = 0.01, per_tensor: bool = False, min_target: float | None = None, eps: float = 0.0
    ) -> None:
        nn.Module.__init__(self)
        if not 0.0 < float(beta) <= 1.0:
            raise ValueError(f"beta must be in (0, 1], got {beta}.")
        if min_target is not None and not -1.0 <= float(min_target) < 1.0:
            raise ValueError(f"min_target must be in [-1, 1) or None, got {min_target}.")
        if not float(eps) >= 0:
            raise ValueError(f"eps must be >= 0, got {eps}.")
        self.beta, self.per_tensor, self.eps = float(beta), bool(per_tensor), float(eps)
        self.per_tensor_weights = self.per_tensor  # the gate hands per-tensor Gramians, applies per-tensor weights
        self.min_target = None if min_target is None else float(min_target)
        self.register_buffer("target", torch.zeros(0))
        self.register_buffer("updates", torch.zeros((), dtype=torch.long))
        self._adjusted: Tensor | None = None
        self._pending: tuple[Tensor, Tensor] | None = None

    def weights(self, inp: RuleInput) -> Tensor:
        k = inp.num_aux + 1
        gram = inp.gramian[..., :k, :k]  # (L, *B, K, K) per tensor (per_tensor_weights), else (*B, K, K)
        self._ensure(tuple(gram.shape[:-2]) + (k - 1,), gram)
        used = self.target if self.min_target is None else self.target.clamp(min=self.min_target)
        c, adjusted, cos = gradvac_coefficients(gram, used, self.eps)
        lam = inp.aux_weight.to(gram.dtype)
        ok = torch.isfinite(gram).flatten(-2).all(-1).unsqueeze(-1)
        if self.per_tensor:
            ok = ok.all(0, keepdim=True)
        self._pending = (torch.where(ok, (1 - self.beta) * self.target + self.beta * cos, self.target).detach(), ok)
        self._adjusted = adjusted
        main = 1 + (lam * c).sum(-1)
        return torch.cat([main.unsqueeze(-1), lam.expand_as(c)], dim=-1)

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
        """Only when every used target is >= 0 (``min_target >= 0``: the auxiliary gradient is moved to a cosine
        >= 0 with the main one), on the exact per-step Gramian (``Rule.keeps_main_descent``)."""
        floor = self.min_target is not None and self.min_target >= 0
        return floor and exact_gradients(per_layer, similarity, every_n_steps)

    def commit(self, finite: Tensor) -> None:
        """Keep the targets staged by :meth:`weights` where the step is finite (losses, heads, other ranks too):
        a skipped step leaves them as they were."""
        if self._pending is None:
            return
        new, ok = self._pending
        step_ok = finite.unsqueeze(-1)  # (*B, 1) against the targets' (*B, K-1); (1, *B, 1) per tensor
        keep = ok & (step_ok.unsqueeze(0) if self.per_tensor else step_ok)
        self.target.copy_(torch.where(keep, new, self.target))
        self.updates.add_(keep.all().long())
        self._pending = None

    def gate_open(self, inp: RuleInput, weights: Tensor) -> Tensor:
        adjusted = self._adjusted
        if adjusted is None:
            return weights[..., 1 : 1 + inp.num_aux] > 0
        if self.per_tensor:
            adjusted = adjusted.any(0)
        return ~adjusted

    def _ensure(self, shape: tuple[int, ...], like: Tensor) -> None:
        if tuple(self.target.shape) != shape:
            if self.updates > 0:
                raise ValueError(
                    f"GradVac's targets have shape {tuple(self.target.shape)} but this step has {shape} "
                    "((tensors,) problems, auxiliary tasks); call gate.rule.reset() to start over."
                )
            self.target = torch.zeros(shape, dtype=like.dtype, device=like.device)
        elif self.target.dtype != like.dtype or self.target.device != like.device:
            self.target = self.target.to(dtype=like.dtype, device=like.device)

    def reset(self) -> None:
        """Forget the targets (back to 0)."""
        self.target = torch.zeros(0, device=self.updates.device)
        self.updates.zero_()
        self._adjusted = None

    def __repr__(self) -> str:
        return f"GradVac(beta={self.beta}, per_tensor={self.per_tensor}, min_target={self.min_target}, eps={self.eps})"
