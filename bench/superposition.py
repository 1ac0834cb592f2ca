"""Training-step time and peak memory: TangleNAS supernet vs the largest fixed model vs output mixing.

A TangleNAS weight step (mixing weights sampled by DrNAS from the detached alphas, forward, backward, AdamW)
is compared with the same step of the largest fixed architecture (the standalone model extracted from the
supernet) and of the output-mixing (weight-sharing) baseline; the architecture step (backward into the alphas
only) is timed too. Any family: the built-in mid-sized GPT (default), a GPT space or a ViT space such as
autoformer-t (224 x 224 images; the default batch is then 4 images).
    python bench/superposition.py [--space autoformer-t] [--device cuda] [--batch 8] [--steps 2] [--repeats 5]
    python bench/superposition.py --space autoformer-t --threads 1   # a CPU shared with other jobs
    python bench/superposition.py --space autoformer-t --profile   # where the time of each variant goes

Time: every variant is built in one process and the variants take turns, ``--repeats`` rounds of ``--steps``
steps each (after a warm-up step), in a new order each round; the table gives the median step time over the
rounds and the ratios are medians of the per-round ratios, so that a neighbour's load hits all variants alike.
Memory: each variant in its own process (clean peak), two steps; the peak over what the built model occupies,
so gradients, optimizer state and activations (CPU: the peak resident set after a reset of the kernel's
high-water mark, so that building and freeing the supernet before the fixed model does not hide the fixed
model's peak, with glibc's MALLOC_MMAP_THRESHOLD_ at 64 KiB so that freed tensors leave the resident set;
CUDA: peak allocated).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from tangle_ray.keyed import keyed_generator
from tangle_ray.mixers import drnas
from tangle_ray.models import load_space, space_from_dict
from tangle_ray.tasks import get_task

MID_GPT = {  # a mid-sized GPT space: the gpt-tinystories structure at half the width, an 8k vocabulary
    "name": "bench-mid", "model": "gpt",
    "fixed": {"vocab_size": 8192, "padded_vocab_size": 8192, "block_size": 224, "bias": False, "dropout": 0.0},
    "choices": {"n_layer": [4, 5, 6], "n_embd": [192, 288, 384]},
    "per_layer": {"n_head": [6, 8, 12], "mlp_ratio": [2, 3, 4]},
}
VARIANTS = ("largest", "tanglenas", "output_mix", "arch_step")
DEFAULT_BATCH = {"gpt": 8, "vit": 4}


# ===================================================================== memory


def _proc_status(key: str) -> int | None:
    """A ``/proc/self/status`` field in bytes (Linux), or None."""
    try:
        match = re.search(rf"^{key}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M)
    except OSError:
        return None
    return int(match.group(1)) * 1024 if match else None


def reset_peak(device: str) -> int:
    """Reset the peak-memory counter; returns the baseline the peak is measured from."""
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated()
    gc.collect()
    try:  # Linux: "5" resets VmHWM, the peak resident set, to the current one
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass
    return _proc_status("VmRSS") or _ru_maxrss()


def peak_memory(device: str) -> int:
    if device == "cuda":
        return torch.cuda.max_memory_allocated()
    return _proc_status("VmHWM") or _ru_maxrss()


def _ru_maxrss() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


# ===================================================================== the variants


def bench_space(name: str | None):
    return load_space(name) if name else space_from_dict(MID_GPT)


class Bench:
    """The supernet, the largest fixed model and one batch; ``step(variant, i)`` runs one training step."""

    def __init__(self, space, device: str, batch: int, variants: tuple[str, ...]):
        torch.manual_seed(0)
        self.device, self.space = device, space
        dtype = torch.bfloat16 if device == "cuda" else torch.float32  # as DeepSpeed trains: bf16 on GPUs
        supernet = space.build_supernet()
        supernet.net.to(device, dtype)
        self.alphas = {k: v.detach().to(device).requires_grad_() for k, v in supernet.alphas.items()}
        self.model = supernet.extract(space.largest()).train() if "largest" in variants else None
        self.supernet = supernet.train() if set(variants) - {"largest"} else None
        del supernet
        self.opt = {}
        if self.model is not None:
            self.opt["largest"] = torch.optim.AdamW(self.model.parameters(), lr=1e-4)
        if self.supernet is not None:
            self.opt["supernet"] = torch.optim.AdamW(self.supernet.net.parameters(), lr=1e-4)
            self.arch_opt = torch.optim.Adam(self.alphas.values(), lr=3e-4)
        task = get_task(space.family.task)
        x, y = task.random_batch(space.fixed, batch, torch.Generator().manual_seed(0))
        self.x, self.y = x.to(device, dtype) if x.is_floating_point() else x.to(device), y.to(device)
        self.units = batch * task.units_per_sample(space.fixed)
        self.unit = task.unit

    def step(self, variant: str, i: int) -> None:
        x, y = self.x, self.y
        if variant == "largest":
            self.model(x, y)[1].backward()
            opt = self.opt["largest"]
        elif variant == "arch_step":  # gradients into the alphas only, as in the bilevel search
            W = drnas(self.alphas, keyed_generator(0, i))
            self.supernet(x, y, weights=W)[1].backward(inputs=list(self.alphas.values()))
            opt = self.arch_opt
        else:
            W = drnas({k: a.detach() for k, a in self.alphas.items()}, keyed_generator(0, i))
            self.supernet(x, y, weights=W, output_mix=variant == "output_mix")[1].backward()
            opt = self.opt["supernet"]
        opt.step()
        opt.zero_grad(set_to_none=True)

    def sync(self) -> None:
        if self.device == "cuda":
            torch.cuda.synchronize()


def measure_memory(variant: str, device: str, batch: int, space_name: str | None) -> dict[str, float]:
    """Peak memory of two steps of ``variant`` over what the built model occupies (run in its own process)."""
    bench = Bench(bench_space(space_name), device, batch, (variant,))
    base = reset_peak(device)
    bench.step(variant, 0)  # warm-up: the optimizer state and gradients count, as in training
    bench.step(variant, 1)
    bench.sync()
    return {"variant": variant, "peak_bytes": peak_memory(device) - base}


def measure_time(bench: Bench, variants: tuple[str, ...], steps: int, repeats: int) -> dict[str, list[float]]:
    """Seconds per step of every variant in each of ``repeats`` rounds; the order rotates every round."""
    times: dict[str, list[float]] = {v: [] for v in variants}
    for v in variants:
        bench.step(v, 0)  # warm-up
    i = 1
    for r in range(repeats):
        order = variants[r % len(variants):] + variants[: r % len(variants)]
        for v in order:
            bench.sync()
            start = time.perf_counter()
            for _ in range(steps):
                bench.step(v, i)
                i += 1
            bench.sync()
            times[v].append((time.perf_counter() - start) / steps)
    return times


def profile(bench: Bench, variants: tuple[str, ...], rows: int) -> None:
    """torch.profiler tables (self time per operator) of one step of each variant, after a warm-up step."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if bench.device == "cuda" else [])
    key = "self_cuda_time_total" if bench.device == "cuda" else "self_cpu_time_total"
    for v in variants:
        bench.step(v, 0)
        with torch_profile(activities=activities) as prof:
            bench.step(v, 1)
            bench.sync()
        print(f"\n=== {v}: one step, operators by self time")
        print(prof.key_averages().table(sort_by=key, row_limit=rows))


