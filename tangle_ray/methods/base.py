"""What every training method provides: the worker-side hooks of the loop and the driver-side facts and checks.

A method is one module of ``tangle_ray/methods/`` with a :class:`Method` subclass decorated with
``@register_method``. The worker loop, the run config, the runner, the exporter, the report and the CLI ask the
method (``get_method(cfg.method)``); none of them branches on a method's name.

The micro-batches of a global batch are numbered 0..G-1 and rank r takes r*gas .. r*gas+gas-1; batches, random
mixing weights, SPOS paths and every draw inside a forward (dropout, drop path) are keyed by (seed, step,
micro-batch index, purpose) (``keyed.py``), so a run does not depend on its number of workers, its gradient
accumulation or its restarts.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch
import torch.distributed as dist
from torch import Tensor, nn

from tangle_ray.errors import ConfigError
from tangle_ray.keyed import Purpose, keyed_rng
from tangle_ray.space import Arch, SearchSpace
from tangle_ray.tasks import Batches, Task

if TYPE_CHECKING:  # the run config imports this registry; methods import nothing from train/
    from tangle_ray.supernet import Supernet
    from tangle_ray.train.config import RunPlan, TrainConfig

METHODS: dict[str, type[Method]] = {}


def register_method(cls: type[Method]) -> type[Method]:
    METHODS[cls.name] = cls
    return cls


def get_method(name: object, source: str = "run config") -> type[Method]:
    if not isinstance(name, str) or name not in METHODS:
        raise ConfigError(f"{source}: method = {name!r} is not known; allowed: {sorted(METHODS)}")
    return METHODS[name]


def method_for(command: str) -> type[Method]:
    """The method that ``tangle-ray COMMAND`` runs."""
    return next(m for m in METHODS.values() if m.command == command)


@dataclass
class Context:
    """What every method needs to know about the run and this rank."""

    plan: RunPlan
    rank: int
    world: int
    device: torch.device
    train: Batches  # the weight split
    valid: Batches  # the architecture split

    @property
    def cfg(self) -> TrainConfig:
        return self.plan.config

    @property
    def space(self) -> SearchSpace:
        return self.plan.space

    @property
    def task(self) -> Task:
        return self.plan.task

    def micro_indices(self) -> range:
        gas = self.cfg.grad_accum_steps
        return range(self.rank * gas, (self.rank + 1) * gas)

    def mean_over_ranks(self, value: float) -> float:
        if self.world == 1:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return float(t) / self.world

    def keyed(self, step: int, j: int, purpose: Purpose):
        """The random state of micro-batch ``j``'s forward at ``step`` (dropout, drop path)."""
        return keyed_rng(self.device, self.cfg.seed, step, j, purpose)

    def model_overrides(self) -> dict[str, Any]:
        return {} if self.cfg.dropout is None else {"dropout": self.cfg.dropout}


class Method:
    """The hooks the worker calls: ``build``, ``compile``, ``attach``, then ``step`` per step; ``reported_arch``
    (what the run chooses, None if nothing) for progress and the run's result; ``eval_arch`` for the any-time
    curve; ``state``/``load_state`` for checkpoints.

    Class attributes and class methods are what the driver asks before and after a run: which command runs the
    method, its checks of a run config, the name tag and mixer, what an export writes and what the report says."""

    name: ClassVar[str]
    command: ClassVar[str]  # the ``tangle-ray`` command that runs this method
    help: ClassVar[str]  # one line for ``tangle-ray COMMAND --help``
    trains_supernet: ClassVar[bool] = True  # False: trains one architecture (``arch``), exported as a model
    chooses_arch: ClassVar[bool] = False  # True: the run's result is an architecture (compared with random ones)
    superposed_loss: ClassVar[bool] = False  # the training loss is of the superposed supernet
    followed: ClassVar[str] = "model"  # what the any-time curve scores, for the report

    @classmethod
    def check(cls, cfg: TrainConfig, source: str) -> None:
        """Refuse settings this method cannot honour (naming file, key, value and what is allowed)."""
        if cfg.compile and cfg.zero_stage == 3:
            raise ConfigError(f"{source}: compile = true works under ZeRO stages 0-2 (got zero_stage 3, whose "
                              "parameter hooks run inside the forward); set compile: false or zero_stage: 2")
        if not cls.trains_supernet:
            return
        if cfg.arch is not None:
            raise ConfigError(f"{source}: arch is set, but method {cls.name!r} trains a whole supernet and would "
                              "ignore it; remove arch (`tangle-ray retrain --arch` trains one architecture)")
        if cfg.init != "scratch":
            raise ConfigError(f"{source}: init {cfg.init!r} applies to method 'fixed' (`tangle-ray retrain --init "
                              f"{cfg.init}`); a {cls.name} run trains its supernet from scratch: remove init")

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        """The method's own options of its command (beyond the run file and settings)."""

    @classmethod
    def settings_from(cls, args: argparse.Namespace) -> list[str]:
        """Those options as run settings (``key=value``)."""
        return []

    @classmethod
    def run_tag(cls, cfg: TrainConfig) -> str:
        """The method's part of a derived run name."""
        return cls.name

    @classmethod
    def describe(cls, cfg: TrainConfig) -> str:
        """The method as the report's first line names it."""
        return f"`{cls.name}`"

    @classmethod
    def exported_arch(cls, supernet: Supernet, tensors: dict[str, Tensor]) -> Arch | None:
        """Restore what the run's checkpoint adds to the supernet (``tensors``); the architecture it chose."""
        return None

    def __init__(self, ctx: Context):
        self.ctx = ctx
        self.engine: Any = None

    def build(self) -> nn.Module:
        raise NotImplementedError

    def attach(self, engine: Any) -> None:
        self.engine = engine

    def step(self, step: int) -> dict[str, float]:
        raise NotImplementedError

    def reported_arch(self) -> Arch | None:
        raise NotImplementedError

    def eval_arch(self) -> Arch:
        """The architecture the any-time curve follows."""
        return self.reported_arch()

    def output_of(self, module: nn.Module) -> Callable[[Tensor], Tensor]:
        """The module's output for a batch, as the evaluated architecture computes it (single path)."""
        arch = self.eval_arch()
        return lambda x: module(x, None, arch=arch)[0]

    def progress(self) -> dict[str, Any]:
        """What a progress row adds (e.g. the entropy of the architecture weights)."""
        return {}

    def state(self) -> tuple[dict[str, Any], dict[str, Tensor]]:
        """What a checkpoint adds: JSON-able state and named tensors."""
        return {}, {}

    def load_state(self, state: dict[str, Any], tensors: dict[str, Tensor]) -> None:
        pass

    def compile(self, module: nn.Module) -> None:
        """Compile the module in place for ``compile = true``."""
        module.compile_superposition()

    def weight_step(self, step: int, forward: Callable[[nn.Module, Tensor, Tensor, int], Tensor]) -> float:
        """Forward, backward and DeepSpeed step over this rank's micro-batches of the weight split."""
        ctx, total = self.ctx, 0.0
        for j in ctx.micro_indices():
            x, y = ctx.train.get(step, j)
            with ctx.keyed(step, j, Purpose.WEIGHT_FORWARD):
                loss = forward(self.engine, x.to(ctx.device), y.to(ctx.device), j)
            self.engine.backward(loss)
            self.engine.step()
            total += loss.item() / ctx.cfg.grad_accum_steps
        return ctx.mean_over_ranks(total)


