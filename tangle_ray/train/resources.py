"""What a worker holds and where its step time goes: peak memory, the bytes of parameters and optimizer states
on this rank, DeepSpeed's own wall-clock timers; and a memory limit that ends a run as out of memory.

Peak memory on a GPU is torch's allocator peak (allocated and reserved); on a CPU, the growth of the process's
peak resident set over its size before the model was built.
"""

from __future__ import annotations

import resource
import sys
from typing import Any

import torch

# DeepSpeed's engine timers (``wall_clock_breakdown``), cumulative milliseconds: forward, backward without the
# gradient reduction, the reduction, the optimizer step
TIMERS = ("fwd", "bwd_inner", "bwd_allreduce", "step")


class OutOfMemory(RuntimeError):
    """A worker exceeded ``memory_limit_gb`` (or the device ran out): the run is recorded as out of memory."""


def peak_rss_bytes() -> int:
    """The process's peak resident set size (``ru_maxrss``: KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


class MemoryMeter:
    """Peak memory of this worker since it was created (before the model exists)."""

    def __init__(self, device: torch.device, limit_gb: float | None):
        import deepspeed.runtime.zero.stage3  # noqa: F401  (the ZeRO optimizers' code is not the run's memory)
        import deepspeed.runtime.zero.stage_1_and_2  # noqa: F401

        self.cuda = device.type == "cuda"
        self.limit = None if limit_gb is None else int(limit_gb * 2**30)
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(device)
        self.device, self.base = device, 0 if self.cuda else peak_rss_bytes()

    def peak(self) -> dict[str, int]:
        if self.cuda:
            return {"peak_bytes": torch.cuda.max_memory_reserved(self.device),
                    "peak_allocated_bytes": torch.cuda.max_memory_allocated(self.device)}
        return {"peak_bytes": max(0, peak_rss_bytes() - self.base)}

    def check(self, step: int) -> None:
        """Raise ``OutOfMemory`` when the peak is over the limit."""
        if self.limit is not None and (used := self.peak()["peak_bytes"]) > self.limit:
            raise OutOfMemory(f"out of memory: peak {used / 2**30:.3f} GiB over memory_limit_gb = "
                              f"{self.limit / 2**30:g} GiB at step {step}")


def state_bytes(engine) -> dict[str, int]:
    """Bytes this rank holds of the weights (a ZeRO-3 partition where partitioned), of the optimizer's states
    (Adam's moments) and of the optimizer's own fp32 copy of the weights (ZeRO 1-3 keep one per partition)."""
    params = list(engine.module.parameters())
    held = sum(_held(p) for p in params)
    optimizer = getattr(engine.optimizer, "optimizer", engine.optimizer)  # ZeRO wraps torch's
    states = sum(t.numel() * t.element_size() for state in optimizer.state.values()
                 for t in state.values() if torch.is_tensor(t) and t.dim() > 0)
    own = {id(p) for p in params}
    master = sum(t.numel() * t.element_size() for group in optimizer.param_groups for t in group["params"]
                 if id(t) not in own)
    return {"param_bytes": held, "optimizer_state_bytes": states, "master_bytes": master}


def _held(p: torch.nn.Parameter) -> int:
    part = getattr(p, "ds_tensor", None)  # ZeRO-3: the rank's partition; the parameter itself is empty
    t = part if part is not None else p
    return t.numel() * t.element_size()


def timers_ms(engine) -> dict[str, float]:
    """DeepSpeed's cumulative engine timers (ms) where ``wall_clock_breakdown`` is on and they measure (on GPUs),
    else nothing."""
    if not engine.wall_clock_breakdown():
        return {}
    active = set(engine.engine_timers.active_timers())
    times = {f"{name}_ms": engine.timers(name).elapsed(reset=False) for name in TIMERS if name in active}
    return times if any(times.values()) else {}  # the CPU accelerator's timer events measure nothing


def snapshot(engine, meter: MemoryMeter) -> dict[str, Any]:
    return {**meter.peak(), **state_bytes(engine), **timers_ms(engine)}
