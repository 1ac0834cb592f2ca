"""One fixed architecture: retrained from scratch, or fine-tuned with the weights it inherits from a supernet."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

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
    followed = "model being trained (its fixed architecture)"

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

    @classmethod
    def check_arguments(cls, args: argparse.Namespace, settings: dict[str, Any]) -> None:
        if args.init == "inherit" and not args.supernet and not settings.get("init_from"):
            raise ConfigError("--init inherit needs --supernet DIR: the supernet folder whose weights the "
                              "architecture inherits (RUN/export/supernet, from `tangle-ray export`)")

    @classmethod
    def describe(cls, cfg: TrainConfig) -> str:
        if cfg.init == "inherit":
            return (f"`{cls.name}`, fine-tuned: it started from the weights it inherits from the supernet "
                    f"`{cfg.init_from}`")
        return f"`{cls.name}`, trained from scratch (fresh weights)"

    @classmethod
    def loss_note(cls) -> str:
        return "weight split, the fixed architecture"

    @classmethod
    def anytime_note(cls, cfg: TrainConfig, label: str, changes: int) -> str:
        start = ("its weights inherited from the supernet, fine-tuned" if cfg.init == "inherit" else
                 "trained from scratch")
        return (f"Validation {label} of the model being trained (the fixed architecture, {start}; current "
                f"weights, eval mode) on {cfg.eval_samples} fixed validation samples.")

    @classmethod
    def export_note(cls, export_dir: Any) -> str:
        return (f"The trained model (`model/`: safetensors and config; `arch.json`; a fixed architecture has no "
                f"supernet): `{export_dir}`")

    def build(self) -> nn.Module:
        ctx, arch = self.ctx, self.ctx.plan.arch
        if ctx.cfg.init == "inherit":  # the inherited model as every scorer of the supernet sees it (recalibrated)
            from tangle_ray.evaluate import calibration_batches, inherited_model

            supernet = load_supernet(ctx.cfg.init_from, ctx.space, **ctx.model_overrides())
            calibration = calibration_batches(ctx.task, ctx.cfg.data, ctx.space)
            return (supernet.extract(arch) if calibration is None
                    else inherited_model(supernet, arch, calibration).train())
        return ctx.space.family.build_model(ctx.space, arch, **ctx.model_overrides())

    def step(self, step: int) -> dict[str, float]:
        return {"train_loss": self.weight_step(step, lambda m, x, y, j: m(x, y)[1])}

    def reported_arch(self) -> Arch:
        return self.ctx.plan.arch

    def compile(self, module: nn.Module) -> None:
        module.compile()

    def output_of(self, module: nn.Module) -> Callable[[Tensor], Tensor]:
        return lambda x: module(x)[0]
