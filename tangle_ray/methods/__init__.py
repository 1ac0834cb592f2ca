"""Training methods, one module each, registered on import (as model families are): ``base.py`` says what a
method provides. Adding a method is one new module here plus its tests."""

from __future__ import annotations

import importlib
import pkgutil

from tangle_ray.methods.base import DEFAULT_METHOD, METHODS, Context, Method, get_method, method_for, register_method

for _module in pkgutil.iter_modules(__path__):
    if _module.name != "base":
        importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["DEFAULT_METHOD", "METHODS", "Context", "Method", "get_method", "method_for", "register_method"]
