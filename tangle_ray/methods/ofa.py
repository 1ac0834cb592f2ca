"""OFA progressive shrinking (Cai et al., ICLR 2020): the supernet training of the Once-for-All baseline.

The largest architecture trains first; then the choices become elastic one group at a time (OFA: kernel size,
then depth, then expansion ratio), each step training single paths drawn uniformly among the elastic choices
with the rest at their largest, distilled in place from the largest path (soft targets of the same weights,
as BigNAS and OFA's later releases do; OFA's paper distils from a separately trained full network).
The supernet is then searched by random or evolutionary search on Ray Tune, as the SPOS baselines are.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tangle_ray.errors import ConfigError
from tangle_ray.keyed import keyed_generator
from tangle_ray.methods.base import register_method
from tangle_ray.methods.spos import SPOS
from tangle_ray.space import Arch, SearchSpace

if TYPE_CHECKING:
    from tangle_ray.train.config import TrainConfig

DEPTH = "depth"  # the group of every depth choice in ``order``


@dataclass(frozen=True)
class ShrinkSettings:
    """``order``: the groups that become elastic, one phase each (a choice's name, or ``depth`` for every depth
    choice); empty: OFA's order (see ``shrink_order``). ``largest_share``: the share of the steps that trains
    the largest architecture alone; the other phases share the rest equally. ``kd_ratio``: the weight of the
    distillation loss (OFA: 1.0)."""

    order: list[str] = field(default_factory=list)
    largest_share: float = 0.25
    kd_ratio: float = 1.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.largest_share < 1.0:
            raise ConfigError(f"run config: method_settings.largest_share = {self.largest_share} must be in [0, 1)")
        if not 0.0 <= self.kd_ratio <= 100.0:
            raise ConfigError(f"run config: method_settings.kd_ratio = {self.kd_ratio} must be in [0, 100]")


def shrink_order(space: SearchSpace, order: list[str]) -> list[list[str]]:
    """The phases' groups of choice names. By default OFA's order: the per-layer choices but the last (MobileNetV3:
    kernel size), then depth, then the last per-layer choice (expansion ratio; GPT: the MLP ratio), then the
    global choices (GPT: the embedding width)."""
    depth = list(space.depth_dims)
    if not order:
        layer = [d.name for d in space.layer_dims]
        rest = [d.name for d in space.global_dims if d.name not in depth]
        order = [*layer[:-1], DEPTH, *layer[-1:], *rest]
    groups = [depth if name == DEPTH else [name] for name in order]
    known = [DEPTH, *(n for n in space.dims if n not in depth)]
    if any(name not in known for name in order) or len(set(order)) != len(order):
        raise ConfigError(f"run config: method_settings.order = {order}: each of {known} at most once")
    return groups


def phase_of(step: int, steps: int, groups: int, largest_share: float) -> int:
    """At 0-based ``step`` of ``steps``: 0 while the largest architecture trains alone, then 1 .. ``groups``
    (that many groups elastic), each phase an equal share of the remaining steps."""
    start = round(largest_share * steps)
    if step < start:
        return 0
    return min(groups, 1 + (step - start) * groups // max(1, steps - start))


def shrink_path(space: SearchSpace, elastic: list[str], seed: int, step: int, key: int) -> Arch:
    """The largest architecture with the ``elastic`` choices drawn uniformly (per layer where they are), keyed
    by (seed, step, micro-batch) as SPOS's paths are."""
    rng = random.Random(keyed_generator(seed, step, key).initial_seed())
    arch = space.largest()
    for name in elastic:
        d = space.dims[name]
        arch[name] = [rng.choice(d.values) for _ in range(space.max_layers)] if d.per_layer else rng.choice(d.values)
    return arch


def distillation_loss(logits: Tensor, teacher: Tensor) -> Tensor:
    """KL(softmax(teacher) || softmax(logits)) over the last dim, averaged: OFA's soft-target cross-entropy minus
    the teacher's entropy, so the same gradients, but 0 where the path agrees with the largest (a training loss
    that stays comparable with the task's)."""
    p = F.log_softmax(teacher, -1)
    return (p.exp() * (p - F.log_softmax(logits, -1))).sum(-1).mean()


@register_method
class ProgressiveShrinking(SPOS):
    """Single paths drawn among the choices made elastic so far, distilled from the largest path."""

    name = "ofa"
    command = "shrink"
    help = ("OFA progressive-shrinking supernet training (the largest first, then kernel, depth and expansion "
            "choices made elastic in turn, distilled from the largest), the first stage of OFA+RS and OFA+ES")
    pipelines = {"ofa-random": "random", "ofa-evolution": "evolution"}
    compared_by_default = False  # the paper compares it on the MobileNetV3 space (campaign ``methods``)
    Settings = ShrinkSettings

    @classmethod
    def check(cls, cfg: TrainConfig, source: str) -> None:
        super().check(cfg, source)
        from tangle_ray.models import load_space

        try:
            shrink_order(load_space(cfg.space), cls.settings_of(cfg, source).order)
        except ConfigError as e:
            raise ConfigError(str(e).replace("run config", source, 1)) from None

    @classmethod
    def loss_note(cls) -> str:
        return ("weight split, one single path per micro-batch among the choices made elastic so far, plus the "
                "distillation loss from the largest path")

    @classmethod
    def anytime_note(cls, cfg: TrainConfig, label: str, changes: int) -> str:
        return (f"Validation {label} of the largest architecture on {cfg.eval_samples} fixed validation samples. "
                "Progressive shrinking trains the largest first and then ever more elastic single paths; it "
                "chooses no architecture: `tangle-ray tune` searches the supernet.")

    def __init__(self, ctx: Any):
        super().__init__(ctx)
        self.settings = self.settings_of(ctx.cfg)
        self.groups = shrink_order(ctx.space, self.settings.order)

    def phase(self, step: int) -> int:
        """0 while the largest trains alone, then the number of groups made elastic."""
        return phase_of(step, self.ctx.cfg.steps, len(self.groups), self.settings.largest_share)

    def step(self, step: int) -> dict[str, float]:
        seed, space, kd = self.ctx.cfg.seed, self.ctx.space, self.settings.kd_ratio
        phase, largest = self.phase(step), space.largest()
        elastic = [name for group in self.groups[:phase] for name in group]

        def forward(m: nn.Module, x: Tensor, y: Tensor, j: int) -> Tensor:
            logits, loss = m(x, y, arch=shrink_path(space, elastic, seed, step, self.path_key(j)),
                             keep_all_params=True)
            if not elastic or kd == 0.0:
                return loss
            with torch.no_grad():
                teacher = m(x, y, arch=largest, keep_all_params=True)[0]
            return loss + kd * distillation_loss(logits, teacher)

        return {"train_loss": self.weight_step(step, forward), "shrink_phase": float(phase)}
