"""Loading by name: ``"module:attribute"`` entries and PEP 562 lazy package attributes.

The registries (methods, setups, ``gradsim`` sub-commands) name their built-in entries as
``"module:attribute"`` strings and import them on first use, so importing the package or listing a
registry loads no optional dependency.

>>> load_entry("math:sqrt")(16.0)
4.0
>>> load_entry("math")
Traceback (most recent call last):
ValueError: 'math' is not a 'module:attribute' entry.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Mapping
from typing import Any

__all__ = ["load_entry", "lazy_exports"]


def load_entry(entry: str) -> Any:
    """Import ``module`` and return its ``attribute`` for an entry ``"module:attribute"``."""
    module_name, sep, attr = entry.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"{entry!r} is not a 'module:attribute' entry.")
    module = importlib.import_module(module_name)
    try:
        return getattr(module, attr)
    except AttributeError:
        raise AttributeError(f"Entry {entry!r}: module {module_name!r} has no attribute {attr!r}.") from None


def lazy_exports(package: str, exports: Mapping[str, str]) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """``(__getattr__, __dir__)`` for ``package`` whose public names load their submodule on first access.

    ``exports`` maps a public name to the submodule (relative to ``package``) that defines it.
    Usage in a package's ``__init__``: ``__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)``.
    """

    def __getattr__(name: str) -> Any:
        submodule = exports.get(name)
        if submodule is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(f"{package}.{submodule}"), name)
        setattr(sys.modules[package], name, value)  # later lookups skip __getattr__
        return value

    def __dir__() -> list[str]:
        return sorted({*vars(sys.modules[package]), *exports})

    return __getattr__, __dir__
