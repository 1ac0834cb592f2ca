"""Training methods as strategies of the worker loop: TangleNAS (bilevel), SPOS and one fixed architecture.

Each method builds the module DeepSpeed trains, runs one optimizer step, names the architecture the run
reports, and says what a checkpoint adds. The micro-batches of a global batch are numbered 0..G-1 and rank r
takes r*gas .. r*gas+gas-1; batches, random mixing weights, SPOS paths and every draw inside a forward
(dropout, drop path) are keyed by (seed, step, micro-batch index, purpose) (``keyed.py``), so a run does not
depend on its number of workers, its gradient accumulation or its restarts.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.distributed as dist
from torch import Tensor, nn

from tangle_ray.folders import load_supernet
from tangle_ray.keyed import Purpose, keyed_generator, keyed_rng
from tangle_ray.mixers import entropy, get_mixer
from tangle_ray.space import Arch, SearchSpace
from tangle_ray.tasks import Batches, Task
from tangle_ray.train.config import RunPlan, TrainConfig


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
    """The hooks the worker calls: ``build``, ``attach``, then ``step`` per step; ``reported_arch`` (what the
    run chooses, None if nothing) for progress and the run's result; ``eval_arch`` for the any-time curve;
    ``state``/``load_state`` for checkpoints."""

    name: ClassVar[str]

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


class TangleNAS(Method):
    """First-order alternating bilevel step: an architecture step on the architecture split (gradients only
    into the alphas, averaged over ranks), then a weight step on the weight split (mixing weights sampled from
    the detached alphas)."""

    name = "tanglenas"

    def build(self) -> nn.Module:
        ctx = self.ctx
        supernet = ctx.space.build_supernet(**ctx.model_overrides())
        self.alphas = {k: v.to(ctx.device).detach().requires_grad_() for k, v in supernet.alphas.items()}
        a = ctx.cfg.arch_optimizer
        self.arch_opt = torch.optim.Adam(list(self.alphas.values()), lr=a.lr, betas=a.betas,
                                         weight_decay=a.weight_decay)
        self.mixer = get_mixer(ctx.cfg.mixer_name, gdas_schedule=ctx.cfg.gdas_schedule)
        return supernet.net

    def step(self, step: int) -> dict[str, float]:
        metrics = {"arch_loss": self._arch_step(step)}
        detached = {k: a.detach() for k, a in self.alphas.items()}
        metrics["train_loss"] = self.weight_step(
            step, lambda m, x, y, j: m(x, y, weights=self._weights(detached, step, j, Purpose.WEIGHT_MIX))[1])
        if self.ctx.cfg.debug_checks:
            self._assert_alphas_agree(step)
        return metrics

    def _weights(self, alphas: dict[str, Tensor], step: int, j: int, purpose: Purpose) -> dict[str, Tensor]:
        gen = keyed_generator(self.ctx.cfg.seed, step, j, purpose)
        return self.mixer(alphas, gen, step=step, steps=self.ctx.cfg.steps)

    def _arch_step(self, step: int) -> float:
        ctx, alphas = self.ctx, list(self.alphas.values())
        self.arch_opt.zero_grad(set_to_none=False)
        total = 0.0
        for j in ctx.micro_indices():
            x, y = ctx.valid.get(step, j)
            weights = self._weights(self.alphas, step, j, Purpose.ARCH_MIX)
            # the bare module: no DeepSpeed backward hooks, and gradients flow into the alphas alone
            with ctx.keyed(step, j, Purpose.ARCH_FORWARD):
                loss = self.engine.module(x.to(ctx.device), y.to(ctx.device), weights=weights)[1]
            (loss / ctx.cfg.grad_accum_steps).backward(inputs=alphas)
            total += loss.item() / ctx.cfg.grad_accum_steps
        if ctx.world > 1:
            flat = torch.cat([a.grad.reshape(-1) for a in alphas])
            dist.all_reduce(flat)
            flat /= ctx.world
            torch.nn.utils.vector_to_parameters(flat, [a.grad for a in alphas])
        torch.nn.utils.clip_grad_norm_(alphas, ctx.cfg.arch_optimizer.grad_clip)
        self.arch_opt.step()
        return ctx.mean_over_ranks(total)

    def _assert_alphas_agree(self, step: int) -> None:
        flat = torch.cat([a.detach().reshape(-1) for a in self.alphas.values()])
        gathered = [torch.empty_like(flat) for _ in range(self.ctx.world)]
        dist.all_gather(gathered, flat)
        if not all(torch.equal(g, flat) for g in gathered):
            raise RuntimeError(f"architecture parameters differ between ranks at step {step}")

    def reported_arch(self) -> Arch:
        return self.ctx.space.arch_from_weights(self.alphas)

    def progress(self) -> dict[str, Any]:
        probs = {k: torch.softmax(a.detach().float().cpu(), -1).tolist() for k, a in self.alphas.items()}
        return {"arch_entropy": entropy(self.alphas), "alphas": probs}

    def state(self) -> tuple[dict[str, Any], dict[str, Tensor]]:
        opt = self.arch_opt.state_dict()
        tensors = {f"alphas.{k}": a for k, a in self.alphas.items()}
        tensors |= {f"arch_opt.{i}.{k}": v for i, s in opt["state"].items() for k, v in s.items()}
        keys = {i: list(s) for i, s in opt["state"].items()}
        return {"arch_opt_groups": opt["param_groups"], "arch_opt_keys": keys}, tensors

    def load_state(self, state: dict[str, Any], tensors: dict[str, Tensor]) -> None:
        for name, alpha in self.alphas.items():
            alpha.data.copy_(tensors[f"alphas.{name}"].to(self.ctx.device))
        opt_state = {int(i): {k: tensors[f"arch_opt.{i}.{k}"] for k in keys}
                     for i, keys in state["arch_opt_keys"].items()}
        self.arch_opt.load_state_dict({"state": opt_state, "param_groups": state["arch_opt_groups"]})


def spos_path(space: SearchSpace, seed: int, step: int, key: int) -> Arch:
    """The uniformly sampled path of micro-batch ``key`` at ``step`` (a pure function of its arguments)."""
    return space.sample(random.Random(keyed_generator(seed, step, key).initial_seed()))


class SPOS(Method):
    """Single-path one-shot, as the reference trains it: a fresh uniformly sampled path for every micro-batch.

    The path is keyed by the global micro-batch index, so 1 and N workers train the same paths. ZeRO-3 needs
    every rank on the same path at the same time: there the key is the accumulation slot (the micro-batch's
    place among this rank's ``gas``), so a step trains ``gas`` paths instead of ``G`` and runs with different
    numbers of workers differ.
    """

    name = "spos"

    def build(self) -> nn.Module:
        return self.ctx.space.build_supernet(**self.ctx.model_overrides()).net

    def path_key(self, j: int) -> int:
        return j % self.ctx.cfg.grad_accum_steps if self.ctx.cfg.zero_stage == 3 else j

    def step(self, step: int) -> dict[str, float]:
        seed, space = self.ctx.cfg.seed, self.ctx.space

        def forward(m: nn.Module, x: Tensor, y: Tensor, j: int) -> Tensor:
            arch = spos_path(space, seed, step, self.path_key(j))
            return m(x, y, arch=arch, keep_all_params=True)[1]

        return {"train_loss": self.weight_step(step, forward)}

    def reported_arch(self) -> None:
        """SPOS chooses nothing: the two-stage search (``tangle-ray tune``) does."""
        return None

    def eval_arch(self) -> Arch:
        return self.ctx.space.largest()


class Fixed(Method):
    """One architecture, from scratch or with the weights it inherits from a supernet."""

    name = "fixed"

    def build(self) -> nn.Module:
        ctx, arch = self.ctx, self.ctx.plan.arch
        if ctx.cfg.init == "inherit":
            return load_supernet(ctx.cfg.init_from, ctx.space, **ctx.model_overrides()).extract(arch)
        return ctx.space.family.build_model(ctx.space, arch, **ctx.model_overrides())

    def step(self, step: int) -> dict[str, float]:
        return {"train_loss": self.weight_step(step, lambda m, x, y, j: m(x, y)[1])}

    def reported_arch(self) -> Arch:
        return self.ctx.plan.arch

    def output_of(self, module: nn.Module) -> Callable[[Tensor], Tensor]:
        return lambda x: module(x)[0]


METHODS: dict[str, type[Method]] = {m.name: m for m in (TangleNAS, SPOS, Fixed)}
