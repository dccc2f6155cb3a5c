"""What the ``make_gate`` factories of the loss weightings share: a gate composed with a weighting.

Each module of :mod:`lightning_gradsim.loss_weighting` defines its weighting and a ``make_gate``
factory; the factories build ``GradientGate(rule="sum", loss_weighting=...)`` by default.

>>> from lightning_gradsim.loss_weighting import UncertaintyWeighting
>>> gate = weighting_gate("uncertainty", UncertaintyWeighting, {"aux_tasks": 2, "seed": 3})
>>> gate.rule_name, gate.seed, gate.loss_weighting.log_vars.shape
('sum', 3, torch.Size([3]))
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

from ..core.gate import GradientGate
from ..core.loss_weighting import LossWeighting

__all__ = ["drop_cosine_options", "weighting_gate"]

#: Options of the cosine gate that a loss weighting with the default ``sum`` rule has no use for.
COSINE_OPTIONS = ("threshold", "cosine_ema", "main_grad_ema", "per_layer")


def drop_cosine_options(method: str, kwargs: dict[str, Any]) -> dict[str, Any]:
    """Remove the cosine gate's options from ``kwargs`` with a warning (for ``make_gate`` factories).

    ``gradsim compare --gate threshold=0.1`` passes the same gate options to every method; a loss
    weighting on the ``sum`` rule has no cosine threshold, so it ignores them instead of failing
    the comparison.
    """
    dropped = {k: kwargs.pop(k) for k in list(kwargs) if k in COSINE_OPTIONS}
    if dropped:
        warnings.warn(
            f"{method!r} ignores the cosine-gate option(s) {dropped} (it weights losses).", UserWarning, stacklevel=4
        )
    return kwargs


def weighting_gate(method: str, build: Callable[..., LossWeighting], kwargs: dict[str, Any]) -> GradientGate:
    """``GradientGate(rule, seed, similarity, every_n_steps, loss_weighting=build(**rest))``.

    ``rule`` defaults to ``"sum"`` (the plain method; the cosine options are then dropped with a
    warning); any other rule gates the weighted auxiliary gradients and keeps them.
    """
    kwargs = dict(kwargs)
    rule = kwargs.pop("rule", "sum")
    gate_kwargs: dict[str, Any] = {k: kwargs.pop(k) for k in ("seed", "similarity", "every_n_steps") if k in kwargs}
    if rule == "sum":
        drop_cosine_options(method, kwargs)
    else:
        gate_kwargs.update({k: kwargs.pop(k) for k in COSINE_OPTIONS if k in kwargs})
    return GradientGate(rule=rule, loss_weighting=build(**kwargs), **gate_kwargs)
