"""Ray Train + DeepSpeed, side by side in one run:

1. tokens/s of a TangleNAS step against a plain fixed-architecture step (the largest architecture), same setup;
2. per-rank optimizer-state bytes under ZeRO 0, 1, 2 and 3 with 2 workers;
3. the wall-clock overhead of a TorchTrainer.fit() around the training loop.

    python bench/train.py [--space gpt-nano] [--steps 12] [--gpu]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import ray

from tangle_ray.data.text.prepare import prepare_text
from tangle_ray.data.text.sources import TextSource
from tangle_ray.data.text.synth import write_demo_corpus
from tangle_ray.models import load_space
from tangle_ray.report.runs import timeline_text
from tangle_ray.train.config import load_config
from tangle_ray.train.runner import run_training


def run(base: list[str], *extra: str):
    start = time.perf_counter()
    result = run_training(load_config(None, [*base, *extra]), export=False)
    wall = time.perf_counter() - start
    metrics = result.history.metrics
    return result, wall, metrics


def at_least(least: int):
    """An argparse type: an integer no smaller than ``least``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < least:
            raise argparse.ArgumentTypeError(f"{value} is below the minimum, {least}")
        return value

    return parse


def zero_stages(text: str) -> list[int]:
    """An argparse type: a non-empty comma-separated list of ZeRO stages (0 to 3)."""
    words = [w.strip() for w in text.split(",") if w.strip()]
    if not words:
        raise argparse.ArgumentTypeError("give at least one ZeRO stage, e.g. 0,2")
    if any(w not in ("0", "1", "2", "3") for w in words):
        raise argparse.ArgumentTypeError(f"{text!r}: ZeRO stages are 0, 1, 2 and 3")
    return [int(w) for w in words]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--space", default="gpt-nano", help="a GPT space (default: gpt-nano)")
    parser.add_argument("--steps", type=at_least(2), default=12, help="training steps of the throughput runs, at "
                        "least 2: tokens/s is taken over the second half (default: 12)")
    parser.add_argument("--micro-batch", type=at_least(1), default=8, help="windows per micro-batch (default: 8)")
    parser.add_argument("--workers", type=at_least(1), default=2, help="Ray Train workers (default: 2)")
    parser.add_argument("--gpu", action="store_true", help="one GPU per worker, bf16")
    parser.add_argument("--stages", type=zero_stages, default="0,1,2,3",
                        help="ZeRO stages for the optimizer-state comparison, comma-separated (default: 0,1,2,3)")
    parser.add_argument("--compile", action="store_true", help="also time both steps with torch.compile")
    args = parser.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
    with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp:
        ray.init(address="local", num_cpus=max(2, args.workers), include_dashboard=False, log_to_driver=False)
        try:
            bench(args, Path(tmp))
        finally:
            ray.shutdown()


def bench(args: argparse.Namespace, tmp: Path) -> None:
    tokens = prepare_text(TextSource(kind="jsonl", path=str(write_demo_corpus(tmp / "raw", n_train=1000))), tmp / "tok")
    space = load_space(args.space)
    W = args.workers
    base = [f"space={args.space}", f"data.dir={tokens}", f"steps={args.steps}", f"micro_batch_size={args.micro_batch}",
            f"global_batch_size={args.micro_batch * W}", f"log_every={args.steps // 2}", f"eval_every={args.steps}",
            f"checkpoint_every={args.steps}", "eval_samples=4", "dropout=0.0", f"scaling.num_workers={W}",
            f"scaling.use_gpu={str(args.gpu).lower()}", f"run.storage_path={tmp / 'runs'}", "zero_stage=2"]
    device = "GPU" if args.gpu else "CPU"
    print(f"{args.space}, {W} worker(s) on {device}, micro-batch {args.micro_batch} x {space.fixed['block_size']} "
          f"tokens, {args.steps} steps; tokens/s over the second half of the steps\n")

    searched, wall, tangle = run(base, "method=tanglenas", "run.name=tanglenas")
    arch = space.largest()
    _, _, fixed = run(base, "method=fixed", f"arch={arch}".replace("'", ""), "run.name=fixed")
    t_speed, f_speed = tangle[-1]["tokens_per_s"], fixed[-1]["tokens_per_s"]
    print("1. throughput (weight-step tokens; a TangleNAS step also runs an architecture step on as many tokens)")
    print(f"   TangleNAS (DrNAS) step : {t_speed:10,.0f} tokens/s")
    print(f"   fixed largest arch     : {f_speed:10,.0f} tokens/s")
    if args.compile:
        _, _, tc = run(base, "method=tanglenas", "run.name=tanglenas-compiled", "compile=true")
        _, _, fc = run(base, "method=fixed", f"arch={arch}".replace("'", ""), "run.name=fixed-compiled", "compile=true")
        print(f"   compiled TangleNAS     : {tc[-1]['tokens_per_s']:10,.0f} tokens/s")
        print(f"   compiled fixed         : {fc[-1]['tokens_per_s']:10,.0f} tokens/s  "
              f"(ratio {fc[-1]['tokens_per_s'] / tc[-1]['tokens_per_s']:.2f}x)")
    print(f"   ratio fixed / TangleNAS: {f_speed / t_speed:.2f}x  (a TangleNAS step is an architecture step plus a "
          f"weight step; a fixed step is one weight step)\n")

    print(f"2. optimizer-state bytes per rank ({W} workers, TangleNAS)")
    state = {}
    for stage in args.stages:
        _, _, m = run(base, "method=tanglenas", f"zero_stage={stage}", f"run.name=zero{stage}", f"steps={2}",
                      "log_every=1")
        state[stage] = m[-1]["optimizer_state_bytes"]
        ratio = f"  ({state[stage] / state[0]:.2f}x of ZeRO-0)" if 0 in state else ""
        print(f"   ZeRO-{stage}: {state[stage] / 2**20:8.2f} MiB{ratio}")
    if 0 in state and 2 in state:
        print(f"   target: ZeRO-2 at most 0.55x of ZeRO-0 -> {state[2] / state[0]:.2f}x")
    print()

    loop = tangle[-1]["elapsed_s"]
    print("3. Ray Train start-up and tear-down (the TangleNAS run)")
    print(f"   run_training wall {wall:.1f} s, training loop {loop:.1f} s, overhead {wall - loop:.1f} s")
    print(f"   {timeline_text(searched.timeline)}")
    print(f"   before fit() (checks, data, Ray joined) and after it (reports): "
          f"{wall - searched.timeline['fit_s']:.1f} s")


if __name__ == "__main__":
    main()
