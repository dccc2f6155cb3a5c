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

import inspect
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
from torch import Tensor

from .._lazy import load_entry

__all__ = [
    "Rule",
    "RuleInput",
    "register_rule",
    "get_rule",
    "list_rules",
    "rule_options",
    "TORCHJD_PREFIX",
    "exact_gradients",
    "ShapedOnLoad",
]

#: Names ``"torchjd:<Name>"`` are torchjd's ``<Name>Weighting`` (see :mod:`lightning_gradsim.rules.torchjd`).
TORCHJD_PREFIX = "torchjd:"
#: The adapter of torchjd's weightings, loaded by name on first use (``"module:attribute"``), so that this
#: module, which every rule imports, imports no rule module itself.
TORCHJD_ADAPTER = "lightning_gradsim.rules.torchjd"


def exact_gradients(per_layer: bool, similarity: str, every_n_steps: int) -> bool:
    """Whether the rule's Gramian is this step's Gramian of the shared *parameter* gradients as one vector.

    It is not with ``per_layer=True`` (a mean of per-tensor cosines, whose sign can differ from the
    whole vector's), ``similarity="features"`` (the Gramian of the feature gradients, not of the
    parameter gradients that the update is made of) or ``every_n_steps > 1`` (the weights of an
    earlier step reused). The cosine rules' Proposition 1 needs it.

    >>> exact_gradients(False, "parameters", 1), exact_gradients(True, "parameters", 1)
    (True, False)
    """
    return not per_layer and similarity == "parameters" and every_n_steps == 1


