"""What a point measured, from its run's history: throughput after the warm-up, where the step time went
(DeepSpeed's timers), each rank's memory and model states, the loss and the architecture at the end, the FLOP/s
and MFU of what the step computes and of the architecture it trains."""

from __future__ import annotations

from typing import Any

from tangle_ray.scaling.plan import PlannedPoint
from tangle_ray.scaling.predict import arch_flops, step_flops

TIMER_PARTS = {"forward_backward_ms": ("fwd_ms", "bwd_inner_ms"), "communication_ms": ("bwd_allreduce_ms",),
               "optimizer_ms": ("step_ms",)}


def measured(p: PlannedPoint, record: dict[str, Any], peak_flops: float | None) -> dict[str, Any]:
    """The point's measurements (per worker where so named); ``peak_flops`` per device gives the MFUs."""
    point, history = p.point, record["history"]
    unit_key = next(k for k in history["metrics"][0] if k.endswith("_per_s"))
    timed = [r for r in history["metrics"] if r["step"] > point.warmup_steps]
    previous = [point.warmup_steps] + [r["step"] for r in timed[:-1]]
    units_per_step = point.global_batch * point.units_per_sample
    seconds = sum((r["step"] - s) * units_per_step / r[unit_key] for r, s in zip(timed, previous))
    steps = timed[-1]["step"] - point.warmup_steps
    step_s = seconds / steps
    out: dict[str, Any] = {"tokens_per_s": units_per_step / step_s, "step_ms": 1e3 * step_s}
    out["tokens_per_s_per_worker"] = out["tokens_per_s"] / point.workers
    resources = history["resources"]
    first = next(r for r in resources if r["step"] == point.warmup_steps)["ranks"][0]
    last = resources[-1]["ranks"]
    for part, timers in TIMER_PARTS.items():
        if all(t in last[0] for t in timers):
            out[part] = sum(last[0][t] - first[t] for t in timers) / steps
    if "forward_backward_ms" in out:
        out["other_ms"] = out["step_ms"] - sum(out[k] for k in TIMER_PARTS if k in out)
    out["peak_bytes"] = max(r["peak_bytes"] for r in last)
    if "peak_allocated_bytes" in last[0]:
        out["peak_allocated_bytes"] = max(r["peak_allocated_bytes"] for r in last)
    for key in ("param_bytes", "optimizer_state_bytes", "master_bytes"):
        out[key] = max(r[key] for r in last)
    out["train_loss"] = history["metrics"][-1]["train_loss"]
    if history["anytime"]:
        out["valid_loss"] = history["anytime"][-1]["valid_loss"]
    flops_step = step_flops(p.space, point.method, point.global_batch)
    flops_arch = arch_flops(p.space, record.get("arch"), point.global_batch)
    out |= {"step_flops": flops_step, "arch_step_flops": flops_arch, "flops_per_s": flops_step / step_s,
            "arch_flops_per_s": flops_arch / step_s,
            "compute_flops": flops_step * (point.warmup_steps + point.steps)}
    if record.get("arch") is not None:
        out["arch_params"] = p.space.param_count(record["arch"])
    if peak_flops:
        out["mfu"] = out["flops_per_s"] / (peak_flops * point.workers)
        out["arch_mfu"] = out["arch_flops_per_s"] / (peak_flops * point.workers)
    return out


def calibration(done: list[tuple[PlannedPoint, dict[str, Any]]]) -> float | None:
    """The highest FLOP/s per worker that a measured point reached."""
    rates = [measured(p, r, None)["flops_per_s"] / p.point.workers for p, r in done if "history" in r]
    return max(rates) if rates else None


def predicted_seconds(p: PlannedPoint, flops_per_s_per_worker: float | None) -> float | None:
    """The point's training time at ``flops_per_s_per_worker`` on each of its workers (no start-up)."""
    if not flops_per_s_per_worker:
        return None
    total = step_flops(p.space, p.point.method, p.point.global_batch) * (p.point.warmup_steps + p.point.steps)
    return total / (flops_per_s_per_worker * p.point.workers)
