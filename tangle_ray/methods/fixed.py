"""One fixed architecture: retrained from scratch, or fine-tuned with the weights it inherits from a supernet."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import TYPE_CHECKING

from torch import Tensor, nn

from tangle_ray.errors import ConfigError
from tangle_ray.folders import load_supernet
from tangle_ray.methods.base import Method, register_method
from tangle_ray.space import Arch

if TYPE_CHECKING:
    from tangle_ray.train.config import TrainConfig


@register_method
class Fixed(Method):
    """One architecture, from scratch or with the weights it inherits from a supernet."""

    name = "fixed"
    command = "retrain"
    help = "train one architecture from scratch, or fine-tune it with a supernet's weights (--init inherit)"
    trains_supernet = False

    @classmethod
    def check(cls, cfg: TrainConfig, source: str) -> None:
        super().check(cfg, source)
        if cfg.arch is None:
            raise ConfigError(f"{source}: method 'fixed' needs arch (an architecture dict or arch.json)")

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--arch", required=True, help="arch.json of the architecture to train (a search's "
                            "RUN/export/arch.json, a Tune search's best_arch.json)")
        parser.add_argument("--init", choices=["scratch", "inherit"], default="scratch",
                            help="scratch: fresh weights; inherit: fine-tune from the weights the architecture "
                            "inherits from --supernet (this option overrides a run file's init)")
        parser.add_argument("--supernet", help="supernet folder (RUN/export/supernet, from `tangle-ray export`) "
                            "whose weights --init inherit starts from (default: none; --init inherit needs it)")

    @classmethod
    def settings_from(cls, args: argparse.Namespace) -> list[str]:
        return [f"arch={args.arch}", f"init={args.init}"] + ([f"init_from={args.supernet}"] if args.supernet else [])

    def build(self) -> nn.Module:
        ctx, arch = self.ctx, self.ctx.plan.arch
        if ctx.cfg.init == "inherit":
            return load_supernet(ctx.cfg.init_from, ctx.space, **ctx.model_overrides()).extract(arch)
        return ctx.space.family.build_model(ctx.space, arch, **ctx.model_overrides())

    def step(self, step: int) -> dict[str, float]:
        return {"train_loss": self.weight_step(step, lambda m, x, y, j: m(x, y)[1])}

    def reported_arch(self) -> Arch:
        return self.ctx.plan.arch

    def compile(self, module: nn.Module) -> None:
        module.compile()

    def output_of(self, module: nn.Module) -> Callable[[Tensor], Tensor]:
        return lambda x: module(x)[0]
