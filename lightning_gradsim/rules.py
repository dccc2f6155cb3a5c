"""Combination rules: from task-gradient statistics to weights on the task gradients.

Every rule of this library is a *weighting*: it reads the Gramian of the task gradients (their
pairwise dot products) and the main/auxiliary cosines, and returns one coefficient per vector.
The gate then writes ``sum_i weights[i] * vectors[i]`` into ``.grad``. The vectors are, in
order, the main gradient, the auxiliary gradients, and (for rules with
``uses_main_direction = True``) the direction vector ``d`` (the main gradient or its EMA).

Rules only do tensor arithmetic on small ``(..., V, V)`` inputs, so they run on any device,
batched over leading dimensions and under ``torch.func.vmap``, without a host-device sync.

Add your own rule without editing the library::

    from lightning_gradsim.rules import Rule, RuleInput, register_rule

    @register_rule("half_open")
    class HalfOpen(Rule):
        '''Aux weight halved when the cosine is negative.'''
        def weights(self, inp: RuleInput) -> torch.Tensor:
            aux = inp.aux_weight * torch.where(inp.cosine >= 0, 1.0, 0.5)
            return inp.with_main(aux)

    gate = GradientGate(rule="half_open")
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, TypeVar

import torch
from torch import Tensor

__all__ = [
    "Rule",
    "RuleInput",
    "register_rule",
    "get_rule",
    "list_rules",
    "Unweighted",
    "Weighted",
    "Projection",
    "Sum",
    "MainOnly",
]


@dataclass
class RuleInput:
    """What a rule sees at one step (leading batch dimensions ``...`` are allowed).

    Attributes:
        gramian: ``(..., V, V)`` dot products of the vectors [main, aux_1..aux_{K-1}, (direction)].
        cosine: ``(..., K-1)`` cosine of each auxiliary vector with the main one, as the gate
            uses it (smoothed by ``cosine_ema`` and per layer when asked).
        raw_cosine: ``(..., K-1)`` this step's cosine before smoothing.
        aux_weight: ``(K-1,)`` the lambda of each auxiliary task.
        threshold: the gate's threshold on the cosine.
        generator: a seeded ``torch.Generator`` for rules that need randomness, or ``None``.
    """

    gramian: Tensor
    cosine: Tensor
    raw_cosine: Tensor
    aux_weight: Tensor
    threshold: float
    generator: torch.Generator | None = None

    @property
    def num_aux(self) -> int:
        return self.cosine.shape[-1]

    def with_main(self, aux_coefficients: Tensor, main_coefficient: Tensor | float = 1.0) -> Tensor:
        """Concatenate a main coefficient (default 1) in front of ``aux_coefficients``."""
        main = torch.as_tensor(main_coefficient, dtype=aux_coefficients.dtype, device=aux_coefficients.device)
        main = main.expand(aux_coefficients.shape[:-1] + (1,))
        return torch.cat([main, aux_coefficients], dim=-1)


class Rule:
    """Base class of combination rules.

    Subclasses implement :meth:`weights`, returning ``(..., K)`` coefficients for
    [main, aux...] (or ``(..., K+1)`` with a last coefficient on the direction vector when
    ``uses_main_direction`` is true). :meth:`gate_open` says, per auxiliary task, whether the
    auxiliary vector was used unmodified this step (logged by :class:`GradSimMonitor`).
    """

    #: Whether the rule needs the direction vector (main gradient or its EMA) as an extra vector.
    uses_main_direction: bool = False
    #: Whether the rule keeps Proposition 1 of the paper (g . g_main >= |g_main|^2) with default options.
    keeps_main_descent: bool = True
    #: Whether the rule's output depends on the per-task statistics (False lets the gate skip them
    #: on steps where nothing is measured).
    needs_statistics: bool = True

    name: str = ""

    def weights(self, inp: RuleInput) -> Tensor:
        raise NotImplementedError

    def gate_open(self, inp: RuleInput, weights: Tensor) -> Tensor:
        return weights[..., 1 : 1 + inp.num_aux] > 0

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


_RULES: dict[str, type[Rule] | Callable[[], Rule]] = {}
R = TypeVar("R")


def register_rule(name: str) -> Callable[[R], R]:
    """Class decorator that makes a :class:`Rule` available as ``GradientGate(rule=name)``.

    Example::

        @register_rule("always_half")
        class AlwaysHalf(Rule):
            def weights(self, inp):
                return inp.with_main(0.5 * inp.aux_weight.expand_as(inp.cosine))
    """

    def decorator(cls: R) -> R:
        if name in _RULES:
            raise ValueError(f"A rule named {name!r} is already registered; pick another name.")
        _RULES[name] = cls  # type: ignore[assignment]
        if isinstance(cls, type):
            cls.name = name  # type: ignore[attr-defined]
        return cls

    return decorator


def list_rules() -> list[str]:
    """Names of all registered rules, sorted."""
    return sorted(_RULES)


def get_rule(rule: str | Rule) -> Rule:
    """Return a rule instance from a registered name, or the instance itself."""
    if isinstance(rule, Rule):
        return rule
    if not isinstance(rule, str):
        raise TypeError(f"rule must be a registered name or a Rule instance, got {type(rule).__name__}.")
    if rule not in _RULES:
        raise ValueError(
            f"Unknown rule {rule!r}. Registered rules: {', '.join(list_rules())}. "
            "Register your own with @lightning_gradsim.rules.register_rule(name)."
        )
    return _RULES[rule]()


@register_rule("unweighted")
class Unweighted(Rule):
    """g_main + lambda * g_aux if cos >= threshold, else g_main (the paper's default)."""

    def weights(self, inp: RuleInput) -> Tensor:
        open_ = inp.cosine >= inp.threshold
        return inp.with_main(inp.aux_weight * open_.to(inp.cosine.dtype))


@register_rule("weighted")
class Weighted(Rule):
    """g_main + lambda * max(0, cos) * g_aux (zero below the threshold as well)."""

    def weights(self, inp: RuleInput) -> Tensor:
        scale = inp.cosine.clamp(min=0.0) * (inp.cosine >= inp.threshold).to(inp.cosine.dtype)
        return inp.with_main(inp.aux_weight * scale)


@register_rule("projection")
class Projection(Rule):
    """g_main + lambda * (g_aux - min(0, g_aux . u) u), u the unit direction of d.

    ``d`` is the main gradient, or its EMA when the gate has ``main_grad_ema > 0``. Only the
    conflicting component is removed; a zero ``d`` removes nothing. The auxiliary vector counts
    as "open" when it was not projected.
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


@register_rule("sum")
class Sum(Rule):
    """g_main + lambda * g_aux: plain multi-task learning with fixed weights."""

    keeps_main_descent = False
    needs_statistics = False

    def weights(self, inp: RuleInput) -> Tensor:
        return inp.with_main(inp.aux_weight.to(inp.cosine.dtype).expand_as(inp.cosine))


@register_rule("main_only")
class MainOnly(Rule):
    """g_main alone on the shared parameters: single-task training of the trunk."""

    needs_statistics = False

    def weights(self, inp: RuleInput) -> Tensor:
        return inp.with_main(torch.zeros_like(inp.cosine))


# The "pcgrad" rule lives with the baselines; importing it registers it with the other built-in rules.
from .baselines import pcgrad as _pcgrad  # noqa: E402,F401
