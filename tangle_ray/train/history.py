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
    ``anytime`` (the followed architecture's validation scores, and the architecture); per attempt (a start or
    a restart): ``startups`` (rank 0's wall clock when it entered the training function and when it was ready
    to train, and the seconds of each set-up part)."""

    metrics: list[Row] = field(default_factory=list)
    anytime: list[Row] = field(default_factory=list)
    alphas: list[Row] = field(default_factory=list)
    resources: list[Row] = field(default_factory=list)
    startups: list[Row] = field(default_factory=list)  # per attempt, rank 0: when it entered, its set-up parts

    @property
    def last_metrics(self) -> Row:
        """The latest log step's row ({} before the first)."""
        return self.metrics[-1] if self.metrics else {}

    def timeline(self, fit_started: float, fit_ended: float) -> dict[str, float]:
        """Where the wall seconds of ``fit()`` went, for the attempt that finished: Ray Train starting its
        workers (``start_s``, from ``fit_started`` to rank 0 entering the training function, after any failed
        attempts; of which ``process_s`` after rank 0's process began: imports, the process group), rank 0's
        set-up parts, the training loop to its last log step (``loop_s``: steps, any-time evaluations,
        checkpoints) and the rest (``end_s``: the last evaluation and checkpoint, Ray Train stopping); {} for a
        history without start-up records."""
        if not self.startups:
            return {}
        attempt = self.startups[-1]
        loop = self.last_metrics.get("elapsed_s", 0.0)
        parts = {k: v for k, v in attempt.items() if k.endswith("_s")}
        began = max(attempt["process_at"], fit_started)  # a process Ray started before fit(): from fit()
        return {"fit_s": fit_ended - fit_started, "start_s": attempt["entered_at"] - fit_started,
                "process_s": attempt["entered_at"] - began, **parts, "loop_s": loop,
                "end_s": fit_ended - attempt["ready_at"] - loop}

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
