"""lightning_gradsim: adapt auxiliary losses by gradient similarity, in PyTorch and Lightning.

Example::

    from lightning_gradsim import GradientGate, GradSimMixin, GradSimMonitor
"""

from . import baselines
from .gate import GateStats, GradientGate
from .mixin import GradSimMixin, NonFiniteLossError
from .monitor import GradSimMonitor
from .rules import Rule, RuleInput, get_rule, list_rules, register_rule

__version__ = "0.1.0"

__all__ = [
    "GradientGate",
    "GradSimMixin",
    "GradSimMonitor",
    "GateStats",
    "NonFiniteLossError",
    "Rule",
    "RuleInput",
    "register_rule",
    "get_rule",
    "list_rules",
    "__version__",
]
