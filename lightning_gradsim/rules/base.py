"""The rule interface: a Gramian (and cosines) in, one coefficient per task gradient out.

Every rule of this library is a *weighting*: it reads the Gramian of the task gradients (their
pairwise dot products) and the main/auxiliary cosines, and returns one coefficient per vector.
The gate then writes ``sum_i weights[i] * vectors[i]`` into ``.grad``. The vectors are, in
order, the main gradient, the auxiliary gradients, and (for rules with
``uses_main_direction = True``) the direction vector ``d`` (the main gradient or its EMA).

A rule never sees the gradients themselves, only their ``(..., V, V)`` Gramian, so it runs on
any device, batched over leading dimensions and under ``torch.func.vmap``, without a host-device
sync, and does not care how the gradients were obtained (one process, DDP, shards).

Write your own rule without editing the library (and register it by name with
:func:`register_rule` to use ``GradientGate(rule="name")``):

>>> import torch
>>> from lightning_gradsim import GradientGate
>>> from lightning_gradsim.rules import Rule, RuleInput
>>> class HalfOpen(Rule):
...     '''Aux weight halved when the cosine is negative.'''
...     def weights(self, inp: RuleInput) -> torch.Tensor:
...         return inp.with_main(inp.aux_weight * torch.where(inp.cosine >= 0, 1.0, 0.5))
>>> update, stats = GradientGate(rule=HalfOpen()).combine(torch.tensor([1.0, 0.0]), [torch.tensor([-1.0, 1.0])])
>>> update, stats.weight
(tensor([0.5000, 0.5000]), tensor([0.5000]))
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import torch
from torch import Tensor

__all__ = ["Rule", "RuleInput", "register_rule", "get_rule", "list_rules"]


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
        """The number of auxiliary tasks, ``K-1`` (the last dimension of ``cosine``)."""
        return self.cosine.shape[-1]

    def with_main(self, aux_coefficients: Tensor, main_coefficient: Tensor | float = 1.0) -> Tensor:
        """Concatenate a main coefficient (default 1) in front of ``aux_coefficients``.

        >>> inp = RuleInput(torch.eye(2), torch.zeros(1), torch.zeros(1), torch.ones(1), 0.0)
        >>> inp.with_main(torch.tensor([0.5]))
        tensor([1.0000, 0.5000])
        """
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
    #: Whether the rule's weights are a function of its input alone (False: it draws random numbers
    #: from ``RuleInput.generator``, e.g. PCGrad's visiting orders).
    deterministic: bool = True

    #: The name the rule is registered under (set by :func:`register_rule`).
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

    >>> if "always_half" not in list_rules():  # a name is registered once per process
    ...     @register_rule("always_half")
    ...     class AlwaysHalf(Rule):
    ...         def weights(self, inp):
    ...             return inp.with_main(0.5 * inp.aux_weight.expand_as(inp.cosine))
    >>> from lightning_gradsim import GradientGate
    >>> GradientGate(rule="always_half").rule_name
    'always_half'
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
    """Names of all registered rules, sorted.

    >>> {"unweighted", "weighted", "projection", "sum", "main_only", "pcgrad"} <= set(list_rules())
    True
    """
    return sorted(_RULES)


def get_rule(rule: str | Rule) -> Rule:
    """Return a rule instance from a registered name, or the instance itself.

    >>> get_rule("unweighted")
    Unweighted()
    """
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
