"""The typed run configuration of a training run, read from a YAML run file plus overrides.

The defaults are the TangleNAS language-model search settings (AdamW 5e-4 -> 5e-5, betas (0.9, 0.99),
weight decay 0.1, clip 1.0; architecture Adam 3e-4, betas (0.5, 0.999), weight decay 1e-3, clip 5;
240 x 224 = 53,760 tokens per step, 6000 steps). The ``data:`` section belongs to the task of the space's
model family (``tangle_ray.tasks``). Settings marked ``VOLATILE`` may change between a run and its resume.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from tangle_ray.configs import INT64, VOLATILE, build, check_range, identity, read_settings, set_dotted
from tangle_ray.errors import ConfigError, shorten
from tangle_ray.methods import DEFAULT_METHOD, METHODS, Method, get_method
from tangle_ray.mixers import GDAS_SCHEDULES
from tangle_ray.models import load_space
from tangle_ray.names import check_name
from tangle_ray.space import Arch, SearchSpace, read_arch
from tangle_ray.storage import cache_path, check_uri, is_uri, join
from tangle_ray.tasks import Task, get_task

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
PLACEMENT_STRATEGIES = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")
# DeepSpeed settings the run sets itself: a ``deepspeed:`` block may not contradict them
MAX_LR = 10.0  # optimizer.lr and arch_optimizer.lr: Adam moves each parameter by about lr per step
MAX_WEIGHT_DECAY = 10.0  # beyond: the decay term outweighs any gradient; AdamW also needs lr x decay < 1
# above these a run is accepted with a warning on the driver (``unusual_settings``); typical values are far below
UNUSUAL = {"optimizer.lr": 0.1, "arch_optimizer.lr": 1.0, "optimizer.weight_decay": 1.0,
           "arch_optimizer.weight_decay": 1.0}
DS_OWNED = {
    "train_batch_size": "global_batch_size", "train_micro_batch_size_per_gpu": "micro_batch_size",
    "gradient_accumulation_steps": "global_batch_size / (scaling.num_workers x micro_batch_size)",
    "gradient_clipping": "optimizer.grad_clip", "optimizer": "optimizer.*", "scheduler": "optimizer.*",
}


@dataclass(frozen=True)
class OptimizerConfig:
    lr: float = 5e-4
    min_lr: float = 5e-5
    betas: tuple[float, float] = (0.9, 0.99)
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    warmup_steps: int = 100


@dataclass(frozen=True)
class ArchOptimizerConfig:
    lr: float = 3e-4
    betas: tuple[float, float] = (0.5, 0.999)
    weight_decay: float = 1e-3
    grad_clip: float = 5.0


@dataclass(frozen=True)
class ScalingConfig:
    num_workers: int = 1
    use_gpu: bool = field(default=False, metadata=VOLATILE)
    resources_per_worker: dict[str, float] | None = field(default=None, metadata=VOLATILE)
    placement_strategy: str = field(default="PACK", metadata=VOLATILE)


@dataclass(frozen=True)
class RunConfig:
    storage_path: str = field(default="runs", metadata=VOLATILE)
    name: str | None = field(default=None, metadata=VOLATILE)  # default: derived from the identity


@dataclass(frozen=True)
class TrainConfig:
    space: str = "gpt-tinystories"
    method: str = DEFAULT_METHOD  # a registered method (``tangle_ray/methods/``); the command sets it
    mixer: str = "drnas"  # tanglenas: drnas, darts or gdas
    gdas_schedule: str = "reference"  # GDAS temperature: "reference" (TangleNAS's steps) or "linear"
    method_settings: dict[str, Any] = field(default_factory=dict)  # the method's own section (``Method.Settings``)
    arch: dict[str, Any] | None = None  # the architecture to train (``tangle-ray retrain``)
    init: str = "scratch"  # "scratch", or "inherit" the weights of ``init_from`` (``tangle-ray retrain``)
    init_from: str | None = None  # a supernet folder written by `tangle-ray export`
    data: Any = None  # the task's data section (e.g. ``tasks.lm.TextData``); built by ``from_dict``
    steps: int = field(default=6000, metadata=VOLATILE)
    global_batch_size: int = 240
    micro_batch_size: int = 12
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    arch_optimizer: ArchOptimizerConfig = field(default_factory=ArchOptimizerConfig)
    precision: str = "auto"
    zero_stage: int = 2
    deepspeed: dict[str, Any] = field(default_factory=dict)  # merged over the generated DeepSpeed config
    scaling: ScalingConfig = field(default_factory=ScalingConfig)
    run: RunConfig = field(default_factory=RunConfig, metadata=VOLATILE)
    max_failures: int = field(default=0, metadata=VOLATILE)
    checkpoint_every: int = field(default=500, metadata=VOLATILE)
    log_every: int = field(default=10, metadata=VOLATILE)
    eval_every: int = field(default=250, metadata=VOLATILE)  # any-time curve: the reported architecture's score
    eval_samples: int = 64  # evaluation samples of the any-time curve (windows of text, images)
    test_samples: int = field(default=256, metadata=VOLATILE)  # a trained architecture's test-split score
    seed: int = 0
    dropout: float | None = None  # None keeps the space's training dropout
    compile: bool = field(default=False, metadata=VOLATILE)  # torch.compile the superposition or fixed model
    debug_checks: bool = field(default=False, metadata=VOLATILE)  # assert each step that alphas agree on ranks
    inject_failure_at_step: int | None = field(default=None, metadata=VOLATILE)  # drill: rank 0 raises once
    # drill: step N (counted from 1, as progress lines count) computes with a NaN in ``inject_nan_into`` (the
    # weights, or the architecture parameters of a method that learns them) of the last rank, once
    inject_nan_at_step: int | None = field(default=None, metadata=VOLATILE)
    inject_nan_into: str = field(default="weights", metadata=VOLATILE)
    memory_limit_gb: float | None = field(default=None, metadata=VOLATILE)  # a worker's peak over it: out of memory

    def __post_init__(self) -> None:
        self.validate()

    # ---------------------------------------------------------------- checks a user can trip
    def validate(self, source: str = "run config") -> None:
        if self.init not in ("scratch", "inherit"):
            raise ConfigError(f"{source}: init = {shorten(self.init)}; allowed: ['scratch', 'inherit']")
        if self.init == "inherit" and not self.init_from:
            raise ConfigError(f"{source}: init 'inherit' needs init_from (a supernet folder from `tangle-ray export`; "
                              "`tangle-ray retrain` takes it as --supernet DIR)")
        self.method_class.check(self, source)
        if self.precision not in PRECISIONS:
            raise ConfigError(f"{source}: precision = {shorten(self.precision)}; allowed: {list(PRECISIONS)}")
        if self.precision == "fp16" and not self.scaling.use_gpu:
            raise ConfigError(f"{source}: precision = 'fp16' needs GPU workers (scaling.use_gpu: true): DeepSpeed's "
                              "CPU accelerator has no fp16; on CPUs use 'fp32', 'bf16' or 'auto' (fp32)")
        if self.zero_stage not in (0, 1, 2, 3):
            raise ConfigError(
                f"{source}: zero_stage = {shorten(self.zero_stage)} does not exist; allowed: [0, 1, 2, 3]")
        for name in ("steps", "global_batch_size", "micro_batch_size", "log_every", "checkpoint_every",
                     "eval_every", "eval_samples", "test_samples"):
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
        self._validate_numbers(source)
        self._validate_names(source)
        self._validate_deepspeed(source)

    def _validate_numbers(self, source: str) -> None:
        """Ranges of every number (NaN and infinities are refused when the file is read)."""
        o, a = self.optimizer, self.arch_optimizer
        # Adam moves every parameter by about lr per step, whatever the gradient's scale (weights start near
        # 0.02, norms at 1, architecture parameters near 0): above MAX_LR one step moves each by more than any
        # plausible value, so no run could use it (see ``unusual_settings`` for what is merely unusual)
        check_range(o.lr, f"{source}: optimizer.lr", 0, MAX_LR, lo_open=True)
        check_range(o.min_lr, f"{source}: optimizer.min_lr", 0, o.lr)
        check_range(a.lr, f"{source}: arch_optimizer.lr", 0, MAX_LR, lo_open=True)
        for group, opt in (("optimizer", o), ("arch_optimizer", a)):
            for i, beta in enumerate(opt.betas):
                check_range(beta, f"{source}: {group}.betas[{i}]", 0, 1, hi_open=True)
            check_range(opt.weight_decay, f"{source}: {group}.weight_decay", 0, MAX_WEIGHT_DECAY)
        if o.lr * o.weight_decay >= 1:  # AdamW multiplies decayed weights by (1 - lr x weight_decay) each step
            raise ConfigError(
                f"{source}: optimizer.lr x optimizer.weight_decay = {o.lr:g} x {o.weight_decay:g} = "
                f"{o.lr * o.weight_decay:.3g}; AdamW multiplies every decayed weight by 1 - lr x weight_decay each "
                "step, so at 1 or more it zeroes or flips them: keep the product below 1 (typically 1e-5 to 1e-3)")
        if self.steps * self.global_batch_size > INT64[1]:
            raise ConfigError(
                f"{source}: steps x global_batch_size = {self.steps} x {self.global_batch_size} samples do not fit "
                "the 64-bit sample counters of the data samplers; no machine serves that many samples")
        if self.inject_nan_at_step is not None:
            check_range(self.inject_nan_at_step, f"{source}: inject_nan_at_step", 1)
        if self.inject_nan_into not in ("weights", "alphas"):
            raise ConfigError(f"{source}: inject_nan_into = {shorten(self.inject_nan_into)}; "
                              "allowed: ['weights', 'alphas']")
        if self.inject_nan_into == "alphas" and not self.method_class.learns_alphas:
            raise ConfigError(f"{source}: inject_nan_into = alphas, but method {self.method!r} learns no "
                              "architecture parameters; use inject_nan_into: weights")
        check_range(o.grad_clip, f"{source}: optimizer.grad_clip (0: no clipping)", 0)
        check_range(a.grad_clip, f"{source}: arch_optimizer.grad_clip", 0, None, lo_open=True)
        check_range(o.warmup_steps, f"{source}: optimizer.warmup_steps", 0)
        check_range(self.seed, f"{source}: seed", 0, INT64[1])
        check_range(self.max_failures, f"{source}: max_failures (-1: retry without end)", -1)
        if self.inject_failure_at_step is not None:
            check_range(self.inject_failure_at_step, f"{source}: inject_failure_at_step", 0)
        if self.memory_limit_gb is not None:
            check_range(self.memory_limit_gb, f"{source}: memory_limit_gb (GiB per worker)", 0, 2**20, lo_open=True)
        if self.dropout is not None:
            check_range(self.dropout, f"{source}: dropout", 0, 1, hi_open=True)
        if self.gdas_schedule not in GDAS_SCHEDULES:
            raise ConfigError(
                f"{source}: gdas_schedule = {shorten(self.gdas_schedule)}; allowed: {list(GDAS_SCHEDULES)}")
        s = self.scaling
        if s.placement_strategy not in PLACEMENT_STRATEGIES:
            raise ConfigError(f"{source}: scaling.placement_strategy = {shorten(s.placement_strategy)}; "
                              f"allowed: {list(PLACEMENT_STRATEGIES)}")
        for key, amount in (s.resources_per_worker or {}).items():
            if not key:
                raise ConfigError(f"{source}: scaling.resources_per_worker has an empty resource name")
            check_range(amount, f"{source}: scaling.resources_per_worker.{key}", 0)

    def _validate_names(self, source: str) -> None:
        for name, value in (("space", self.space), ("run.storage_path", self.run.storage_path)):
            if not value.strip():
                raise ConfigError(f"{source}: {name} must not be empty")
        if is_uri(self.run.storage_path):
            check_uri(self.run.storage_path, f"{source}: run.storage_path")
        if isinstance(getattr(self.data, "dir", None), str) and is_uri(self.data.dir):
            check_uri(self.data.dir, f"{source}: data.dir")
        if self.run.name is not None:
            check_name(self.run.name, f"{source}: run.name")
        else:
            check_name(self.run_name(), f"{source}: the run name derived from space = {shorten(self.space)}")

    def _validate_deepspeed(self, source: str) -> None:
        """The ``deepspeed:`` block may add settings, not contradict the run's own."""
        ds = self.deepspeed
        for key, setting in DS_OWNED.items():
            if key in ds:
                raise ConfigError(f"{source}: deepspeed.{key} = {shorten(ds[key])} is set by the run; "
                                  f"set {setting} instead")
        zero = ds.get("zero_optimization", {})
        if not isinstance(zero, dict):
            raise ConfigError(f"{source}: deepspeed.zero_optimization = {shorten(zero)} must be a mapping")
        if "stage" in zero and zero["stage"] != self.zero_stage:
            raise ConfigError(f"{source}: deepspeed.zero_optimization.stage = {shorten(zero['stage'])} contradicts "
                              f"zero_stage = {self.zero_stage}; set zero_stage instead")
        for key in ("bf16", "fp16", "amp", "torch_autocast"):
            if key in ds:
                raise ConfigError(f"{source}: deepspeed.{key} = {shorten(ds[key])}: set precision instead "
                                  f"(allowed: {list(PRECISIONS)})")

    def unusual_settings(self) -> list[str]:
        """Settings a run can use but rarely should (learning rates and weight decays above ``UNUSUAL``), one
        line each, for the driver to warn about; those no run could use are refused by ``validate``."""
        values = {"optimizer.lr": self.optimizer.lr, "arch_optimizer.lr": self.arch_optimizer.lr,
                  "optimizer.weight_decay": self.optimizer.weight_decay,
                  "arch_optimizer.weight_decay": self.arch_optimizer.weight_decay}
        if not self.method_class.learns_alphas:
            values = {k: v for k, v in values.items() if not k.startswith("arch_")}
        return [f"{key} = {value:g} is unusually large (above {UNUSUAL[key]:g}; the defaults are "
                f"{_default(key):g}): a run this high often diverges, and the divergence guard then stops it"
                for key, value in values.items() if value > UNUSUAL[key]]

    @property
    def grad_accum_steps(self) -> int:
        return self.global_batch_size // (self.scaling.num_workers * self.micro_batch_size)

    @property
    def micro_per_step(self) -> int:
        """Micro-batches of one global batch, over all ranks."""
        return self.global_batch_size // self.micro_batch_size

    @property
    def method_class(self) -> type[Method]:
        return get_method(self.method)

    def identity(self) -> dict[str, Any]:
        """What makes two runs the same run: a rerun with equal identity resumes it."""
        return identity(self)

    def run_name(self) -> str:
        """``run.name``, or a name derived from the identity (so that rerunning a command resumes its run)."""
        if self.run.name:
            return self.run.name
        digest = hashlib.sha1(json.dumps(self.identity(), sort_keys=True).encode()).hexdigest()[:8]
        tag = self.method_class.run_tag(self)
        return f"{Path(self.space).stem}-{tag}-s{self.seed}-{digest}"

    def run_dir(self) -> Path:
        """The run folder: under ``run.storage_path``, or the local mirror of a folder on object storage."""
        remote = self.remote_run_dir()
        return cache_path(remote) if remote else Path(self.run.storage_path).resolve() / self.run_name()

    def remote_run_dir(self) -> str | None:
        """The run folder's URI where ``run.storage_path`` is on object storage (s3://, gs://), else None."""
        return join(self.run.storage_path, self.run_name()) if is_uri(self.run.storage_path) else None


