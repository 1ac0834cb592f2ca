"""The methods a campaign compares, as pipelines of stages: how each reaches an architecture.

TangleNAS trains and chooses in one search; SPOS trains a supernet (one per seed, shared by random and evolutionary
search), then a Tune search chooses. Each training method declares its pipelines (``Method.pipelines``), so a new
method file brings its own.
"""

from __future__ import annotations

from dataclasses import dataclass

from tangle_ray.methods import DEFAULT_METHOD, METHODS


@dataclass(frozen=True)
class Pipeline:
    """How a campaign method reaches an architecture: a training stage of ``train`` kind (the command
    ``search`` or ``supernet`` names its method), then a Tune stage of ``search`` kind, or none when the
    training stage chooses by itself."""

    train: str
    search: str | None = None


PIPELINES = {name: Pipeline(train=method.command, search=search)  # the default method's first
             for method in sorted(METHODS.values(), key=lambda m: m.name != DEFAULT_METHOD)
             for name, search in method.pipelines.items()}
REFERENCE = next(iter(METHODS[DEFAULT_METHOD].pipelines))  # what every other pipeline is compared with
DEFAULT_PIPELINES = [name for method in sorted(METHODS.values(), key=lambda m: m.name != DEFAULT_METHOD)
                     if method.compared_by_default for name in method.pipelines]  # the paper's three
