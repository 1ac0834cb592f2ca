"""TangleNAS: first-order alternating bilevel search of a weight-entangled supernet (DrNAS, DARTS or GDAS)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from tangle_ray.divergence import (
    Problem,
    first,
    hyperparameters,
    loss_problem,
    norm_problem,
    restore_optimizer_settings,
    tensor_problem,
)
from tangle_ray.errors import ConfigError, shorten
from tangle_ray.keyed import Purpose, keyed_generator
from tangle_ray.methods.base import Method, register_method
from tangle_ray.mixers import entropy, get_mixer
from tangle_ray.space import Arch

if TYPE_CHECKING:
    from tangle_ray.supernet import Supernet
    from tangle_ray.train.config import TrainConfig

MIXERS = ("drnas", "darts", "gdas")


@register_method
class TangleNAS(Method):
    """First-order alternating bilevel step: an architecture step on the architecture split (gradients only
    into the alphas, averaged over ranks), then a weight step on the weight split (mixing weights sampled from
    the detached alphas)."""

    name = "tanglenas"
    command = "search"
    help = "single-stage TangleNAS search (architecture weights learnt by gradient)"
    chooses_arch = True
    superposed_loss = True
    followed = "argmax architecture"
    learns_alphas = True
    pipelines = {"tanglenas": None}

    @classmethod
    def check(cls, cfg: TrainConfig, source: str) -> None:
        super().check(cfg, source)
        if cfg.mixer not in MIXERS:
            raise ConfigError(f"{source}: mixer = {shorten(cfg.mixer)} is not known for tanglenas; "
                              f"allowed: {list(MIXERS)}")

    @classmethod
    def run_tag(cls, cfg: TrainConfig) -> str:
        return cfg.mixer

    @classmethod
    def describe(cls, cfg: TrainConfig) -> str:
        return f"`{cls.name}` (mixer `{cfg.mixer}`)"

    @classmethod
    def loss_note(cls) -> str:
        return "weight split, superposed"

    @classmethod
    def anytime_note(cls, cfg: TrainConfig, label: str, changes: int) -> str:
        moves = (f"The argmax changed {changes} time(s) between these points (dotted lines in `anytime.png`); "
                 "where it changes, the curve jumps with it: the superposition trains the mixture, and a new "
                 "argmax's single path is scored as it stands." if changes else
                 "The argmax stayed the same architecture between these points.")
        return (f"Validation {label} of the argmax architecture (its single path with the current weights, eval "
                f"mode) on {cfg.eval_samples} fixed validation samples. {moves}")

    @classmethod
    def export_note(cls, export_dir: Any) -> str:
        return (f"Consolidated supernet (`supernet/`: the full weights and the architecture parameters) and the "
                f"argmax architecture extracted as a standalone model (`model/`, `arch.json`): `{export_dir}`")

    @classmethod
    def exported_arch(cls, supernet: Supernet, tensors: dict[str, Tensor]) -> Arch:
        for name, alpha in supernet.alphas.items():
            alpha.data.copy_(tensors[f"alphas.{name}"])
        return supernet.argmax_arch()

    def build(self) -> nn.Module:
        ctx = self.ctx
        supernet = ctx.space.build_supernet(**ctx.model_overrides())
        self.alphas = {k: v.to(ctx.device).detach().requires_grad_() for k, v in supernet.alphas.items()}
        a = ctx.cfg.arch_optimizer
        self.arch_opt = torch.optim.Adam(list(self.alphas.values()), lr=a.lr, betas=a.betas,
                                         weight_decay=a.weight_decay)
        self.mixer = get_mixer(ctx.cfg.mixer, gdas_schedule=ctx.cfg.gdas_schedule)
        self.arch_grad_norm: float | None = None
        self.alpha_problem: Problem | None = None
        self._poison_alphas = False
        return supernet.net

    def step(self, step: int) -> dict[str, float]:
        metrics = {"arch_loss": self._arch_step(step)}
        self.alpha_problem = self._check_alphas()
        if self.ctx.any_rank(self.alpha_problem is not None):  # every rank skips the weight step together
            self.weight_grad_norm = None
            return metrics  # the mixer cannot use these alphas (a Dirichlet of them would raise): the guard stops
        detached = {k: a.detach() for k, a in self.alphas.items()}
        metrics["train_loss"] = self.weight_step(
            step, lambda m, x, y, j: m(x, y, weights=self._weights(detached, step, j, Purpose.WEIGHT_MIX))[1])
        if self.ctx.cfg.debug_checks and self.ctx.world > 1:  # one rank agrees with itself
            self._assert_alphas_agree(step)
        return metrics

    def _weights(self, alphas: dict[str, Tensor], step: int, j: int, purpose: Purpose) -> dict[str, Tensor]:
        gen = keyed_generator(self.ctx.cfg.seed, step, j, purpose)
        return self.mixer(alphas, gen, step=step, steps=self.ctx.cfg.steps)

    def _arch_step(self, step: int) -> float:
        ctx, alphas = self.ctx, list(self.alphas.values())
        self.arch_opt.zero_grad(set_to_none=False)
        losses = []
        for j in ctx.micro_indices():
            x, y = ctx.valid.get(step, j)
            weights = self._weights(self.alphas, step, j, Purpose.ARCH_MIX)
            # the bare module: no DeepSpeed backward hooks, and gradients flow into the alphas alone
            with ctx.keyed(step, j, Purpose.ARCH_FORWARD):
                loss = self.engine.module(x.to(ctx.device), y.to(ctx.device), weights=weights)[1]
            (loss / ctx.cfg.grad_accum_steps).backward(inputs=alphas)
            losses.append(loss.detach())
        if ctx.world > 1:
            flat = torch.cat([a.grad.reshape(-1) for a in alphas])
            dist.all_reduce(flat)
            flat /= ctx.world
            torch.nn.utils.vector_to_parameters(flat, [a.grad for a in alphas])
        self.arch_grad_norm = float(torch.nn.utils.clip_grad_norm_(alphas, ctx.cfg.arch_optimizer.grad_clip))
        self.arch_opt.step()
        if self._poison_alphas:  # the inject_nan_at_step drill: as if this update had diverged on this rank
            self._poison_alphas = False
            with torch.no_grad():
                alphas[0].fill_(float("nan"))
        return ctx.mean_over_ranks(ctx.step_loss(losses))

    def _check_alphas(self) -> Problem | None:
        """Architecture parameters that are not finite, or that the DrNAS mixer cannot use: its concentration
        ELU(alpha) + 1 rounds to 0 in float32 below alpha of about -17, and a Dirichlet of 0 is undefined."""
        for name, a in self.alphas.items():
            if problem := tensor_problem(f"architecture parameter alphas.{name}", a, "alphas"):
                return problem
            if self.ctx.cfg.mixer == "drnas" and bool(((F.elu(a.detach()) + 1.0) <= 0).any()):
                return Problem(f"architecture parameter alphas.{name}", f"{float(a.detach().min()):.4g}",
                               "is below where the DrNAS concentration ELU(alpha) + 1 rounds to 0 in float32 "
                               "(about -17)", "alphas", after_update=True)
        return None

    def problem(self, metrics: dict[str, float]) -> Problem | None:
        """In the step's order: the architecture split's loss, its gradient norm, the architecture parameters
        after their update, then the weight step's loss and gradient norm."""
        return first([loss_problem("arch_loss", metrics["arch_loss"]),
                      norm_problem("architecture gradient norm", self.arch_grad_norm, "alphas"),
                      self.alpha_problem,
                      super().problem({k: v for k, v in metrics.items() if k != "arch_loss"})])

    def inject_nan(self, into: str) -> None:
        if into == "alphas":
            self._poison_alphas = True  # after this step's architecture update
        else:
            super().inject_nan(into)

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
        fresh = hyperparameters(self.arch_opt, ("lr", "betas", "weight_decay"))  # as the run's config says
        self.arch_opt.load_state_dict({"state": opt_state, "param_groups": state["arch_opt_groups"]})
        restore_optimizer_settings(self.arch_opt, fresh)  # a diverged run resumed with other settings uses them
