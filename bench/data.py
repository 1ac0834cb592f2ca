"""Data-layer benchmark. Text: preparation vs raw tiktoken throughput, and the sampler's time per batch.
Images: the loader's images per second of one core (decode + augment at 224 x 224) against a training step of
an AutoFormer-T-size ViT. Pipelines: whether the input pipelines keep a GPU fed (the text sampler at the paper's
micro-batch against the H100 step times of docs/benchmarks.md; tangle_ray's image path against a plain PIL
baseline, per core, and the cores one GPU's AutoFormer-T step needs). Evaluation: the peak memory of scoring
``--eval-images`` images at 224 x 224 held as whole tensors (as before) against streamed batch by batch, each in
a fresh process, side by side, with equal metrics. Ray: decoding by Ray Data actors (``data.decoders``) against
decoding in the trainer, images/s and the trainer's CPU per image.

    python bench/data.py [--part text|images|pipelines|eval|ray|all] [--mb 20] [--bpe-file FILE] [--repeat 2]
                         [--images 64] [--tokens 100000000] [--micro-batch 64] [--mfu M] [--eval-images 2000]
                         [--ray-keys 12]

Every figure is the best of ``--repeat`` runs; CPU seconds (this process, its threads and its worker
processes) give throughput per core even when other work shares the machine. Text preparation is measured end to
end (hash the input, load the JSONL into Arrow, tokenize, split, write the .bin files) with a fresh datasets cache
each time. The images are synthetic JPEGs of ImageNet's typical size (about 500 x 375, quality 90).
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import platform
import random
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import datasets
import numpy as np
import torch
from PIL import Image

from tangle_ray.data import TextSource, WindowSampler, get_tokenizer, load_split, prepare_text, read_meta
from tangle_ray.data.text.synth import write_demo_corpus
from tangle_ray.data.text.tokenizer import BPE_ENV

CHARS_PER_STORY = 357  # average length of a synthetic story
IMAGENET_MEAN_STD = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


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
    from tangle_ray.data.images.batches import EvalImages, ImageBatches, PrefetchedBatches
    from tangle_ray.data.images.prepare import ImageStore, prepare_images
    from tangle_ray.data.images.sources import ImageSource
    from tangle_ray.tasks.base import materialize

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
    cpu = best_of(args.repeat, lambda: materialize(EvalImages(store, records, 224, 3)))[1]
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


# ------------------------------------------------------------------------------------------------- pipelines
# H100 step times recorded in docs/benchmarks.md (one NVIDIA H100 80GB HBM3, bf16, gpt-tinystories):
H100_FIXED_STEP = (16.1e-3, 30 * 224)  # section 1: the largest fixed model's step, 16.1 ms at micro-batch 30 x 224
H100_TANGLENAS_TOKENS_S = 93_806  # section 2: compiled TangleNAS search, weight-split tokens per second
H100_PEAK = 989e12  # dense bf16 FLOP/s (tangle_ray.scaling.config.PEAK_BF16_FLOPS["h100"])
PAPER_MICRO_BATCH, PAPER_BLOCK = 12, 224  # TangleNAS's train_tinystories_drnas.py: 12 x 224 tokens per micro-batch
GPT2_VOCAB = 50_257


def write_tokens(path: Path, n: int, seed: int = 0) -> None:
    """``n`` random GPT-2 token ids (uint16, as prepare_text writes them), written in chunks."""
    rng = np.random.default_rng(seed)
    with open(path, "wb") as f:
        for start in range(0, n, 10_000_000):
            f.write(rng.integers(0, GPT2_VOCAB, min(10_000_000, n - start), dtype=np.uint16).tobytes())


def pipeline_text(args: argparse.Namespace, tmp: Path) -> float:
    """The WindowSampler's time per micro-batch at the paper's 12 x 224 on a memory-mapped token file, against the
    H100 step times of docs/benchmarks.md. Returns the CPU ms per micro-batch."""
    write_tokens(tmp / "train.bin", args.tokens)
    tokens = np.memmap(tmp / "train.bin", dtype=np.uint16, mode="r")
    sampler = WindowSampler(tokens, PAPER_BLOCK, PAPER_MICRO_BATCH, seed=0, split="train")
    sampler.get(0, 0)
    walls, cpus = [], []
    for r in range(args.repeat):
        wall, cpu = time.perf_counter(), time.process_time()
        for step in range(args.steps):
            sampler.get(r * args.steps + step, 0)  # new windows every round: no round re-reads the same pages
        walls.append((time.perf_counter() - wall) / args.steps)
        cpus.append((time.process_time() - cpu) / args.steps)
    wall, cpu = statistics.median(walls), statistics.median(cpus)
    tokens_mb = PAPER_MICRO_BATCH * PAPER_BLOCK
    fixed = H100_FIXED_STEP[0] / H100_FIXED_STEP[1] * tokens_mb  # scaled linearly: smaller batches run no faster
    search = tokens_mb / H100_TANGLENAS_TOKENS_S  # per weight micro-batch; it reads an architecture one too
    x, y = sampler.get(0, 0)
    print(
        f"\ntext: WindowSampler, micro-batch {PAPER_MICRO_BATCH} x {PAPER_BLOCK},"
        f" np.memmap of {len(tokens) / 1e6:,.0f}M"
        f" random GPT-2 token ids (uint16, {tokens.nbytes / 1e6:,.0f} MB, page cache warm)\n"
        f"  per micro-batch: {wall * 1e3:.3f} ms wall, {cpu * 1e3:.3f} ms CPU (median of {args.repeat} x {args.steps});"
        f" x and y int64: {(x.nbytes + y.nbytes) / 1e3:.0f} kB to copy to the GPU\n"
        f"  H100 gpt-tinystories, largest fixed model (docs/benchmarks.md section 1: 16.1 ms per 30 x 224, scaled to"
        f" {PAPER_MICRO_BATCH} x {PAPER_BLOCK}: {fixed * 1e3:.2f} ms): sampler = {wall / fixed:.2%} of the step\n"
        f"  H100 TangleNAS search, compiled (section 2: {H100_TANGLENAS_TOKENS_S:,} weight tokens/s ="
        f" {search * 1e3:.1f}"
        f" ms per weight micro-batch, which also reads an architecture micro-batch): {2 * wall / search:.2%}"
    )
    return cpu * 1e3


def baseline_params(width: int, height: int, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
    """(top, left, h, w): torchvision's RandomResizedCrop.get_params, with Python's ``random``."""
    area = width * height
    for _ in range(10):
        target = area * random.uniform(*scale)
        aspect = math.exp(random.uniform(math.log(ratio[0]), math.log(ratio[1])))
        w, h = int(round(math.sqrt(target * aspect))), int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return random.randint(0, height - h), random.randint(0, width - w), h, w
    w, h = width, height
    if width / height < ratio[0]:
        h = int(round(width / ratio[0]))
    elif width / height > ratio[1]:
        w = int(round(height * ratio[1]))
    return (height - h) // 2, (width - w) // 2, h, w


def pil_baseline(encoded: list[bytes], resample: int) -> torch.Tensor:
    """The plain torchvision-style path, written with PIL, numpy and torch: open, RandomResizedCrop (crop, then
    resize to 224 x 224), horizontal flip, ToTensor (uint8 HWC -> float CHW / 255), Normalize, stacked."""
    mean = torch.tensor(IMAGENET_MEAN_STD[0])[:, None, None]
    std = torch.tensor(IMAGENET_MEAN_STD[1])[:, None, None]
    out = []
    for data in encoded:
        img = Image.open(io.BytesIO(data)).convert("RGB")
        top, left, h, w = baseline_params(*img.size)
        img = img.crop((left, top, left + w, top + h)).resize((224, 224), resample)
        if random.random() < 0.5:
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        x = torch.from_numpy(np.array(img, np.uint8, copy=True)).permute(2, 0, 1).contiguous().float().div(255)
        out.append(x.sub_(mean).div_(std))
    return torch.stack(out)


def run_pipelines(args: argparse.Namespace, tmp: Path) -> None:
    from tangle_ray import load_space
    from tangle_ray.data.images.augment import Augment, train_image
    from tangle_ray.data.images.batches import ImageBatches
    from tangle_ray.data.images.prepare import ImageStore, prepare_images
    from tangle_ray.data.images.sources import ImageSource

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one core, as in a DataLoader worker (idle OpenMP threads would count as CPU time)
    pipeline_text(args, tmp)

    write_jpegs(tmp / "jpegs", args.images)
    store = ImageStore(prepare_images(ImageSource(path=str(tmp / "jpegs")), tmp / "images"))
    mb = args.micro_batch
    plain = Augment(randaugment=False, random_erase=0, mixup_alpha=0, cutmix_alpha=0, label_smoothing=0)
    ours = {name: ImageBatches(store, "train", mb, 0, 224, 3, store.num_classes, aug)
            for name, aug in (("plain", plain), ("recipe", Augment()))}
    steps = max(1, math.ceil(args.images / mb))
    picks = [ours["plain"].records_of(step, 0) for step in range(steps)]  # every variant decodes these images
    encoded = [[store.encoded(r) for r in p] for p in picks]
    sizes = [Image.open(io.BytesIO(e)).size for p in encoded for e in p]
    n = steps * mb

    def decode_only() -> None:
        for batch in encoded:
            for data in batch:
                Image.open(io.BytesIO(data)).convert("RGB")

    def recipe_uint8() -> None:  # ImageBatches.get up to the uint8 stack, with the same draws
        b = ours["recipe"]
        for step, recs in enumerate(picks):
            rngs = [np.random.default_rng(seed) for seed in b._seeds(step, 0)[2:]]
            np.stack([train_image(store.encoded(r), store.where(r), 224, "RGB", b.augment, g)
                      for r, g in zip(recs, rngs)])

    variants = {
        "full-size JPEG decode only (Image.open + convert)": decode_only,
        "PIL baseline: open, RandomResizedCrop (bilinear), flip, to-tensor, normalize":
            lambda: [pil_baseline(batch, Image.Resampling.BILINEAR) for batch in encoded],
        "PIL baseline with bicubic resize (AutoFormer's --train-interpolation)":
            lambda: [pil_baseline(batch, Image.Resampling.BICUBIC) for batch in encoded],
        "tangle_ray: crop + flip (batches.py, augment.py)": lambda: [ours["plain"].get(s, 0) for s in range(steps)],
        "tangle_ray: AutoFormer-T recipe (+ RandAugment, erasing, mixup/cutmix)":
            lambda: [ours["recipe"].get(s, 0) for s in range(steps)],
        "  its per-image part only, uint8 out (normalise, erase, mix left to the GPU)": recipe_uint8,
    }
    names = list(variants)
    random.seed(0)
    for fn in variants.values():
        fn()  # warm: imports, page cache, allocator
    times: dict[str, list[float]] = {k: [] for k in names}
    order = list(names)
    for _ in range(args.repeat):  # rounds, each variant once per round in a new order: load hits all alike
        random.shuffle(order)
        for name in order:
            cpu = time.process_time()
            variants[name]()
            times[name].append((time.process_time() - cpu) / n)
    per_image = {k: statistics.median(v) for k, v in times.items()}
    base, recipe_name = names[1], names[4]

    def ratio(a: str, b: str) -> float:  # median over rounds of the round's ratio
        return statistics.median(x / y for x, y in zip(times[a], times[b]))

    kb = sum(len(e) for p in encoded for e in p) / n / 1e3
    print(
        f"\nimages: {len(store)} synthetic JPEGs (PIL, quality 90, random colour fields plus noise), {n} decoded per"
        f" variant per round ({steps} micro-batches of {mb}): median {statistics.median(w for w, _ in sizes)} x"
        f" {statistics.median(h for _, h in sizes)}, {kb:.0f} kB; 224 x 224, normalised float32; one core, one torch"
        f" thread; {args.repeat} rounds, medians"
    )
    print(f"{'':78} {'img/CPU-s':>9} {'ms/img':>7} {'vs baseline':>11}")
    for name in names:
        vs = "" if name == base else f"{ratio(base, name):10.2f}x"
        print(f"{name:78} {1 / per_image[name]:9.0f} {per_image[name] * 1e3:7.2f} {vs:>11}")
    print("  vs baseline: the baseline's time over the row's (above 1: faster than the baseline), per round")
    recipe_rate = 1 / per_image[recipe_name]

    gpt = load_space("gpt-tinystories")
    sequences = H100_FIXED_STEP[1] / gpt.fixed["block_size"]
    gpt_mfu = 3 * gpt.flops(gpt.largest()) * sequences / H100_FIXED_STEP[0] / H100_PEAK
    mfu = args.mfu if args.mfu is not None else gpt_mfu
    space = load_space("autoformer-t")
    small, large = space.flops(space.smallest()), space.flops(space.largest())
    print(
        f"\ncores per H100 for AutoFormer-T at 224 x 224 (no H100 images/s in docs/benchmarks.md: FLOPs at an assumed"
        f" MFU of {mfu:.1%}{'' if args.mfu else ' = the measured H100 gpt-tinystories fixed step of section 1'},"
        f" {H100_PEAK / 1e12:.0f} TFLOP/s peak; a training step = 3 forward FLOPs per image):"
    )
    cases = (
        ("retrain the smallest architecture", 3 * small, 1),
        ("retrain the largest architecture", 3 * large, 1),
        ("TangleNAS search (weight step 3F + architecture step ~2F of the largest, 2 images)", 5 * large, 2),
    )
    print(f"{'':84} {'GFLOP/img':>9} {'img/s':>7} {'cores':>6}")
    for name, flops, images in cases:
        rate = mfu * H100_PEAK / flops * images  # decoded images per second
        print(f"{name:84} {flops / images / 1e9:9.2f} {rate:7,.0f} {rate / recipe_rate:6.0f}")
    print(f"  cores = decoded images/s / {recipe_rate:.0f} images/s per core (the tangle_ray recipe row)")
    torch.set_num_threads(threads)


def file_resident() -> int:
    """Bytes of this process's resident memory that map files (the memory-mapped images: page cache)."""
    status = Path("/proc/self/status").read_text()
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith("RssFile:"))) * 1024


