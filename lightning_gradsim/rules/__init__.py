"""Combination rules: from the Gramian of the task gradients to one weight per gradient.

One rule per module (``unweighted``, ``weighted``, ``projection``, ``sum``, ``main_only``,
``pcgrad``, ``gradvac``); the interface and the registry are in :mod:`lightning_gradsim.rules.base`.

>>> from lightning_gradsim.rules import get_rule
>>> rule = get_rule("projection")
>>> rule.uses_main_direction, rule.keeps_main_descent(), rule.keeps_main_descent(main_grad_ema=0.9)
(True, True, False)
"""

from .base import Rule, RuleInput, exact_gradients, get_rule, list_rules, register_rule, rule_options
from .gradvac import GradVac, gradvac_coefficients
from .main_only import MainOnly
from .pcgrad import PCGrad, draw_pcgrad_orders, pcgrad_coefficients
from .projection import Projection
from .summed import Sum
from .unweighted import Unweighted
from .weighted import Weighted

__all__ = [
    "Rule",
    "RuleInput",
    "register_rule",
    "get_rule",
    "list_rules",
    "rule_options",
    "exact_gradients",
    "Unweighted",
    "Weighted",
    "Projection",
    "Sum",
    "MainOnly",
    "PCGrad",
    "pcgrad_coefficients",
    "draw_pcgrad_orders",
    "GradVac",
    "gradvac_coefficients",
]