# ===================================================================== driver


def _ratio(times: dict[str, list[float]], a: str, b: str) -> float:
    return statistics.median(x / y for x, y in zip(times[a], times[b]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--space", help="a space name instead of the built-in mid-sized GPT, e.g. gpt-tinystories, "
                                        "autoformer-t")
    parser.add_argument("--batch", type=int, help="samples per step (default: 8 sequences, or 4 images for ViT)")
    parser.add_argument("--steps", type=int, default=2, help="steps per variant in each round")
    parser.add_argument("--repeats", type=int, default=5, help="rounds; the figures are medians over them")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated subset of {VARIANTS}")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's; on a shared machine 1 keeps "
                                                     "OpenMP threads from spinning against the neighbours' jobs)")
    parser.add_argument("--no-memory", action="store_true", help="skip the per-variant memory processes")
    parser.add_argument("--profile", action="store_true", help="print torch.profiler tables instead of timing")
    parser.add_argument("--profile-rows", type=int, default=25)
    parser.add_argument("--variant", choices=VARIANTS, help="(internal) measure one variant's memory in this process")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    space = bench_space(args.space)
    batch = args.batch or DEFAULT_BATCH.get(space.model, 8)
    variants = tuple(v for v in args.variants.split(",") if v)
    unknown = set(variants) - set(VARIANTS)
    if unknown or not variants:
        parser.error(f"--variants: unknown {sorted(unknown)}; allowed: {list(VARIANTS)}")
    if args.variant:
        print(json.dumps(measure_memory(args.variant, args.device, batch, args.space)))
        return
    if args.profile:
        profile(Bench(space, args.device, batch, variants), variants, args.profile_rows)
        return

    memory = {}
    # glibc keeps freed heap memory in the resident set, so the CPU peak would depend on the order of
    # allocations; with every allocation of 64 KiB or more mapped on its own, the resident set follows the
    # live tensors
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"} if args.device == "cpu" else None
    if not args.no_memory:
        for variant in variants:
            out = subprocess.run([sys.executable, __file__, "--variant", variant, "--device", args.device,
                                  "--batch", str(batch)] + (["--space", args.space] if args.space else [])
                                 + (["--threads", str(args.threads)] if args.threads else []),
                                 check=True, capture_output=True, text=True, env=env).stdout
            memory[variant] = json.loads(out.strip().splitlines()[-1])["peak_bytes"]
    bench = Bench(space, args.device, batch, variants)
    times = measure_time(bench, variants, args.steps, args.repeats)
    per_sample = get_task(space.family.task).units_per_sample(space.fixed)
    shape = f"{batch} x {per_sample} tokens" if bench.unit == "tokens" else \
        f"{batch} images of {space.fixed['img_size']} x {space.fixed['img_size']}"
    load = ", load average %.2f %.2f %.2f" % os.getloadavg() if hasattr(os, "getloadavg") else ""
    print(f"space {space.name}, device {args.device} ({torch.get_num_threads()} threads{load}), {shape}, "
          f"{args.repeats} rounds x {args.steps} steps; largest arch "
          f"{space.param_count(space.largest()) / 1e6:.1f}M parameters")
    print(f"{'variant':12s} {'step ms':>9s} {'min ms':>9s} {bench.unit + '/s':>10s} {'peak MB':>9s}")
    for v in variants:
        med = statistics.median(times[v])
        mem = f"{memory[v] / 2**20:9.1f}" if v in memory else f"{'-':>9s}"
        print(f"{v:12s} {med * 1e3:9.1f} {min(times[v]) * 1e3:9.1f} {bench.units / med:10.1f} {mem}")

    def line(a: str, b: str, note: str) -> None:
        if a in variants and b in variants:
            t = _ratio(times, a, b)
            m = f"{memory[a] / max(memory[b], 1):.2f}x" if a in memory and b in memory else "-"
            print(f"{a + ' / ' + b:26s} time {t:5.2f}x   memory {m:>6s}   {note}")

    line("tanglenas", "largest", "(issue 24's CPU goals: time <= 1.15x, memory <= 1.1x)")
    line("arch_step", "largest", "(a search step is one of each)")
    line("output_mix", "tanglenas", "(the weight-sharing baseline)")


if __name__ == "__main__":
    main()
