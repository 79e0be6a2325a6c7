"""Module paths of earlier versions, kept importable: a pickled optimizer names its class by module
path, and extensions import the modules that the documentation named. Each earlier path is a module
that reads its names from the modules that hold them now."""
from __future__ import annotations

import importlib
import sys
import types


def keep_earlier_paths(package: str, paths: dict[str, tuple[str, ...]]) -> None:
    """Register ``package.<old>`` for every entry of ``paths`` (old name → the modules, relative to
    ``package``, that now hold its names, searched in order)."""
    for old, new in paths.items():
        modules = tuple(importlib.import_module(f"{package}.{module}") for module in new)
        name = f"{package}.{old}"
        alias = types.ModuleType(name, f"Earlier path of {', '.join(m.__name__ for m in modules)} (kept importable).")

        def find(attr: str, modules=modules, name=name):
            for module in modules:
                if hasattr(module, attr):
                    return getattr(module, attr)
            raise AttributeError(f"module {name!r} has no attribute {attr!r}")

        alias.__getattr__ = find
        sys.modules[name] = alias
        if not hasattr(sys.modules[package], old):  # (``layerwise`` is also the package's function)
            setattr(sys.modules[package], old, alias)
