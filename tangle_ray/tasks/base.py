"""The task seam: what a model family trains on and how it is scored.

A task owns its data section of a run file (a dataclass), preparing and checking that data on the driver,
the training batches (keyed by seed, split, step and global micro-batch index, so that 1 and N workers and
resumed runs see the same data), the evaluation set of a split, the metrics of an evaluation (summed
exactly, so they do not depend on the batch size), the Tune metric and its mode, and the unit of throughput.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

import torch
from torch import Tensor

from tangle_ray.space import SearchSpace


class Batches(Protocol):
    """Training or architecture batches: ``get(step, micro_index) -> (x, y)``, a pure function of its key."""

    def get(self, step: int, micro_index: int) -> tuple[Tensor, Tensor]: ...


@dataclass(frozen=True)
class Metric:
    """A metric a task reports: its key, how a person reads it and which way is better."""

    key: str
    label: str
    mode: str  # "min" or "max"
    fmt: str = ".4f"

    @property
    def sign(self) -> float:
        """+1 for a metric to minimise, -1 for one to maximise: ``sign * value`` is smaller when better."""
        return 1.0 if self.mode == "min" else -1.0

    @property
    def higher_is_better(self) -> bool:
        return self.mode == "max"

    def better(self, a: float, b: float | None) -> bool:
        """Whether ``a`` is strictly better than ``b`` (anything beats ``None``)."""
        return b is None or self.sign * a < self.sign * b


class Task:
    """Base of every task; subclasses fill in the class attributes and methods."""

    name: ClassVar[str]
    data_config: ClassVar[type]  # the dataclass of a run file's ``data:`` section for this task
    unit: ClassVar[str]  # what throughput counts: "tokens" or "images"
    metrics: ClassVar[tuple[Metric, ...]]  # the first one is what the two-stage search optimises

    @property
    def objective(self) -> Metric:
        return self.metrics[0]

    def prepare(self, data: Any, space: SearchSpace, seed: int) -> Any:
        """On the driver: check (and, where the config says how, create) the data; return it resolved."""
        raise NotImplementedError

    # ``fixed`` below: the fixed settings of a space (``space.fixed``), or those a standalone model reports
    # (``ModelFamily.model_settings``): input size, vocabulary or classes, context length.
    def batches(self, data: Any, fixed: dict[str, Any], split: str, micro_batch: int, seed: int,
                micro_per_step: int = 1) -> Batches:
        """Keyed micro-batches of ``split``; ``micro_per_step``: the micro-batches of a global batch (all ranks),
        for samplers that walk through the data in order (epochs)."""
        raise NotImplementedError

    def eval_set(self, data: Any, fixed: dict[str, Any], split: str, num: int, seed: int) -> tuple[Tensor, Tensor]:
        """A fixed evaluation set of ``num`` samples of ``split`` (the same for every caller)."""
        raise NotImplementedError

    def calibration_set(self, data: Any, fixed: dict[str, Any]) -> list[Tensor]:
        """The fixed batches of inputs a family that ``calibrates`` (batch norms) prepares an extracted model on
        before it is scored (``ModelFamily.prepare_for_eval``); the same for every caller. Default: none."""
        return []

    def random_batch(self, fixed: dict[str, Any], n: int, gen: torch.Generator) -> tuple[Tensor, Tensor]:
        """``n`` random inputs and targets of the right shapes and ranges (for tests and benchmarks)."""
        raise NotImplementedError

    def units_per_sample(self, fixed: dict[str, Any]) -> int:
        """Throughput units in one sample (tokens of a window, or 1 image)."""
        raise NotImplementedError

    def evaluate(self, output_of: Callable[[Tensor], Tensor], x: Tensor, y: Tensor, batch_size: int) -> dict[str, Any]:
        """Every metric of ``self.metrics`` on (x, y), the number of samples and units it rests on, and
        ``sample_losses``: each sample's cross-entropy in order (a text window's mean over its tokens), for tests
        that pair two models over the same samples."""
        raise NotImplementedError
