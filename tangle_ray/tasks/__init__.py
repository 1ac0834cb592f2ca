"""Tasks: what a model family trains on and how it is scored (``tasks/base.py`` says what a task provides).

Every module of this package is imported with it; a task registers itself with ``register_task``.
"""

from __future__ import annotations

import importlib
import pkgutil

from tangle_ray.errors import ConfigError
from tangle_ray.tasks.base import Batches, EvalSet, Metric, Samples, Task

TASKS: dict[str, Task] = {}


def register_task(cls: type[Task]) -> type[Task]:
    TASKS[cls.name] = cls()
    return cls


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise ConfigError(f"task {name!r} is not known; allowed: {sorted(TASKS)}")
    return TASKS[name]


for _module in pkgutil.iter_modules(__path__):
    if _module.name != "base":
        importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["TASKS", "Batches", "EvalSet", "Metric", "Samples", "Task", "get_task", "register_task"]