@dataclass(frozen=True)
class RunPlan:
    """A run resolved on the driver, handed as it is to every worker: nothing is derived twice.

    ``config`` has its paths made absolute and its run name fixed; ``identity`` is the identity of the
    config as the user gave it (what ``run_config.yaml`` records).
    """

    config: TrainConfig
    space: SearchSpace
    task: Task
    arch: Arch | None  # the validated architecture of a run that trains one
    identity: dict[str, Any]
    verbose: bool = False  # workers print to the terminal instead of RUN/logs/
    remote: str | None = None  # the run folder on object storage that ``run_dir`` mirrors
    data_remote: str | None = None  # the prepared data on object storage that ``config.data.dir`` mirrors

    @property
    def run_dir(self) -> Path:
        return Path(self.config.run.storage_path) / self.config.run.name


# ===================================================================== reading


def from_dict(raw: dict[str, Any], source: str = "run config") -> TrainConfig:
    """A run config from the mapping of a run file; the ``data:`` section is built as the space's task says."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: a run file must be a mapping of settings")
    rest = {k: v for k, v in raw.items() if k != "data"}
    cfg = build(TrainConfig, rest, source, "run config")
    data_class = task_of(cfg.space).data_config
    return replace(cfg, data=build(data_class, raw.get("data") or {}, source, "run config", "data."))


def _default(key: str) -> float:
    """The default of a dotted optimizer setting (``optimizer.lr``)."""
    group, name = key.split(".")
    return getattr({"optimizer": OptimizerConfig, "arch_optimizer": ArchOptimizerConfig}[group](), name)


def task_of(space_name: str) -> Task:
    return get_task(load_space(space_name).family.task)


def load_config(path: str | Path | None = None, overrides: list[str] | None = None, *, method: str | None = None,
                check: Callable[[dict[str, Any]], None] | None = None, **kw: Any) -> TrainConfig:
    """A run file (YAML) with ``key.sub=value`` overrides and keyword overrides applied on top, read once.

    ``method``: the method of the command that runs it (a file or setting naming another is refused);
    ``check``: called with the settings before they are built (the command's checks of its own options)."""
    raw, source = read_settings(path, overrides, "run")
    if method is not None:
        asked = raw.get("method", method)
        if asked != method:  # the command decides the method: a file or setting that says otherwise is a mistake
            runs = get_method(method).command
            hint = (f"use `tangle-ray {get_method(asked).command}`" if isinstance(asked, str) and asked in METHODS
                    else f"allowed: {sorted(METHODS)}")
            raise ConfigError(f"{path or 'settings'}: method = {shorten(asked)}, but `tangle-ray {runs}` runs "
                              f"{method}; {hint}, or remove method")
        raw["method"] = method
    if check is not None:
        check(raw)
    for key, value in kw.items():
        if value is not None:
            set_dotted(raw, key, value)
    if isinstance(raw.get("arch"), str):  # a path to arch.json
        raw["arch"] = read_arch(raw["arch"])
    return from_dict(raw, source)
