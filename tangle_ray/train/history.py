"""A run's history: what rank 0 records as the run goes, saved in every checkpoint and read back here only.

Rows are JSON objects keyed by step; their metric names follow the task (``valid_loss``, ``valid_top1``, ...).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

from tangle_ray.errors import DataError, shorten

Row = dict[str, Any]


@dataclass
class RunHistory:
    """Per log step: ``metrics`` (losses, learning rate, throughput, time), ``alphas`` (architecture weights,
    for methods that learn them) and ``resources`` (each rank's memory and timers); per evaluation:
    ``anytime`` (the followed architecture's validation scores, and the architecture)."""

    metrics: list[Row] = field(default_factory=list)
    anytime: list[Row] = field(default_factory=list)
    alphas: list[Row] = field(default_factory=list)
    resources: list[Row] = field(default_factory=list)

    @property
    def last_metrics(self) -> Row:
        """The latest log step's row ({} before the first)."""
        return self.metrics[-1] if self.metrics else {}

    def to_json(self) -> dict[str, list[Row]]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: Any, where: str) -> RunHistory:
        """The history a checkpoint holds; a DataError naming ``where`` if it is not one."""
        names = [f.name for f in fields(cls)]
        if not isinstance(data, dict) or not set(data) <= set(names):
            raise DataError(f"{where}: history = {shorten(data)} is not a run history (lists {names})")
        for name, rows in data.items():
            if not isinstance(rows, list) or not all(isinstance(r, dict) and isinstance(r.get("step"), int)
                                                     for r in rows):
                raise DataError(f"{where}: history.{name} must be a list of rows with a step")
        return cls(**{name: list(rows) for name, rows in data.items()})
