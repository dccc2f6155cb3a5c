"""Training methods by name: what ``gradsim compare --methods ...`` and the examples accept.

A method is a factory returning the object a :class:`~lightning_gradsim.GradSimMixin` module keeps
at ``self.gradsim`` (a :class:`~lightning_gradsim.GradientGate` or a subclass). Every registered
rule is a method of the same name; other methods (loss weightings such as uncertainty weighting)
are factories. The built-in factories are named in :data:`BUILTIN_METHODS` as ``"module:factory"``
and imported on first use, so listing methods imports none of them.

>>> from lightning_gradsim import GradientGate
>>> from lightning_gradsim.methods import list_methods, make_gate, register_method
>>> {"pcgrad", "uncertainty", "gradnorm", "weighted"} <= set(list_methods())
True
>>> make_gate("weighted", aux_weight=0.5).aux_weight
0.5
>>> @register_method("doc_smoothed_unweighted")
... def smoothed(**kwargs):
...     return GradientGate(rule="unweighted", cosine_ema=0.9, **kwargs)
>>> make_gate("doc_smoothed_unweighted").cosine_ema
0.9
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ._lazy import load_entry
from .core.gate import GradientGate
from .loss_weighting import method_modules
from .rules import get_rule, list_rules, rule_options
from .rules.base import TORCHJD_PREFIX

__all__ = ["BUILTIN_METHODS", "register_method", "make_gate", "list_methods", "is_method"]

Factory = Callable[..., GradientGate]

#: built-in methods that are not rules: name -> ``"module:factory"``, imported by :func:`make_gate`.
#: (``pcgrad`` is a rule, registered with the others in :mod:`lightning_gradsim.rules`.)
#: Every module of :mod:`lightning_gradsim.loss_weighting` is one (its ``make_gate``), found without importing it.
BUILTIN_METHODS: dict[str, str] = method_modules()

# name -> factory, or the "module:factory" entry of a built-in not yet imported
_METHODS: dict[str, Factory | str] = dict(BUILTIN_METHODS)


def register_method(name: str) -> Callable[[Factory], Factory]:
    """Decorator registering a factory ``(**gate_kwargs) -> GradientGate`` under ``name``."""

    def decorator(factory: Factory) -> Factory:
        entry = _METHODS.get(name)
        # a built-in module registering its own entry as it loads
        builtin = isinstance(entry, str) and entry.partition(":")[0] == factory.__module__
        if (entry is not None and not builtin) or name in list_rules():
            raise ValueError(f"A method or rule named {name!r} already exists; pick another name.")
        _METHODS[name] = factory
        return factory

    return decorator


def list_methods() -> list[str]:
    """All method names: every registered rule plus the factories (built-in ones without importing them)."""
    return sorted(set(list_rules()) | set(_METHODS))


def is_method(name: str) -> bool:
    """Whether ``make_gate(name)`` knows ``name``: a listed method or a torchjd weighting ``"torchjd:<Name>"``.

    >>> is_method("gradvac"), is_method("torchjd:UPGrad"), is_method("nope")
    (True, True, False)
    """
    return name in list_methods() or name.startswith(TORCHJD_PREFIX)


def _factory(method: str) -> Factory:
    entry = _METHODS[method]
    if isinstance(entry, str):  # a built-in: import it now (its module may register it as it loads)
        entry = _METHODS[method] = load_entry(entry)
    return entry


def make_gate(method: str, **kwargs: Any) -> GradientGate:
    """Build the gate for ``method`` (a rule name, ``"torchjd:<Name>"`` or a registered factory) with ``kwargs``.

    For a rule, the options its constructor takes (e.g. GradVac's ``beta``) build the rule and the
    others the gate.

    >>> gate = make_gate("gradvac", beta=0.1, aux_weight=0.5)
    >>> gate.rule.beta, gate.aux_weight
    (0.1, 0.5)
    """
    if method in _METHODS:
        return _factory(method)(**kwargs)
    if method in list_rules() or method.startswith(TORCHJD_PREFIX):
        names = set(rule_options(method))
        options = {k: kwargs.pop(k) for k in list(kwargs) if k in names}
        return GradientGate(rule=get_rule(method, **options), **kwargs)
    raise ValueError(
        f"Unknown method {method!r}; choose from {', '.join(list_methods())}, or a torchjd weighting as "
        "'torchjd:<Name>' (e.g. 'torchjd:UPGrad')."
    )
