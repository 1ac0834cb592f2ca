"""The methods a campaign compares, as pipelines of stages: how each reaches an architecture.

TangleNAS trains and chooses in one search; SPOS trains a supernet (one per seed, shared by random and evolutionary
search), then a Tune search chooses. A new method for campaigns is one entry here.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Pipeline:
    """How a campaign method reaches an architecture: a training stage of ``train`` kind (the command
    ``search`` or ``supernet`` names its method), then a Tune stage of ``search`` kind, or none when the
    training stage chooses by itself."""

    train: str
    search: str | None = None


PIPELINES = {
    "tanglenas": Pipeline(train="search"),
    "spos-random": Pipeline(train="supernet", search="random"),
    "spos-evolution": Pipeline(train="supernet", search="evolution"),
}
