"""Training methods by name: what ``gradsim compare --methods ...`` and the examples accept.

A method is a factory returning the object a :class:`~lightning_gradsim.GradSimMixin` module keeps
at ``self.gradsim`` (a :class:`~lightning_gradsim.GradientGate` or a subclass). Every registered
rule is a method of the same name; other methods (loss weightings such as uncertainty weighting)
register a factory.

Example::

    from lightning_gradsim.methods import make_gate, register_method
    gate = make_gate("weighted", aux_weight=0.5)

    @register_method("my_method")
    def my_method(**kwargs):
        return GradientGate(rule="unweighted", cosine_ema=0.9, **kwargs)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .gate import GradientGate
from .rules import list_rules

__all__ = ["register_method", "make_gate", "list_methods"]

_METHODS: dict[str, Callable[..., GradientGate]] = {}


def register_method(name: str) -> Callable[[Callable[..., GradientGate]], Callable[..., GradientGate]]:
    """Decorator registering a factory ``(**gate_kwargs) -> GradientGate`` under ``name``."""

    def decorator(factory: Callable[..., GradientGate]) -> Callable[..., GradientGate]:
        if name in _METHODS or name in list_rules():
            raise ValueError(f"A method or rule named {name!r} already exists; pick another name.")
        _METHODS[name] = factory
        return factory

    return decorator


def list_methods() -> list[str]:
    """All method names: every registered rule plus registered factories."""
    return sorted(set(list_rules()) | set(_METHODS))


def make_gate(method: str, **kwargs: Any) -> GradientGate:
    """Build the gate for ``method`` (a rule name or a registered factory) with ``kwargs``."""
    if method in _METHODS:
        return _METHODS[method](**kwargs)
    if method in list_rules():
        return GradientGate(rule=method, **kwargs)
    raise ValueError(f"Unknown method {method!r}; choose from {', '.join(list_methods())}.")
