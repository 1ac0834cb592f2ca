"""A scaling grid as points: each point one short training run (a ``measure`` stage) of a fixed budget, with the
settings that make it time well (logging at the end of the warm-up, one evaluation and checkpoint at the end,
DeepSpeed's wall-clock timers, no retries) and its predictions."""

from __future__ import annotations

import copy
import itertools
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from tangle_ray.campaign.config import flat_settings
from tangle_ray.configs import read_yaml, set_dotted
from tangle_ray.errors import ConfigError, shorten
from tangle_ray.models import load_space
from tangle_ray.scaling.config import ScaleConfig
from tangle_ray.scaling.predict import predict_memory
from tangle_ray.space import SearchSpace
from tangle_ray.stages import Stage
from tangle_ray.tasks import get_task

GRID_COLUMNS = ("space", "params", "workers", "zero_stage", "micro_batch", "grad_accum", "method", "mode")


@dataclass(frozen=True)
class Point:
    space: str
    params: int  # the supernet's parameters
    workers: int
    zero_stage: int
    micro_batch: int
    grad_accum: int
    method: str
    mode: str
    warmup_steps: int
    steps: int  # timed steps, after the warm-up
    units_per_sample: int  # tokens of a window

    @property
    def global_batch(self) -> int:
        return self.workers * self.micro_batch * self.grad_accum

    @property
    def key(self) -> str:
        return (f"{self.space}-{self.method}-w{self.workers}-z{self.zero_stage}-mb{self.micro_batch}-"
                f"ga{self.grad_accum}-{self.mode}")

    def grid_row(self) -> dict[str, Any]:
        return {k: asdict(self)[k] for k in GRID_COLUMNS}


@dataclass(frozen=True)
class PlannedPoint:
    point: Point
    stage: Stage
    space: SearchSpace
    precision: str
    predicted: dict[str, float]  # memory terms per rank


def build_points(config: ScaleConfig, base: Path) -> list[PlannedPoint]:
    """Every grid combination as a point with its stage and predicted memory, checked before anything runs."""
    path = base / config.run
    if not path.is_file():
        raise ConfigError(f"scaling config: run = {shorten(config.run)}: no such run file {path}")
    run = read_yaml(path, "run file")
    if not isinstance(run, dict):
        raise ConfigError(f"{path}: a run file must be a mapping of settings")
    for key, value in flat_settings(config.settings):
        set_dotted(run, key, value, f"settings.{key}")
    g, out = config.grid, []
    spaces = {name: load_space(name) for name in g.space}
    for name, space in spaces.items():
        if space.family.task != "lm":
            raise ConfigError(f"scaling config: grid.space value {name!r} is a {space.family.task} space; scaling "
                              "experiments measure language models (tokens): use a GPT space")
    for name, method, workers, zero, mb, ga in itertools.product(g.space, g.method, g.workers, g.zero_stage,
                                                                 g.micro_batch, g.grad_accum):
        space = spaces[name]
        if config.mode == "strong":
            ga = config.global_batch // (workers * mb)
        units = get_task(space.family.task).units_per_sample(space.fixed)
        steps = config.steps or math.ceil(config.tokens / (workers * mb * ga * units))
        point = Point(name, 0, workers, zero, mb, ga, method, config.mode, config.warmup_steps, steps, units)
        out.append(_planned(config, run, point, space))
    return out


def _planned(config: ScaleConfig, run: dict[str, Any], point: Point, space: SearchSpace) -> PlannedPoint:
    from tangle_ray.train.config import from_dict
    from tangle_ray.train.deepspeed import resolve_precision

    total = point.warmup_steps + point.steps
    settings = copy.deepcopy(run)
    for key, value in {"space": point.space, "method": point.method, "scaling.num_workers": point.workers,
                       "zero_stage": point.zero_stage, "micro_batch_size": point.micro_batch,
                       "global_batch_size": point.global_batch, "steps": total, "log_every": point.warmup_steps,
                       "eval_every": total, "checkpoint_every": total, "max_failures": 0,
                       "memory_limit_gb": config.device.memory_gb,
                       "deepspeed.wall_clock_breakdown": True}.items():
        set_dotted(settings, key, value)
    settings.pop("run", None)
    cfg = from_dict(copy.deepcopy(settings), f"scaling point {point.key}")  # every check, before anything runs
    precision = resolve_precision(cfg)
    predicted = predict_memory(space, point.method, point.micro_batch, point.zero_stage, point.workers, precision)
    point = Point(**{**asdict(point), "params": int(predicted["supernet_params"])})
    use_gpu = cfg.scaling.use_gpu
    stage = Stage(point.key, "measure", settings, devices=("GPU" if use_gpu else "CPU", float(point.workers)),
                  workers=point.workers, work=float(total * point.global_batch * point.units_per_sample))
    return PlannedPoint(point, stage, space, precision, predicted)
