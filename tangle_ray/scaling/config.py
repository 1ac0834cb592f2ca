"""The typed configuration of a scaling experiment, read from a scaling file (YAML) plus ``key=value`` overrides.

A scaling file names a run file (relative to it) whose settings every point shares, and a grid: supernet sizes
(spaces), worker counts, ZeRO stages, micro-batches, gradient accumulation and methods. ``mode`` says what stays
fixed as workers are added: ``weak`` keeps each worker's batch (micro-batch x accumulation), ``strong`` keeps
``global_batch`` and derives each point's accumulation from it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tangle_ray.configs import build, check_range, read_settings
from tangle_ray.errors import ConfigError, shorten
from tangle_ray.methods import DEFAULT_METHOD, METHODS
from tangle_ray.names import check_name

MODES = ("weak", "strong")
# dense bf16 tensor-core peaks per device (NVIDIA data sheets, SXM where there are two forms), FLOP/s
PEAK_BF16_FLOPS = {"h100": 989e12, "h200": 989e12, "a100": 312e12, "l4": 121e12}
MEMORY_GB = {"h100": 80.0, "h200": 141.0, "a100": 80.0, "l4": 24.0}  # per device (A100: the 80 GB form)


def peak_of(device_name: str) -> float | None:
    """The bf16 peak FLOP/s of a GPU named as CUDA names it (``NVIDIA H100 80GB HBM3``), if the table has it."""
    words = set(re.split(r"[^a-z0-9]+", device_name.lower()))
    return next((peak for name, peak in PEAK_BF16_FLOPS.items() if name in words), None)


@dataclass(frozen=True)
class Grid:
    """Every combination of these values is one point (``grad_accum`` only in weak mode)."""

    space: list[str]
    workers: list[int] = field(default_factory=lambda: [1])
    zero_stage: list[int] = field(default_factory=lambda: [2])
    micro_batch: list[int] = field(default_factory=lambda: [4])
    grad_accum: list[int] = field(default_factory=lambda: [1])
    method: list[str] = field(default_factory=lambda: [DEFAULT_METHOD])


@dataclass(frozen=True)
class Device:
    """The device each worker holds: ``name`` (a GPU of ``PEAK_BF16_FLOPS``, or ``cpu``), its peak FLOP/s
    (default: the table's; none on CPUs, whose reports give FLOP/s instead of MFU) and the memory a worker may
    use (GiB; a point over it is recorded as out of memory; default: the GPU's own, no limit on CPUs)."""

    name: str = "cpu"
    peak_flops: float | None = None
    memory_gb: float | None = None

    @property
    def peak(self) -> float | None:
        return self.peak_flops if self.peak_flops is not None else PEAK_BF16_FLOPS.get(self.name)

    @property
    def memory(self) -> float | None:
        """GiB a worker may hold: ``memory_gb``, else the GPU's (none on CPUs)."""
        return self.memory_gb if self.memory_gb is not None else MEMORY_GB.get(self.name)


@dataclass(frozen=True)
class ScaleConfig:
    name: str
    run: str  # the run file every point starts from, relative to the scaling file
    grid: Grid
    settings: dict[str, Any] = field(default_factory=dict)  # dotted settings over the run file's, for every point
    mode: str = "weak"
    global_batch: int | None = None  # strong mode: samples per step at every worker count
    tokens: int | None = None  # units (tokens) each point trains on after its warm-up
    steps: int | None = None  # or a fixed number of timed steps (throughput-only points)
    warmup_steps: int = 2  # steps before timing starts (allocation, first-step set-up)
    device: Device = field(default_factory=Device)
    calibration_flops_per_s: float | None = None  # achieved FLOP/s per worker for --dry-run times (default: the
    # fastest measured point in the folder)

    def __post_init__(self) -> None:
        src = "scaling config"
        check_name(self.name, f"{src}: name")
        g = self.grid
        for key in ("space", "workers", "zero_stage", "micro_batch", "grad_accum", "method"):
            values = getattr(g, key)
            if not values or len({str(v) for v in values}) != len(values):
                raise ConfigError(f"{src}: grid.{key} = {shorten(values)} must be a non-empty list of distinct values")
        for w in g.workers:
            check_range(w, f"{src}: grid.workers[]", 1, 4096)
        for z in g.zero_stage:
            if z not in (0, 1, 2, 3):
                raise ConfigError(f"{src}: grid.zero_stage value {shorten(z)} does not exist; allowed: [0, 1, 2, 3]")
        for key in ("micro_batch", "grad_accum"):
            for v in getattr(g, key):
                check_range(v, f"{src}: grid.{key}[]", 1, 2**20)
        supernet_methods = [name for name, cls in METHODS.items() if cls.trains_supernet]
        for m in g.method:
            if m not in supernet_methods:
                raise ConfigError(f"{src}: grid.method value {shorten(m)}; allowed: {supernet_methods} (the methods "
                                  "that train a supernet)")
        if self.mode not in MODES:
            raise ConfigError(f"{src}: mode = {shorten(self.mode)}; allowed: {list(MODES)}")
        if self.mode == "strong":
            if self.global_batch is None:
                raise ConfigError(f"{src}: mode strong needs global_batch (samples per step at every worker count)")
            check_range(self.global_batch, f"{src}: global_batch", 1, 2**30)
            if g.grad_accum != [1]:
                raise ConfigError(f"{src}: grid.grad_accum = {shorten(g.grad_accum)}: in strong mode each point's "
                                  "accumulation is global_batch / (workers x micro_batch); leave grad_accum out")
            for w in g.workers:
                for mb in g.micro_batch:
                    if self.global_batch % (w * mb):
                        raise ConfigError(f"{src}: global_batch = {self.global_batch} is not divisible by workers x "
                                          f"micro_batch = {w} x {mb}; choose a global batch every point divides")
        if (self.tokens is None) == (self.steps is None):
            raise ConfigError(f"{src}: give exactly one of tokens (a training budget per point) or steps (timed "
                              f"steps, throughput only); got tokens = {self.tokens}, steps = {self.steps}")
        if self.tokens is not None:
            check_range(self.tokens, f"{src}: tokens", 1, 10**15)
        if self.steps is not None:
            check_range(self.steps, f"{src}: steps", 1, 10**9)
        check_range(self.warmup_steps, f"{src}: warmup_steps", 1, 10**6)
        d = self.device
        if d.name not in ("cpu", *PEAK_BF16_FLOPS) and d.peak_flops is None:
            raise ConfigError(f"{src}: device.name = {shorten(d.name)} has no known peak; allowed: "
                              f"{['cpu', *PEAK_BF16_FLOPS]}, or give device.peak_flops")
        for key in ("peak_flops", "memory_gb"):
            if (v := getattr(d, key)) is not None:
                check_range(v, f"{src}: device.{key}", 0, None, lo_open=True)
        if self.calibration_flops_per_s is not None:
            check_range(self.calibration_flops_per_s, f"{src}: calibration_flops_per_s", 0, None, lo_open=True)


def load_scale(path: str | Path, overrides: list[str] | None = None) -> tuple[ScaleConfig, Path]:
    """The scaling file with overrides applied, and the folder its run file is read from."""
    raw, source = read_settings(path, overrides, "scaling")
    return build(ScaleConfig, raw, source, "scaling config"), Path(path).resolve().parent
