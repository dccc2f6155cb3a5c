"""lightning_gradsim: adapt auxiliary losses by gradient similarity, in PyTorch and Lightning.

``import lightning_gradsim`` is cheap: each public name below loads its module on first use
(PEP 562), so the gate needs only torch, the mixin and monitor load Lightning, and the baselines,
experiments, RL and data sub-packages load only when they are imported.

>>> import lightning_gradsim as gs
>>> gs.GradientGate(rule="weighted").rule_name
'weighted'
>>> "unweighted" in gs.list_rules()
True
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ._deprecated import install as _install_old_paths
from ._lazy import lazy_exports

__version__ = "0.1.0"

#: public name -> the submodule defining it, imported on first access.
_EXPORTS: dict[str, str] = {
    "GradientGate": "core.gate",
    "GateStats": "core.gate",
    "GradSimMixin": "lightning.mixin",
    "NonFiniteLossError": "lightning.validation",
    "GradSimMonitor": "lightning.monitor",
    "Rule": "rules",
    "RuleInput": "rules",
    "register_rule": "rules",
    "get_rule": "rules",
    "list_rules": "rules",
}

__all__ = [*_EXPORTS, "__version__"]

if TYPE_CHECKING:  # static analysers and IDEs see the eager imports
    from .core.gate import GateStats, GradientGate
    from .lightning.mixin import GradSimMixin
    from .lightning.monitor import GradSimMonitor
    from .lightning.validation import NonFiniteLossError
    from .rules import Rule, RuleInput, get_rule, list_rules, register_rule


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
_install_old_paths()  # lightning_gradsim.gate, .mixin, ... of 0.1.0 (DeprecationWarning)
