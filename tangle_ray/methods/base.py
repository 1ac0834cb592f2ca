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

from tangle_ray.divergence import Problem, first, loss_problem, norm_problem, poison
from tangle_ray.errors import ConfigError
from tangle_ray.keyed import Purpose, keyed_rng
from tangle_ray.space import Arch, SearchSpace
from tangle_ray.tasks import Batches, Task

if TYPE_CHECKING:  # the run config imports this registry; methods import nothing from train/
    from tangle_ray.supernet import Supernet
    from tangle_ray.train.config import RunPlan, TrainConfig

METHODS: dict[str, type[Method]] = {}
DEFAULT_METHOD = "tanglenas"  # what a run file without ``method`` trains


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

    def step_loss(self, losses: list[Tensor]) -> float:
        """This rank's loss of a step, ``sum_j loss_j / grad_accum_steps`` added in micro-batch order as
        ``loss.item()`` would give it, read from the device once per step rather than once per micro-batch."""
        total = 0.0
        for value in torch.stack(losses).tolist():
            total += value / self.cfg.grad_accum_steps
        return total

    def mean_over_ranks(self, value: float) -> float:
        if self.world == 1:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return float(t) / self.world

    def any_rank(self, flag: bool) -> bool:
        """Whether ``flag`` holds on any rank (a collective: every rank must call it at the same point)."""
        if self.world == 1:
            return flag
        t = torch.tensor([1.0 if flag else 0.0], device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

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
    learns_alphas: ClassVar[bool] = False  # it learns architecture parameters (their optimizer is used)
    # what a campaign compares: pipeline name -> the Tune search that chooses on this method's supernet
    # (``random``, ``evolution``), or None where the method's own run chooses (``campaign/pipelines.py``)
    pipelines: ClassVar[dict[str, str | None]] = {}
    compared_by_default: ClassVar[bool] = True  # a campaign without ``methods`` compares its pipelines
    Settings: ClassVar[type | None] = None  # the dataclass of its ``method_settings`` section, if it has one

    @classmethod
    def settings_of(cls, cfg: TrainConfig, source: str = "run config") -> Any:
        """The method's own settings (``method_settings``), typed and checked; None for a method without any."""
        from tangle_ray.configs import build

        if cls.Settings is None:
            if cfg.method_settings:
                raise ConfigError(f"{source}: method_settings = {cfg.method_settings!r}: method {cls.name!r} has no "
                                  "settings of its own; remove method_settings")
            return None
        return build(cls.Settings, cfg.method_settings, source, "run config", "method_settings.")

    @classmethod
    def check(cls, cfg: TrainConfig, source: str) -> None:
        """Refuse settings this method cannot honour (naming file, key, value and what is allowed)."""
        cls.settings_of(cfg, source)
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
    def check_arguments(cls, args: argparse.Namespace, settings: dict[str, Any]) -> None:
        """Refuse a combination of the command's options that cannot work with the run file's and command line's
        ``settings`` (naming the options, not the settings they become)."""

    @classmethod
    def run_tag(cls, cfg: TrainConfig) -> str:
        """The method's part of a derived run name."""
        return cls.name

    @classmethod
    def describe(cls, cfg: TrainConfig) -> str:
        """The method as the report's first line names it."""
        return f"`{cls.name}`"

    # ------------------------------------------------------------ what the run's report (summary.md) says
    @classmethod
    def loss_note(cls) -> str:
        """What the report's final training loss is the loss of."""
        return "weight split"

    @classmethod
    def anytime_note(cls, cfg: TrainConfig, label: str, changes: int) -> str:
        """The report's words on the any-time curve: what it scores (``label``: the metric) and why it moves;
        ``changes``: how often the scored architecture changed between the curve's points."""
        return (f"Validation {label} of the {cls.followed} (current weights, eval mode) on {cfg.eval_samples} "
                "fixed validation samples.")

    @classmethod
    def export_note(cls, export_dir: Any) -> str:
        """The report's line on what the export (``RUN/export``) holds."""
        return f"Exported: `{export_dir}`"

    @classmethod
    def exported_arch(cls, supernet: Supernet, tensors: dict[str, Tensor]) -> Arch | None:
        """Restore what the run's checkpoint adds to the supernet (``tensors``); the architecture it chose."""
        return None

    def __init__(self, ctx: Context):
        self.ctx = ctx
        self.engine: Any = None
        self.weight_grad_norm: float | None = None  # of the last weight step (None: not computed)

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

    def problem(self, metrics: dict[str, float]) -> Problem | None:
        """The first value of the step just taken that shows divergence on this rank (``tangle_ray.divergence``),
        in the order the step computed them: its losses (``metrics``), then the weights' gradient norm."""
        return first([*(loss_problem(k, v) for k, v in metrics.items()),
                      norm_problem("weight gradient norm", self.weight_grad_norm, "weights")])

    def inject_nan(self, into: str) -> None:
        """The ``inject_nan_at_step`` drill, on this rank, before the step: NaN weights (``into = "weights"``)."""
        poison(self.engine.module)

    def compile(self, module: nn.Module) -> None:
        """Compile the module in place for ``compile = true``."""
        module.compile_superposition()

    def weight_step(self, step: int, forward: Callable[[nn.Module, Tensor, Tensor, int], Tensor]) -> float:
        """Forward, backward and DeepSpeed step over this rank's micro-batches of the weight split."""
        ctx, losses, norm = self.ctx, [], None
        own_norm = not hasattr(self.engine.optimizer, "_global_grad_norm")  # ZeRO-0 fp32: DeepSpeed keeps none
        for j in ctx.micro_indices():
            x, y = ctx.train.get(step, j)
            with ctx.keyed(step, j, Purpose.WEIGHT_FORWARD):
                loss = forward(self.engine, x.to(ctx.device), y.to(ctx.device), j)
            self.engine.backward(loss)
            if own_norm and self.engine.is_gradient_accumulation_boundary():  # gradients averaged, not yet used
                grads = [p.grad.detach().norm() for p in self.engine.module.parameters() if p.grad is not None]
                norm = float(torch.stack(grads).norm()) if grads else 0.0
            self.engine.step()
            losses.append(loss.detach())
        if not own_norm:  # ZeRO: the global norm (inf where it found a non-finite gradient and skipped the step)
            norm = self.engine.get_global_grad_norm()
        self.weight_grad_norm = None if norm is None else float(norm)
        return ctx.mean_over_ranks(ctx.step_loss(losses))


