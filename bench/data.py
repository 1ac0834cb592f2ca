"""Data-layer benchmark: preparation vs raw tiktoken throughput, and the sampler's time per batch.

    python bench/data.py [--mb 20] [--bpe-file ../shared/data/gpt2.tiktoken] [--repeat 2]

Every figure is the best of ``--repeat`` runs; CPU seconds (this process, its threads and its worker
processes) give throughput per core even when other work shares the machine. Preparation is measured end to end (hash the input, load the
JSONL into Arrow, tokenize, split, write the .bin files) with a fresh datasets cache each time.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import datasets

from tangle_ray.data import TextSource, WindowSampler, get_tokenizer, load_split, prepare_text, read_meta
from tangle_ray.data.synth import write_demo_corpus
from tangle_ray.data.tokenizer import BPE_ENV

REPO = Path(__file__).resolve().parents[1]
CHARS_PER_STORY = 357  # average length of a synthetic story


def cpu_seconds() -> float:
    """CPU time of this process, its threads and its finished child processes (datasets' map workers)."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def best_of(repeat: int, fn: Callable[[], object]) -> tuple[float, float, object]:
    """(least wall seconds, least CPU seconds, result) over ``repeat`` calls."""
    walls, cpus = [], []
    for _ in range(repeat):
        wall, cpu = time.perf_counter(), cpu_seconds()
        result = fn()
        walls.append(time.perf_counter() - wall)
        cpus.append(cpu_seconds() - cpu)
    return min(walls), min(cpus), result


def run(args: argparse.Namespace, tmp: Path) -> None:
    n = int(args.mb * 1e6 / CHARS_PER_STORY)
    corpus = write_demo_corpus(tmp / "corpus", n_train=n, n_valid=n // 20, seed=0)
    texts = [
        json.loads(line)["text"]
        for f in ("train.jsonl", "validation.jsonl")
        for line in (corpus / f).read_text().splitlines()
    ]
    enc = get_tokenizer("gpt2", bpe_file=args.bpe_file).encoding
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} at start;"
        f" python {platform.python_version()}"
    )
    print(f"corpus: {sum(map(len, texts)) / 1e6:.1f} MB, {len(texts)} synthetic stories\n")

    def count(ids: list) -> int:
        return sum(map(len, ids)) + len(ids)  # + one end-of-text per story, as in the prepared files

    raw = {
        "tiktoken encode_ordinary_batch(num_threads=1)": lambda: enc.encode_ordinary_batch(
            texts, num_threads=1
        ),
        "tiktoken encode_ordinary_batch(num_threads=2)": lambda: enc.encode_ordinary_batch(
            texts, num_threads=2
        ),
        "tiktoken encode_ordinary, plain loop": lambda: [enc.encode_ordinary(t) for t in texts],
        "tiktoken encode_to_numpy, plain loop": lambda: [enc.encode_to_numpy(t) for t in texts],
    }
    rows = []  # (what, wall seconds, CPU seconds, tokens)
    for name, call in raw.items():
        wall, cpu, ids = best_of(args.repeat, call)
        rows.append((name, wall, cpu, count(ids)))
    for num_proc in (1, 2):

        def prepare(num_proc: int = num_proc) -> dict:
            run = Path(tempfile.mkdtemp(dir=tmp))
            datasets.config.HF_DATASETS_CACHE = str(run / "hf_cache")
            src = TextSource(kind="jsonl", path=str(corpus))
            return read_meta(prepare_text(src, run / "out", bpe_file=args.bpe_file, num_proc=num_proc))

        wall, cpu, meta = best_of(args.repeat, prepare)
        tokens = sum(s["tokens"] for s in meta["splits"].values())
        rows.append((f"prepare_text(num_proc={num_proc}), end to end", wall, cpu, tokens))

    batch1 = rows[0][3] / rows[0][2]
    fastest = max(tok / cpu for _, _, cpu, tok in rows[: len(raw)])
    print(
        f"{'':48} {'wall s':>6} {'Mtok/s':>7} {'CPU s':>6} {'Mtok/CPU-s':>10} {'vs batch':>8} {'vs best':>8}"
    )
    for name, wall, cpu, tok in rows:
        print(
            f"{name:48} {wall:6.2f} {tok / wall / 1e6:7.2f} {cpu:6.2f} {tok / cpu / 1e6:10.2f}"
            f" {tok / cpu / batch1:7.2f}x {tok / cpu / fastest:7.2f}x"
        )
    print(
        "Mtok/CPU-s = tokens per second of one core (robust to other load); vs batch / vs best: relative to"
        " encode_ordinary_batch(num_threads=1) / to the fastest raw tiktoken call\n"
    )

    tokens = load_split(next(tmp.glob("*/out")), "train")
    sampler = WindowSampler(tokens, block_size=224, micro_batch=8, seed=0, split="train")
    sampler.get(0, 0)
    sec, cpu, _ = best_of(args.repeat, lambda: [sampler.get(step, 0) for step in range(args.steps)])
    print(f"load average {os.getloadavg()[0]:.1f} at end")
    print(
        f"sampler (micro_batch 8, block 224, memmap of {len(tokens) / 1e6:.1f} M tokens): "
        f"{args.steps / sec:,.0f} batches/s = {sec / args.steps * 1e3:.3f} ms per batch"
        f" ({cpu / args.steps * 1e3:.3f} ms CPU)"
    )
    step = train_step_seconds(args.repeat)
    print(f"one training step (forward, backward, AdamW) of the smallest gpt-nano architecture, micro-batch 8 x 64:"
          f" {step * 1e3:.1f} ms = {step / (sec / args.steps):,.0f}x the sampler's time per batch")


def train_step_seconds(repeat: int) -> float:
    """A plain training step of the smallest architecture of the smallest GPT space: what the sampler feeds."""
    import torch

    from tangle_ray import load_space

    space = load_space("gpt-nano")
    model = space.build_supernet().extract(space.smallest())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randint(0, space.fixed["vocab_size"], (8, space.fixed["block_size"]))

    def step() -> None:
        model(x, x)[1].backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()
    return best_of(repeat, lambda: [step() for _ in range(5)])[0] / 5


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mb", type=float, default=20.0, help="corpus size in MB of text")
    ap.add_argument(
        "--bpe-file", default=os.environ.get(BPE_ENV, str(REPO / ".." / "shared" / "data" / "gpt2.tiktoken"))
    )
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--steps", type=int, default=2000, help="sampler batches to time")
    args = ap.parse_args()
    datasets.disable_progress_bars()
    with tempfile.TemporaryDirectory(prefix="bench_data_") as tmp:
        run(args, Path(tmp))


if __name__ == "__main__":
    main()