class ShapedOnLoad:
    """For ``nn.Module`` classes whose buffers take their shape at the first step (one entry per task, per
    tensor): loading a state dict first gives each buffer named in :attr:`shaped_on_load` the checkpoint's
    shape (on the buffer's device), so a fresh module loads a trained one's state.

    >>> import torch
    >>> class Targets(ShapedOnLoad, torch.nn.Module):
    ...     shaped_on_load = ("target",)
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.register_buffer("target", torch.zeros(0))
    >>> fresh = Targets()
    >>> _ = fresh.load_state_dict({"target": torch.ones(3)})
    >>> fresh.target
    tensor([1., 1., 1.])
    """

    #: the names of the buffers shaped by the first step
    shaped_on_load: tuple[str, ...] = ()

    def _load_from_state_dict(
        self,
        state_dict: Mapping[str, Any],
        prefix: str,
        local_metadata: dict[str, Any],
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        for name in self.shaped_on_load:
            value = state_dict.get(prefix + name)
            if isinstance(value, Tensor):
                setattr(self, name, torch.empty_like(value, device=getattr(self, name).device))
        super()._load_from_state_dict(  # type: ignore[misc]
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )


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
        problem_generators: with keyed problems (``gate.combine(..., problem_keys=...)``), one generator per
            problem of the flattened batch, to draw from instead of ``generator`` so that a problem's draws do
            not depend on the others (:mod:`lightning_gradsim.core.streams`); else ``None``.
    """

    gramian: Tensor
    cosine: Tensor
    raw_cosine: Tensor
    aux_weight: Tensor
    threshold: float
    generator: torch.Generator | None = None
    problem_generators: tuple[torch.Generator, ...] | None = None

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
    #: Whether the rule's output depends on the per-task statistics (False lets the gate skip them
    #: on steps where nothing is measured).
    needs_statistics: bool = True
    #: Whether the rule's weights are a function of its input alone (False: it draws random numbers
    #: from ``RuleInput.generator``, e.g. PCGrad's visiting orders).
    deterministic: bool = True
    #: Whether the rule weighs each shared tensor on its own: :meth:`weights` then gets the per-tensor
    #: Gramians ``(L, ..., K, K)`` (``L`` shared tensors) and returns ``(L, ..., K)`` weights, one row per
    #: tensor (GradVac's per-layer variant). Only with ``similarity="parameters"``, ``every_n_steps=1``, no
    #: direction vector and no held-out reference (the gate checks).
    per_tensor_weights: bool = False

    #: The name the rule is registered under (set by :func:`register_rule`).
    name: str = ""

    def weights(self, inp: RuleInput) -> Tensor:
        raise NotImplementedError

    def gate_open(self, inp: RuleInput, weights: Tensor) -> Tensor:
        return weights[..., 1 : 1 + inp.num_aux] > 0

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
        """Whether a gate with these options keeps Proposition 1 of the paper at *every* step.

        Proposition 1: the update ``g`` written into the shared parameters has
        ``g . g_main >= |g_main|^2`` for every main and auxiliary gradient and every ``lambda >= 0``,
        where ``g_main`` is the main loss's gradient on the shared parameters (of the *weighted*
        main loss when the gate has a ``loss_weighting``) and the gradients are the ones the gate
        sees (the global ones under DDP with ``gradsim_sync`` ``"global"``/``"sharded"``, each
        rank's own with ``"local"``). The keyword arguments are the :class:`GradientGate` options of
        the same names (defaults: the gate's). The base class claims nothing (``False``); a rule
        that keeps the bound overrides this with the exact conditions (see ``docs/rules.md``).

        >>> from lightning_gradsim.rules import get_rule
        >>> rule = get_rule("unweighted")
        >>> rule.keeps_main_descent(), rule.keeps_main_descent(per_layer=True), rule.keeps_main_descent(threshold=-0.1)
        (True, False, False)
        """
        return False

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


def get_rule(rule: Any, **options: Any) -> Rule:
    """Return a rule instance from a registered name (built with ``options``), or the instance itself.

    A torchjd ``Weighting`` instance, or a name ``"torchjd:UPGrad"`` (torchjd's ``UPGradWeighting``),
    is wrapped in ``TorchJDRule`` (:mod:`lightning_gradsim.rules.torchjd`; torchjd is imported only then).

    >>> get_rule("unweighted")
    Unweighted()
    >>> get_rule("gradvac", beta=0.1)
    GradVac(beta=0.1, per_tensor=False, min_target=None, eps=0.0)
    """
    if isinstance(rule, Rule):
        if options:
            raise TypeError(f"Options {sorted(options)} are for a rule name, not for the instance {rule!r}.")
        return rule
    if _is_torchjd_weighting(rule) or (isinstance(rule, str) and rule.startswith(TORCHJD_PREFIX)):
        TorchJDRule = load_entry(f"{TORCHJD_ADAPTER}:TorchJDRule")
        if isinstance(rule, str):
            adapted: Rule = TorchJDRule.from_name(rule, **options)
            return adapted
        if options:
            raise TypeError(f"Options {sorted(options)} are for a rule name, not for the weighting {rule!r}.")
        wrapped: Rule = TorchJDRule(rule)
        return wrapped
    if not isinstance(rule, str):
        raise TypeError(
            f"rule must be a registered name, a Rule instance or a torchjd Weighting, got {type(rule).__name__}."
        )
    if rule not in _RULES:
        raise ValueError(
            f"Unknown rule {rule!r}. Registered rules: {', '.join(list_rules())}, and torchjd's weightings as "
            "'torchjd:<Name>' (e.g. 'torchjd:UPGrad'). Register your own with "
            "@lightning_gradsim.rules.register_rule(name)."
        )
    return _RULES[rule](**options)


def rule_options(rule: str) -> list[str]:
    """The keyword options a registered rule's constructor takes (what ``make_gate`` passes to it).

    >>> rule_options("gradvac"), rule_options("unweighted")
    (['beta', 'per_tensor', 'min_target', 'eps'], [])
    """
    if rule.startswith(TORCHJD_PREFIX):
        factory: Any = load_entry(f"{TORCHJD_ADAPTER}:weighting_class")(rule[len(TORCHJD_PREFIX) :])
    else:
        factory = _RULES[rule]
    try:
        params = inspect.signature(factory).parameters.values()
    except (TypeError, ValueError):  # pragma: no cover - builtins without a signature
        return []
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return [p.name for p in params if p.kind in kinds and p.name != "self"]


def _is_torchjd_weighting(obj: Any) -> bool:
    """Whether ``obj`` is a torchjd ``Weighting`` (without importing torchjd: it is loaded if it is one)."""
    aggregation = sys.modules.get("torchjd.aggregation")
    return aggregation is not None and isinstance(obj, aggregation.Weighting)
