"""Image classification: augmented keyed batches of a prepared image folder, scored by top-1/top-5 accuracy.

The space's fixed settings ``img_size``, ``in_chans`` (1: grayscale, 3: RGB) and ``num_classes`` say what the
model takes; images are decoded and resized to fit, and every label must be below ``num_classes``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch.nn.functional as F
from torch import Tensor

from tangle_ray.data.augment import Augment
from tangle_ray.data.image_batches import ImageBatches, PrefetchedBatches, eval_images, eval_records
from tangle_ray.data.image_prepare import META, SPLITS, ImageStore, prepare_images
from tangle_ray.data.images import ImageSource
from tangle_ray.errors import ConfigError
from tangle_ray.space import SearchSpace
from tangle_ray.tasks import register_task
from tangle_ray.tasks.base import Batches, Metric, Task

FIXED = ("img_size", "in_chans", "num_classes")


@dataclass(frozen=True)
class ImageData:
    """The ``data:`` section of an image-classification run: a prepared folder, or a source to prepare into it."""

    dir: str = "data/imagenet"  # prepared images (images.bin, offsets.npy, labels.npy, meta.json)
    source: dict[str, Any] | None = None  # an ImageSource (kind, path, ...): prepared into ``dir``, cached
    valid_fraction: float = 0.2  # the architecture split's class-balanced share of the training images
    short_side: int = 0  # preparation: re-encode images with a larger shorter side to this one (0: originals)
    num_workers: int = 0  # decoding processes per training process (0: decode in the training process)
    prefetch: int = 2  # micro-batches decoded ahead per worker
    eval_crop: float = 0.875  # evaluation: shorter side to img_size / eval_crop, then the centre crop
    augment: Augment = field(default_factory=Augment)

    def __post_init__(self) -> None:
        checks = {
            "valid_fraction": (0 < self.valid_fraction < 1, "in (0, 1)"),
            "short_side": (self.short_side >= 0, ">= 0"),
            "num_workers": (self.num_workers >= 0, ">= 0"),
            "prefetch": (self.prefetch >= 1, ">= 1"),
            "eval_crop": (0 < self.eval_crop <= 1, "in (0, 1]"),
        }
        for name, (ok, allowed) in checks.items():
            if not ok:
                raise ConfigError(f"run config: data.{name} = {getattr(self, name)!r}; allowed: {allowed}")


def _fixed(space: SearchSpace) -> tuple[int, int, int]:
    missing = [k for k in FIXED if k not in space.fixed]
    if missing:
        raise ConfigError(f"space {space.name!r}: the classify task needs fixed settings {list(FIXED)}; missing: {missing}")
    img_size, in_chans, num_classes = (space.fixed[k] for k in FIXED)
    if in_chans not in (1, 3):
        raise ConfigError(f"space {space.name!r}: fixed.in_chans = {in_chans!r}; allowed: [1, 3]")
    if img_size < 1 or num_classes < 1:
        raise ConfigError(f"space {space.name!r}: fixed.img_size = {img_size} and num_classes = {num_classes} must be >= 1")
    return img_size, in_chans, num_classes


@register_task
class ClassifyTask(Task):
    name = "classify"
    data_config = ImageData
    unit = "images"
    metrics = (
        Metric("top1", "top-1 accuracy", "max"),
        Metric("top5", "top-5 accuracy", "max"),
        Metric("loss", "loss", "min"),
    )

    def prepare(self, data: ImageData, space: SearchSpace, seed: int) -> ImageData:
        """Prepare ``data.source`` into ``data.dir`` (reused when unchanged), then check that the labels fit
        ``num_classes`` and that no split is empty."""
        folder = Path(data.dir)
        _, _, num_classes = _fixed(space)
        if data.source is not None:
            try:
                source = ImageSource(**data.source)
            except TypeError as e:
                raise ConfigError(f"data.source = {data.source!r}: {e}; allowed keys: kind, path, train_split, "
                                  "test_split, image_field, label_field, files") from None
            prepare_images(source, folder, short_side=data.short_side)
        elif not (folder / META).is_file():
            raise ConfigError(
                f"data.dir = {str(folder)!r} holds no prepared images (meta.json); give data.source "
                "(e.g. {kind: imagefolder, path: imagenet}) to prepare them"
            )
        store = ImageStore(folder)
        top = int(store.labels.max())
        if top >= num_classes:
            raise ConfigError(
                f"data.dir {str(folder)!r}: label {top} ({store.num_classes} classes) is out of range for space "
                f"{space.name!r} (fixed.num_classes = {num_classes}; allowed labels 0..{num_classes - 1})"
            )
        for split in SPLITS:
            store.split(split, data.valid_fraction, seed)
        return replace(data, dir=str(folder.resolve()))

    def batches(self, data: ImageData, space: SearchSpace, split: str, micro_batch: int, seed: int) -> Batches:
        """Augmented micro-batches of ``split`` (training augmentation for every split)."""
        img_size, in_chans, num_classes = _fixed(space)
        batches = ImageBatches(ImageStore(data.dir), split, micro_batch, seed, img_size, in_chans, num_classes,
                               data.augment, data.valid_fraction)
        return PrefetchedBatches(batches, data.num_workers, data.prefetch) if data.num_workers else batches

    def eval_set(self, data: ImageData, space: SearchSpace, split: str, num: int, seed: int) -> tuple[Tensor, Tensor]:
        """``num`` fixed images of ``split`` (all if fewer) with the evaluation transform; y int64 class indices."""
        img_size, in_chans, _ = _fixed(space)
        store = ImageStore(data.dir)
        records = eval_records(store.split(split, data.valid_fraction, seed), num, seed)
        return eval_images(store, records, img_size, in_chans, data.eval_crop, data.num_workers)

    def units_per_sample(self, space: SearchSpace) -> int:
        return 1

    def evaluate(self, output_of: Callable[[Tensor], Tensor], x: Tensor, y: Tensor, batch_size: int) -> dict[str, Any]:
        """Mean cross-entropy (``math.fsum`` of per-image losses) and top-1/top-5 accuracy (integer counts): the
        same for any batch size. ``y`` holds class indices."""
        if y.ndim != 1 or len(x) != len(y) or len(y) == 0:
            raise ValueError(f"expected n > 0 images and n class indices, got x {tuple(x.shape)}, y {tuple(y.shape)}")
        losses: list[float] = []
        top1 = top5 = 0
        for start in range(0, len(x), batch_size):
            logits = output_of(x[start : start + batch_size]).float()
            yb = y[start : start + batch_size].to(logits.device)
            losses.extend(F.cross_entropy(logits, yb, reduction="none").double().cpu().tolist())
            hits = logits.topk(min(5, logits.size(-1)), dim=-1).indices == yb[:, None]
            top1 += int(hits[:, 0].sum())
            top5 += int(hits.any(dim=-1).sum())
        n = len(y)
        return {"top1": top1 / n, "top5": top5 / n, "loss": math.fsum(losses) / n, "samples": n, "images": n}
