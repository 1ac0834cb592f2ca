"""The task seam: what a model family trains on and how it is scored.

A task owns its data section of a run file (a dataclass), preparing and checking that data on the driver,
the training batches (keyed by seed, split, step and global micro-batch index, so that 1 and N workers and
resumed runs see the same data), the evaluation set of a split (read batch by batch: an ImageNet validation
set is never held in memory), the metrics of an evaluation (each batch tallied, the tallies summed exactly in
batch order, so that a set scored in shards on N workers gives what one worker gives), the Tune metric and
its mode, and the unit of throughput.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

import numpy as np
import torch
from torch import Tensor

from tangle_ray.space import SearchSpace


class Batches(Protocol):
    """Training or architecture batches: ``get(step, micro_index) -> (x, y)``, a pure function of its key."""

    def get(self, step: int, micro_index: int) -> tuple[Tensor, Tensor]: ...


class EvalSet(Protocol):
    """A fixed evaluation set, read batch by batch: the same samples in the same order for every reader.
    Batch ``i`` of size ``b`` holds samples ``i*b .. i*b+b-1``."""

    def __len__(self) -> int: ...

    def batches(self, size: int, which: Sequence[int]) -> Iterator[tuple[Tensor, Tensor]]:
        """The inputs and targets of batches ``which``, in that order."""
        ...


@dataclass(frozen=True)
class Samples:
    """An evaluation set held in memory."""

    x: Tensor
    y: Tensor

    def __post_init__(self) -> None:
        if len(self.x) == 0 or len(self.x) != len(self.y):
            raise ValueError(f"expected equal non-empty inputs and targets, got {tuple(self.x.shape)}, "
                             f"{tuple(self.y.shape)}")

    def __len__(self) -> int:
        return len(self.x)

    def batches(self, size: int, which: Sequence[int]) -> Iterator[tuple[Tensor, Tensor]]:
        for i in which:
            yield self.x[i * size:(i + 1) * size], self.y[i * size:(i + 1) * size]


def num_batches(samples: EvalSet, size: int) -> int:
    return math.ceil(len(samples) / size)


def materialize(samples: EvalSet, size: int = 64) -> tuple[Tensor, Tensor]:
    """The whole set as two tensors (for small sets: calibration images, tests)."""
    parts = list(samples.batches(size, range(num_batches(samples, size))))
    return torch.cat([x for x, _ in parts]), torch.cat([y for _, y in parts])


@dataclass
class Tally:
    """What an evaluation has seen so far: each unit's loss (a token's, an image's), each sample's loss and
    integer counts (e.g. correct top-1 predictions). Tallies of consecutive batches add up by concatenation,
    so a set scored in any grouping of its batches gives the same tally, hence the same metrics."""

    unit_losses: list[np.ndarray] = field(default_factory=list)  # float64, one array per batch
    sample_losses: list[np.ndarray] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)

    def add(self, other: Tally) -> Tally:
        self.unit_losses += other.unit_losses
        self.sample_losses += other.sample_losses
        for k, n in other.counts.items():
            self.counts[k] = self.counts.get(k, 0) + n
        return self

    @classmethod
    def of(cls, tallies: Iterable[Tally]) -> Tally:
        """The sum of ``tallies`` (in batch order)."""
        total = cls()
        for t in tallies:
            total.add(t)
        return total

    @property
    def samples(self) -> int:
        return sum(len(a) for a in self.sample_losses)

    @property
    def units(self) -> int:
        return sum(len(a) for a in self.unit_losses)

    def mean_loss(self) -> float:
        """The exactly rounded mean of the units' losses (``math.fsum``): independent of the batch grouping."""
        return math.fsum(np.concatenate(self.unit_losses).tolist()) / self.units

    def per_sample(self) -> list[float]:
        return np.concatenate(self.sample_losses).tolist()


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

    def check_helpers(self, data: Any) -> None:
        """After joining Ray, on the driver: ``ClusterError`` when helper actors the batches start in the
        cluster (decoding actors) can never run there. Default: batches are read in the trainer, nothing to check."""

    def eval_set(self, data: Any, fixed: dict[str, Any], split: str, num: int, seed: int) -> EvalSet:
        """A fixed evaluation set of ``num`` samples of ``split`` (the same for every caller), read from the data
        folder batch by batch; it pickles small (a path and sample indices), to be read where it is scored."""
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

    def tally(self, output: Tensor, y: Tensor) -> Tally:
        """One batch's tally from the model's output and the targets."""
        raise NotImplementedError

    def summarize(self, tally: Tally) -> dict[str, Any]:
        """Every metric of ``self.metrics``, the number of samples and units it rests on, and
        ``sample_losses``: each sample's cross-entropy in order (a text window's mean over its tokens), for tests
        that pair two models over the same samples."""
        raise NotImplementedError

    def tallies(self, output_of: Callable[[Tensor], Tensor], samples: EvalSet, batch_size: int,
                which: Sequence[int]) -> list[Tally]:
        """The tallies of batches ``which`` of ``samples``, read and scored one at a time."""
        return [self.tally(output_of(x), y) for x, y in samples.batches(batch_size, which)]

    def evaluate(self, output_of: Callable[[Tensor], Tensor], samples: EvalSet, batch_size: int) -> dict[str, Any]:
        """``summarize`` of every batch of ``samples``. The same batch size reproduces the metrics bit for bit;
        another gives them to float32 round-off (kernels differ with the number of rows)."""
        which = range(num_batches(samples, batch_size))
        return self.summarize(Tally.of(self.tallies(output_of, samples, batch_size, which)))
