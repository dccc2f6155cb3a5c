"""The paper's experiments: LightningModules, setups and ``gradsim compare``.

Example::

    from lightning_gradsim.experiments import compare, register_setup, MultiTaskClassifier
"""

from .compare import CompareResult, build_setup, compare, list_setups, register_setup
from .modules import MultiTaskClassifier

__all__ = ["compare", "CompareResult", "register_setup", "list_setups", "build_setup", "MultiTaskClassifier"]