def eval_variant(folder: str, streamed: bool, queue) -> None:
    """In a fresh process: a pooled linear classifier scored on every training image of ``folder`` at 224 x 224
    in batches of 64, the set held as whole tensors or streamed; (peak growth of the resident set, less the
    memory-mapped encoded images it touched (file pages the kernel may drop), in bytes; wall seconds; the
    metrics)."""
    import resource

    from tangle_ray.evaluate import score
    from tangle_ray.tasks import Samples, get_task
    from tangle_ray.tasks.base import materialize

    task = get_task("classify")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(4), torch.nn.Flatten(), torch.nn.Linear(48, 8))
    before, mapped, start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file_resident(), time.perf_counter()
    samples = task.eval_set(task.data_config(dir=folder), {"img_size": 224, "in_chans": 3, "num_classes": 8},
                            "train", 10**9, 0)
    scores = score(model, model, task, samples if streamed else Samples(*materialize(samples)), 64)
    grown = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024 - (file_resident() - mapped)
    queue.put((grown, time.perf_counter() - start, scores))


def run_eval(args: argparse.Namespace, tmp: Path) -> None:
    import multiprocessing

    from tangle_ray.data.images.prepare import prepare_images
    from tangle_ray.data.images.sources import ImageSource

    write_jpegs(tmp / "eval-jpegs", args.eval_images)
    folder = str(prepare_images(ImageSource(path=str(tmp / "eval-jpegs")), tmp / "eval-images"))
    spawn = multiprocessing.get_context("spawn")
    rows = {}
    for streamed in (False, True):
        queue = spawn.Queue()
        process = spawn.Process(target=eval_variant, args=(folder, streamed, queue))
        process.start()
        rows[streamed] = queue.get()
        process.join()
    (whole, whole_s, whole_scores), (stream, stream_s, stream_scores) = rows[False], rows[True]
    n, size = whole_scores["samples"], 224 * 224 * 3 * 4
    print(f"evaluation of {n} images at 224 x 224 ({n * size / 2**20:,.0f} MiB as float32), batches of 64, "
          "each variant in a fresh process:")
    print(f"  whole tensors: peak memory (less mapped files) +{whole / 2**20:,.0f} MiB, {whole_s:.1f} s")
    print(f"  streamed:      peak memory (less mapped files) +{stream / 2**20:,.0f} MiB, {stream_s:.1f} s")
    print(f"  streamed / whole: memory {stream / whole:.3f}x, time {stream_s / whole_s:.2f}x; "
          f"metrics equal: {stream_scores == whole_scores}")


