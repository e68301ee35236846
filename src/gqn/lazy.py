"""Names of a package that load on first use (PEP 562): importing one light module of the package (an error class,
a config helper) does not import the heavy ones (torch, Lightning), so the command lines' ``--help`` answers fast."""

from __future__ import annotations

import importlib
import sys


def lazy_names(package: str, where: dict[str, list[str]]):
    """``(__all__, __getattr__, __dir__)`` for ``package``, whose names ``where`` lists by the module defining them::

        __all__, __getattr__, __dir__ = lazy_names(__name__, {"pkg.heavy": ["Model"], "pkg.errors": ["Error"]})
    """
    modules = {name: module for module, names in where.items() for name in names}

    def __getattr__(name: str):
        if name not in modules:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(modules[name]), name)
        setattr(sys.modules[package], name, value)  # once
        return value

    def __dir__() -> list[str]:
        return sorted(set(vars(sys.modules[package])) | set(modules))

    return sorted(modules), __getattr__, __dir__
