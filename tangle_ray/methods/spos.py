"""SPOS: single-path one-shot supernet training, the first stage of the two-stage baselines."""

from __future__ import annotations

import random
from typing import TYPE_CHECKING, Any

from torch import Tensor, nn

from tangle_ray.errors import ConfigError
from tangle_ray.keyed import keyed_generator
from tangle_ray.methods.base import Method, register_method
from tangle_ray.space import Arch, SearchSpace

if TYPE_CHECKING:
    from tangle_ray.train.config import TrainConfig


def spos_path(space: SearchSpace, seed: int, step: int, key: int) -> Arch:
    """The uniformly sampled path of micro-batch ``key`` at ``step`` (a pure function of its arguments)."""
    return space.sample(random.Random(keyed_generator(seed, step, key).initial_seed()))


@register_method
class SPOS(Method):
    """Single-path one-shot, as the reference trains it: a fresh uniformly sampled path for every micro-batch.

    The path is keyed by the global micro-batch index, so 1 and N workers train the same paths. ZeRO-3 needs
    every rank on the same path at the same time: there the key is the accumulation slot (the micro-batch's
    place among this rank's ``gas``), so a step trains ``gas`` paths instead of ``G`` and runs with different
    numbers of workers differ.
    """

    name = "spos"
    command = "supernet"
    help = "SPOS supernet training (uniform single paths), the first stage of the two-stage baselines"
    followed = "largest architecture"
    pipelines = {"spos-random": "random", "spos-evolution": "evolution"}

    @classmethod
    def check(cls, cfg: TrainConfig, source: str) -> None:
        super().check(cfg, source)
        if cfg.compile:
            raise ConfigError(f"{source}: compile = true is refused for method 'spos' (compile works for the other "
                              "methods under ZeRO stages 0-2): a single path is a different graph every step and "
                              "would recompile each step; set compile: false")

    @classmethod
    def loss_note(cls) -> str:
        return "weight split, one uniformly sampled single path per micro-batch"

    @classmethod
    def anytime_note(cls, cfg: TrainConfig, label: str, changes: int) -> str:
        return (f"Validation {label} of the largest architecture (its single path with the current weights, eval "
                f"mode) on {cfg.eval_samples} fixed validation samples. SPOS trains one uniformly sampled path per "
                "micro-batch and chooses no architecture: the largest is a fixed yardstick of how the shared "
                "weights train; `tangle-ray tune` searches them.")

    @classmethod
    def export_note(cls, export_dir: Any) -> str:
        return (f"Consolidated supernet (`supernet/`: the full weights; SPOS chooses no architecture, so there is "
                f"no `model/`): `{export_dir}`")

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