def run_ray(args: argparse.Namespace, tmp: Path) -> None:
    """Ray Data decoding (``data.decoders``) against decoding in the trainer, on a local Ray cluster: images/s
    (wall), the trainer's CPU per image (all of it when it decodes; ``ImageBatches.finish`` when actors do), and
    the pause a new pipeline of ``ray_decode.WINDOW`` keys costs."""
    import ray

    from tangle_ray.data.images.augment import Augment
    from tangle_ray.data.images.batches import ImageBatches
    from tangle_ray.data.images.prepare import ImageStore, prepare_images
    from tangle_ray.data.images.ray_decode import WINDOW, RayDataBatches
    from tangle_ray.data.images.sources import ImageSource

    write_jpegs(tmp / "ray_jpegs", args.images)
    store = ImageStore(prepare_images(ImageSource(path=str(tmp / "ray_jpegs")), tmp / "ray_images"))
    batches = ImageBatches(store, "train", args.micro_batch, 0, 224, 3, store.num_classes, Augment())
    torch.set_num_threads(1)
    keys, images = range(2, 2 + args.ray_keys), args.ray_keys * args.micro_batch
    local = best_of(args.repeat, lambda: [batches.get(s, 0) for s in keys])
    decoded = [batches.decode(s, 0) for s in keys]
    finish = best_of(args.repeat, lambda: [batches.finish(d) for d in decoded])[1]
    rows = [("in the trainer (ImageBatches.get)", local[0], local[1])]
    ray.init(address="local", num_cpus=os.cpu_count() + 1, include_dashboard=False, log_to_driver=False)
    try:
        for decoders in sorted({1, os.cpu_count() or 1}):
            remote = RayDataBatches(batches, decoders, {"CPU": 1}, prefetch=2)
            remote.get(0, 0), remote.get(1, 0)  # learnt: the stream (a new pipeline) starts at step 2
            first = best_of(1, lambda: remote.get(2, 0))[0]
            rest = best_of(1, lambda: [remote.get(s, 0) for s in keys[1:]])
            per_key = rest[0] / (len(keys) - 1)
            rows.append((f"Ray Data, {decoders} decoder(s) (pause {first:.2f} s per {WINDOW} keys)",
                         per_key * len(keys), rest[1] / (len(keys) - 1) * len(keys)))
            remote.close()
    finally:
        ray.shutdown()
    print(f"\nRay Data decoding: {images} images, micro-batches of {args.micro_batch}, DeiT/AutoFormer recipe, "
          f"224 x 224")
    print(f"{'':58} {'images/s':>9} {'vs trainer':>10} {'trainer ms/img':>15}")
    for name, wall, cpu in rows:
        print(f"{name:58} {images / wall:9.1f} {local[0] / wall:9.2f}x {cpu / images * 1e3:15.2f}")
    print(f"{'ImageBatches.finish alone (the trainer part of Ray Data)':58} {'':9} {'':10} "
          f"{finish / images * 1e3:15.2f}")


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
    ap.add_argument("--part", choices=("text", "images", "pipelines", "eval", "ray", "all"), default="all",
                    help="which benchmark to run (default: all)")
    ap.add_argument("--mb", type=at_least(0.01, float), default=20.0,
                    help="corpus size in MB of text, at least 0.01 (default: 20)")
    ap.add_argument("--images", type=at_least(MIN_IMAGES), default=64,
                    help=f"synthetic JPEGs to time the image loader on, at least {MIN_IMAGES} (default: 64)")
    ap.add_argument("--bpe-file", default=os.environ.get(BPE_ENV),
                    help=f"a GPT-2 BPE file (default: ${BPE_ENV}, else the copy shipped with tangle_ray)")
    ap.add_argument("--repeat", type=at_least(1), default=2,
                    help="runs of each measurement; the best counts (pipelines: rounds, the median counts)"
                         " (default: 2)")
    ap.add_argument("--steps", type=at_least(1), default=2000, help="sampler batches to time (default: 2000)")
    ap.add_argument("--tokens", type=at_least(PAPER_BLOCK + 1), default=100_000_000,
                    help="pipelines: random GPT-2 tokens in the memory-mapped file (default: 100000000, 200 MB)")
    ap.add_argument("--micro-batch", type=at_least(1), default=64,
                    help="pipelines: images per micro-batch (default: 64, the AutoFormer recipes')")
    ap.add_argument("--mfu", type=at_least(1e-6, float), default=None,
                    help="pipelines: assumed H100 MFU of the AutoFormer-T step (default: that of the measured"
                         " gpt-tinystories step)")
    ap.add_argument("--eval-images", type=at_least(MIN_IMAGES), default=2000,
                    help="eval: synthetic JPEGs to score, whole and streamed (default: 2000)")
    ap.add_argument("--ray-keys", type=at_least(2), default=12,
                    help="ray: micro-batches to decode per variant (default: 12)")
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
        if args.part in ("pipelines", "all"):
            run_pipelines(args, Path(tmp))
        if args.part in ("eval", "all"):
            run_eval(args, Path(tmp))
        if args.part in ("ray", "all"):
            run_ray(args, Path(tmp))


if __name__ == "__main__":
    main()
