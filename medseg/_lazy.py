"""Lazy package attributes (PEP 562), so that ``import medseg.cli`` and ``medseg --help`` stay light.

A package ``__init__`` names each public attribute with the submodule defining it, imports them
under ``TYPE_CHECKING`` for type checkers, and sets ``__getattr__ = lazy_attributes(__name__, {...})``.
The submodule (and whatever heavy library it needs: torch, MONAI, pydicom, ...) is imported on the
first access, and the value is then cached in the package namespace, so later look-ups cost nothing
and ``from medseg.io import load_volume`` keeps working unchanged.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from collections.abc import Callable, Mapping
from typing import Any

__all__ = ["lazy_attributes"]


def lazy_attributes(package: str, exports: Mapping[str, str]) -> Callable[[str], Any]:
    """A module ``__getattr__`` importing ``exports[name]`` (a module path) on first access of ``name``.

    Args:
        package: The package's ``__name__``.
        exports: Public name -> module that defines it. Names not listed that are submodules of the
            package are imported too (``import medseg; medseg.io.load_volume`` works as before).

    Returns:
        The function to assign to the package's ``__getattr__``.
    """

    def __getattr__(name: str) -> Any:
        module = exports.get(name)
        if module is not None:
            value = getattr(importlib.import_module(module), name)
        elif not name.startswith("__") and importlib.util.find_spec(f"{package}.{name}") is not None:
            value = importlib.import_module(f"{package}.{name}")
        else:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        setattr(sys.modules[package], name, value)
        return value

    return __getattr__
