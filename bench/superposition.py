"""Training-step time and peak memory: TangleNAS supernet vs the largest fixed model vs output mixing.

A TangleNAS weight step (mixing weights sampled by DrNAS from the detached alphas, forward, backward, AdamW)
is compared with the same step of the largest fixed architecture and of the output-mixing (weight-sharing)
baseline; the architecture step (backward into the alphas only) is timed too. Each variant runs in its own
subprocess (clean peak memory); the ratios are taken from the same run.
    python bench/superposition.py [--device cuda] [--steps 10] [--batch 8]
Memory is the peak over what the built model occupies (CPU: peak RSS growth; CUDA: peak allocated).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch

from tangle_ray.mixers import drnas, keyed_generator
from tangle_ray.models import load_space, space_from_dict

MID_GPT = {  # a mid-sized GPT space: the gpt-tinystories structure at half the width, an 8k vocabulary
    "name": "bench-mid", "model": "gpt",
    "fixed": {"vocab_size": 8192, "padded_vocab_size": 8192, "block_size": 224, "bias": False, "dropout": 0.0},
    "choices": {"n_layer": [4, 5, 6], "n_embd": [192, 288, 384]},
    "per_layer": {"n_head": [6, 8, 12], "mlp_ratio": [2, 3, 4]},
}
VARIANTS = ("largest", "tanglenas", "output_mix", "arch_step")


def peak_memory(device: str) -> int:
    if device == "cuda":
        return torch.cuda.max_memory_allocated()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def bench_space(name: str | None):
    return load_space(name) if name else space_from_dict(MID_GPT)


def measure(variant: str, device: str, steps: int, batch: int, space_name: str | None) -> dict[str, float]:
    torch.manual_seed(0)
    space = bench_space(space_name)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32  # as DeepSpeed trains: bf16 on GPUs
    supernet = space.build_supernet()
    supernet.net.to(device, dtype)
    supernet.alphas.to(device)
    alphas = {k: v.detach().to(device).requires_grad_() for k, v in supernet.alphas.items()}
    if variant == "largest":
        model = supernet.extract(space.largest())
        del supernet
    params = list((model if variant == "largest" else supernet.net).parameters())
    opt = torch.optim.AdamW(params, lr=1e-4)
    arch_opt = torch.optim.Adam(alphas.values(), lr=3e-4)
    T = space.fixed["block_size"]
    x = torch.randint(0, space.fixed["vocab_size"], (batch, T), device=device)

    def step(i: int) -> None:
        if variant == "largest":
            model(x, x)[1].backward()
        elif variant == "arch_step":  # gradients into the alphas only, as in the bilevel search
            W = drnas(alphas, keyed_generator(0, i))
            supernet(x, x, weights=W)[1].backward(inputs=list(alphas.values()))
            arch_opt.step()
            arch_opt.zero_grad(set_to_none=True)
            return
        else:
            W = drnas({k: a.detach() for k, a in alphas.items()}, keyed_generator(0, i))
            supernet(x, x, weights=W, output_mix=variant == "output_mix")[1].backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated() if device == "cuda" else peak_memory(device)
    step(0)  # warm-up (allocations, kernels)
    start = time.perf_counter()
    for i in range(1, steps + 1):
        step(i)
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / steps
    return {"variant": variant, "step_s": seconds, "tokens_per_s": batch * T / seconds,
            "peak_bytes": peak_memory(device) - base}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--space", help="a space name instead of the built-in mid-sized GPT, e.g. gpt-tinystories")
    parser.add_argument("--variant", choices=VARIANTS, help="(internal) measure one variant in this process")
    args = parser.parse_args()
    if args.variant:
        print(json.dumps(measure(args.variant, args.device, args.steps, args.batch, args.space)))
        return
    rows = {}
    for variant in VARIANTS:
        out = subprocess.run([sys.executable, __file__, "--variant", variant, "--device", args.device,
                              "--steps", str(args.steps), "--batch", str(args.batch)]
                             + (["--space", args.space] if args.space else []),
                             check=True, capture_output=True, text=True).stdout
        rows[variant] = json.loads(out.strip().splitlines()[-1])
    space = bench_space(args.space)
    print(f"space {space.name}, device {args.device}, batch {args.batch} x {space.fixed['block_size']} tokens, "
          f"{args.steps} steps; largest arch {space.param_count(space.largest()) / 1e6:.1f}M parameters")
    print(f"{'variant':12s} {'step ms':>9s} {'tokens/s':>10s} {'peak MB':>9s}")
    for r in rows.values():
        print(f"{r['variant']:12s} {r['step_s'] * 1e3:9.1f} {r['tokens_per_s']:10.0f} {r['peak_bytes'] / 2**20:9.1f}")
    L, T, O, A = rows["largest"], rows["tanglenas"], rows["output_mix"], rows["arch_step"]
    print(f"time   tanglenas / largest:    {T['step_s'] / L['step_s']:.2f}x   (target <= 1.3x)")
    print(f"time   arch_step / largest:    {A['step_s'] / L['step_s']:.2f}x   (a search step is one of each)")
    print(f"memory tanglenas / largest:    {T['peak_bytes'] / max(L['peak_bytes'], 1):.2f}x")
    print(f"time   output_mix / tanglenas: {O['step_s'] / T['step_s']:.2f}x")
    print(f"memory output_mix / tanglenas: {O['peak_bytes'] / max(T['peak_bytes'], 1):.2f}x")


if __name__ == "__main__":
    main()
