"""Data-layer benchmark. Text: preparation vs raw tiktoken throughput, and the sampler's time per batch.
Images: the loader's images per second of one core (decode + augment at 224 x 224) against a training step of
an AutoFormer-T-size ViT.

    python bench/data.py [--part text|images|all] [--mb 20] [--bpe-file FILE] [--repeat 2] [--images 64]

Every figure is the best of ``--repeat`` runs; CPU seconds (this process, its threads and its worker
processes) give throughput per core even when other work shares the machine. Text preparation is measured end to
end (hash the input, load the JSONL into Arrow, tokenize, split, write the .bin files) with a fresh datasets cache
each time. The images are synthetic JPEGs of ImageNet's typical size (about 500 x 375, quality 90).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import datasets

from tangle_ray.data import TextSource, WindowSampler, get_tokenizer, load_split, prepare_text, read_meta
from tangle_ray.data.text.synth import write_demo_corpus
from tangle_ray.data.text.tokenizer import BPE_ENV

CHARS_PER_STORY = 357  # average length of a synthetic story


def cpu_seconds() -> float:
    """CPU time of this process and its threads (to the nanosecond: a few images still take measurable time) and
    of its finished child processes (datasets' map workers; to the clock tick)."""
    t = os.times()
    return time.process_time() + t.children_user + t.children_system


def best_of(repeat: int, fn: Callable[[], object]) -> tuple[float, float, object]:
    """(least wall seconds, least CPU seconds, result) over ``repeat`` calls."""
    walls, cpus = [], []
    for _ in range(repeat):
        wall, cpu = time.perf_counter(), cpu_seconds()
        result = fn()
        walls.append(time.perf_counter() - wall)
        cpus.append(cpu_seconds() - cpu)
    return min(walls), min(cpus), result


def run_text(args: argparse.Namespace, tmp: Path) -> None:
    n = int(args.mb * 1e6 / CHARS_PER_STORY)
    corpus = write_demo_corpus(tmp / "corpus", n_train=n, n_valid=n // 20, seed=0)
    texts = [
        json.loads(line)["text"]
        for f in ("train.jsonl", "validation.jsonl")
        for line in (corpus / f).read_text().splitlines()
    ]
    enc = get_tokenizer("gpt2", bpe_file=args.bpe_file).encoding
    print(f"corpus: {sum(map(len, texts)) / 1e6:.1f} MB, {len(texts)} synthetic stories\n")

    def count(ids: list) -> int:
        return sum(map(len, ids)) + len(ids)  # + one end-of-text per story, as in the prepared files

    raw = {
        "tiktoken encode_ordinary_batch(num_threads=1)": lambda: enc.encode_ordinary_batch(texts, num_threads=1),
        "tiktoken encode_ordinary_batch(num_threads=2)": lambda: enc.encode_ordinary_batch(texts, num_threads=2),
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
    fastest = max(tok / max(cpu, 1e-9) for _, _, cpu, tok in rows[: len(raw)])
    print(f"{'':48} {'wall s':>6} {'Mtok/s':>7} {'CPU s':>6} {'Mtok/CPU-s':>10} {'vs batch':>8} {'vs best':>8}")
    for name, wall, cpu, tok in rows:
        cpu = max(cpu, 1e-9)  # a tiny corpus may end within one clock tick of the children's time
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
    print(
        f"one training step (forward, backward, AdamW) of the smallest gpt-nano architecture, micro-batch 8 x 64:"
        f" {step * 1e3:.1f} ms = {step / (sec / args.steps):,.0f}x the sampler's time per batch"
    )


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


MIN_IMAGES = 4  # one test image, three training images of one class: round(0.2 * 3) = 1 for the valid split


def write_jpegs(folder: Path, n: int) -> None:
    """``n`` JPEGs (quality 90) of ImageNet's typical sizes: smooth colour fields plus fine texture; up to 8
    classes of at least 8 images each, the first image of each class and every 8th after it in ``val/``."""
    import numpy as np
    from PIL import Image

    if n < MIN_IMAGES:
        raise ValueError(f"{n} images: at least {MIN_IMAGES} make a train, valid and test split")
    classes = max(1, min(8, n // 8))
    rng = np.random.default_rng(0)
    for i in range(n):
        width, height = int(rng.choice([500, 500, 375, 400, 333])), int(rng.choice([375, 333, 500, 300]))
        coarse = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)).resize(
            (width, height), Image.Resampling.BICUBIC
        )
        pixels = np.asarray(coarse, np.int16) + rng.normal(0, 12, (height, width, 3)).astype(np.int16)
        target = folder / ("val" if i // classes % 8 == 0 else "train") / f"class{i % classes}"
        target.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(target / f"{i}.JPEG", quality=90)


def run_images(args: argparse.Namespace, tmp: Path) -> None:
    import numpy as np
    import torch

    from tangle_ray.data.images.augment import Augment
    from tangle_ray.data.images.batches import ImageBatches, PrefetchedBatches, eval_images
    from tangle_ray.data.images.prepare import ImageStore, prepare_images
    from tangle_ray.data.images.sources import ImageSource

    write_jpegs(tmp / "jpegs", args.images)
    files = sorted((tmp / "jpegs").rglob("*.JPEG"))
    kb = sum(f.stat().st_size for f in files) / len(files) / 1e3
    print(f"\nimages: {len(files)} synthetic JPEGs, {kb:.0f} kB each")
    wall = best_of(1, lambda: prepare_images(ImageSource(path=str(tmp / "jpegs")), tmp / "images"))[0]
    print(f"prepare_images (copy bytes, read headers, split): {len(files) / wall:,.0f} images/s wall")
    store = ImageStore(tmp / "images")
    records = np.arange(len(store))

    def decode() -> None:
        from PIL import Image

        for r in records:
            Image.open(io.BytesIO(store.encoded(r))).convert("RGB").load()

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in DataLoader workers; idle OpenMP threads would spin and count as CPU time
    plain = Augment(randaugment=False, random_erase=0, mixup_alpha=0, cutmix_alpha=0, label_smoothing=0)
    rows = [("full-size decode only (Pillow)", best_of(args.repeat, decode)[1], len(records))]
    for name, aug in (("train: crop + flip", plain), ("train: DeiT/AutoFormer recipe", Augment())):
        batches = ImageBatches(store, "train", 8, 0, 224, 3, store.num_classes, aug)
        steps = max(1, len(records) // 8)
        cpu = best_of(args.repeat, lambda: [batches.get(step, 0) for step in range(steps)])[1]
        rows.append((f"{name}, micro-batches of 8", cpu, 8 * steps))
    cpu = best_of(args.repeat, lambda: eval_images(store, records, 224, 3))[1]
    rows.append(("eval: resize 256 + centre crop", cpu, len(records)))
    torch.set_num_threads(threads)
    print(f"{'one core, 224 x 224, normalised float32':48} {'CPU s':>6} {'img/CPU-s':>10} {'ms/img':>7}")
    for name, cpu, n in rows:
        print(f"{name:48} {cpu:6.2f} {n / cpu:10.1f} {cpu / n * 1e3:7.2f}")
    loader = rows[2][1] / rows[2][2]  # CPU seconds per image, full recipe

    ahead = PrefetchedBatches(ImageBatches(store, "train", 8, 0, 224, 3, store.num_classes, Augment()), 2)
    steps = max(1, args.images // 8)
    for step in range(2 + steps):
        if step == 2:  # steps 0 and 1 teach it the order and start the workers
            start = time.perf_counter()
        for j in range(2):
            ahead.get(step, j)
    rate = steps * 16 / (time.perf_counter() - start)
    ahead.close()
    print(f"PrefetchedBatches, 2 worker processes, recipe: {rate:.1f} images/s wall (shares the machine's cores)")

    wall, cpu, what = vit_step_seconds(args.repeat)
    print(
        f"one training step (forward, backward, AdamW) of {what}, batch 8 x 224 x 224, {threads} torch threads:"
        f" {wall * 1e3:,.0f} ms wall, {cpu:.2f} CPU s = {cpu / 8 * 1e3:,.0f} CPU ms per image"
    )
    print(
        f"ratio: a training step costs {cpu / 8 / loader:,.0f}x the loader's CPU time per image (recipe):"
        f" on this CPU one trainer needs {8 * loader / wall:.3f} loader cores; a trainer doing S steps/s"
        f" of batch B needs S x B x {loader * 1e3:.1f} ms of loader CPU per second"
    )


def vit_step_seconds(repeat: int) -> tuple[float, float, str]:
    """(wall s, CPU s) of a plain training step of AutoFormer-T's 12-layer, E=240, 4-head, ratio-4 architecture."""
    import torch

    from tangle_ray import load_space

    space = load_space("autoformer-t")
    depth = max(space.dims["depth"].values)
    arch = {"embed_dim": 240, "depth": 12, "mlp_ratio": [4.0] * depth, "num_heads": [4] * depth}
    model = space.family.build_model(space, arch)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x, y = torch.randn(8, 3, 224, 224), torch.randint(0, space.fixed["num_classes"], (8,))

    def step() -> None:
        model(x, y)[1].backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()
    params = sum(p.numel() for p in model.parameters()) / 1e6
    wall, cpu, _ = best_of(repeat, step)
    return wall, cpu, f"the AutoFormer-T space's ViT (12 layers, E=240, 4 heads of 64, ratio 4; {params:.1f}M)"


def at_least(least: int | float, kind: type = int) -> Callable[[str], int | float]:
    """An argparse type: a number of ``kind`` no smaller than ``least``."""

    def parse(text: str) -> int | float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a{'n integer' if kind is int else ' number'}") from None
        if not value >= least:
            raise argparse.ArgumentTypeError(f"{value} is below the minimum, {least}")
        return value

    return parse


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--part", choices=("text", "images", "all"), default="all",
                    help="which benchmark to run (default: all)")
    ap.add_argument("--mb", type=at_least(0.01, float), default=20.0,
                    help="corpus size in MB of text, at least 0.01 (default: 20)")
    ap.add_argument("--images", type=at_least(MIN_IMAGES), default=64,
                    help=f"synthetic JPEGs to time the image loader on, at least {MIN_IMAGES} (default: 64)")
    ap.add_argument("--bpe-file", default=os.environ.get(BPE_ENV),
                    help=f"a GPT-2 BPE file (default: ${BPE_ENV}, else the copy shipped with tangle_ray)")
    ap.add_argument("--repeat", type=at_least(1), default=2, help="runs of each measurement; the best counts "
                    "(default: 2)")
    ap.add_argument("--steps", type=at_least(1), default=2000, help="sampler batches to time (default: 2000)")
    args = ap.parse_args()
    datasets.disable_progress_bars()
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} at start;"
        f" python {platform.python_version()}"
    )
    with tempfile.TemporaryDirectory(prefix="bench_data_") as tmp:
        if args.part in ("text", "all"):
            run_text(args, Path(tmp))
        if args.part in ("images", "all"):
            run_images(args, Path(tmp))


if __name__ == "__main__":
    main()
