"""The typed run configuration of a supernet training run, read from a YAML run file plus overrides.

The defaults reproduce the TangleNAS language-model search (AdamW 5e-4 -> 5e-5, betas (0.9, 0.99),
weight decay 0.1, clip 1.0; architecture Adam 3e-4, betas (0.5, 0.999), weight decay 1e-3, clip 5;
240 x 224 = 53,760 tokens per step, 6000 steps, an 80/20 weight/architecture split).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tangle_ray.configs import build, read_settings, set_dotted, to_dict
from tangle_ray.errors import ConfigError
from tangle_ray.space import read_arch

METHODS = ("tanglenas", "spos", "fixed")
TANGLENAS_MIXERS = ("drnas", "darts", "gdas")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")


@dataclass
class DataConfig:
    dir: str = "data/tinystories"  # prepared token files (train.bin, valid.bin, test.bin, meta.json)
    source: dict[str, Any] | None = None  # a TextSource to prepare into ``dir`` when it is not there yet
    tokenizer: str = "gpt2"
    bpe_file: str | None = None
    valid_fraction: float = 0.2
    num_proc: int = 1


@dataclass
class OptimizerConfig:
    lr: float = 5e-4
    min_lr: float = 5e-5
    betas: tuple[float, float] = (0.9, 0.99)
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    warmup_steps: int = 100


@dataclass
class ArchOptimizerConfig:
    lr: float = 3e-4
    betas: tuple[float, float] = (0.5, 0.999)
    weight_decay: float = 1e-3
    grad_clip: float = 5.0


@dataclass
class ScalingConfig:
    num_workers: int = 1
    use_gpu: bool = False
    resources_per_worker: dict[str, float] | None = None
    placement_strategy: str = "PACK"


@dataclass
class RunConfig:
    storage_path: str = "runs"
    name: str | None = None  # default: derived from the config, so a rerun of the same command resumes


@dataclass
class TrainConfig:
    space: str = "gpt-tinystories"
    method: str = "tanglenas"
    mixer: str = "drnas"
    arch: dict[str, Any] | None = None  # method "fixed": the architecture to train
    init: str = "scratch"  # method "fixed": "scratch" or "inherit" (weights of ``init_from``)
    init_from: str | None = None  # a supernet folder written by `tangle-ray export`
    data: DataConfig = field(default_factory=DataConfig)
    steps: int = 6000
    global_batch_size: int = 240
    micro_batch_size: int = 12
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    arch_optimizer: ArchOptimizerConfig = field(default_factory=ArchOptimizerConfig)
    precision: str = "auto"
    zero_stage: int = 2
    deepspeed: dict[str, Any] = field(default_factory=dict)  # merged over the generated DeepSpeed config
    scaling: ScalingConfig = field(default_factory=ScalingConfig)
    run: RunConfig = field(default_factory=RunConfig)
    max_failures: int = 0
    checkpoint_every: int = 500
    log_every: int = 10
    eval_every: int = 250  # any-time curve: loss of the current argmax architecture
    eval_windows: int = 64
    seed: int = 0
    dropout: float | None = None  # None keeps the space's training dropout
    compile: bool = False  # torch.compile the supernet's superposition (tanglenas) or the model (fixed)
    debug_checks: bool = False  # assert after every step that the alphas agree on all ranks
    inject_failure_at_step: int | None = None  # fault-tolerance drill: rank 0 raises once at this step

    def __post_init__(self) -> None:
        self.validate()

    # ---------------------------------------------------------------- checks a user can trip
    def validate(self, source: str = "run config") -> None:
        if self.method not in METHODS:
            raise ConfigError(f"{source}: method = {self.method!r} is not known; allowed: {list(METHODS)}")
        if self.method == "tanglenas" and self.mixer not in TANGLENAS_MIXERS:
            raise ConfigError(
                f"{source}: mixer = {self.mixer!r} is not known for tanglenas; allowed: {list(TANGLENAS_MIXERS)}"
            )
        if self.method == "fixed" and self.arch is None:
            raise ConfigError(f"{source}: method 'fixed' needs arch (an architecture dict or arch.json)")
        if self.init not in ("scratch", "inherit"):
            raise ConfigError(f"{source}: init = {self.init!r}; allowed: ['scratch', 'inherit']")
        if self.init == "inherit" and not self.init_from:
            raise ConfigError(f"{source}: init 'inherit' needs init_from (a supernet folder from `tangle-ray export`)")
        if self.compile and (self.method == "spos" or self.zero_stage == 3):
            raise ConfigError(
                f"{source}: compile = true works with methods 'tanglenas' and 'fixed' under ZeRO stages 0-2 "
                f"(got method {self.method!r}, zero_stage {self.zero_stage}); SPOS changes its graph every step"
            )
        if self.precision not in PRECISIONS:
            raise ConfigError(f"{source}: precision = {self.precision!r}; allowed: {list(PRECISIONS)}")
        if self.zero_stage not in (0, 1, 2, 3):
            raise ConfigError(f"{source}: zero_stage = {self.zero_stage!r} does not exist; allowed: [0, 1, 2, 3]")
        for name in ("steps", "global_batch_size", "micro_batch_size", "log_every", "checkpoint_every",
                     "eval_every", "eval_windows"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{source}: {name} = {getattr(self, name)} must be at least 1")
        workers = self.scaling.num_workers
        if workers < 1:
            raise ConfigError(f"{source}: scaling.num_workers = {workers} must be at least 1")
        per_step = workers * self.micro_batch_size
        if self.global_batch_size % per_step:
            raise ConfigError(
                f"{source}: global_batch_size = {self.global_batch_size} is not divisible by "
                f"scaling.num_workers x micro_batch_size = {workers} x {self.micro_batch_size} = {per_step}; "
                f"use a multiple of {per_step}"
            )
        if not 0.0 < self.data.valid_fraction < 1.0:
            raise ConfigError(f"{source}: data.valid_fraction = {self.data.valid_fraction} must be in (0, 1)")

    @property
    def grad_accum_steps(self) -> int:
        return self.global_batch_size // (self.scaling.num_workers * self.micro_batch_size)

    @property
    def mixer_name(self) -> str:
        return {"tanglenas": self.mixer, "spos": "spos", "fixed": "argmax"}[self.method]

    def identity(self) -> dict[str, Any]:
        """What makes two runs the same run: a rerun with equal identity resumes it."""
        d = to_dict(self)
        for volatile in ("steps", "run", "max_failures", "checkpoint_every", "log_every", "eval_every",
                         "debug_checks", "inject_failure_at_step", "scaling", "compile"):
            d.pop(volatile)
        d["num_workers"] = self.scaling.num_workers
        return d

    def run_name(self) -> str:
        if self.run.name:
            return self.run.name
        digest = hashlib.sha1(json.dumps(self.identity(), sort_keys=True).encode()).hexdigest()[:8]
        tag = self.mixer_name if self.method == "tanglenas" else self.method
        return f"{Path(self.space).stem}-{tag}-s{self.seed}-{digest}"

    def run_dir(self) -> Path:
        return Path(self.run.storage_path).resolve() / self.run_name()


# ===================================================================== reading


def from_dict(raw: dict[str, Any], source: str = "run config") -> TrainConfig:
    return build(TrainConfig, raw, source, "run config")


def load_config(path: str | Path | None = None, overrides: list[str] | None = None, **kw: Any) -> TrainConfig:
    """A run file (YAML) with ``key.sub=value`` overrides and keyword overrides applied on top."""
    raw, source = read_settings(path, overrides, "run")
    for key, value in kw.items():
        if value is not None:
            set_dotted(raw, key, value)
    if isinstance(raw.get("arch"), str):  # a path to arch.json
        raw["arch"] = read_arch(raw["arch"])
    return from_dict(raw, source)

