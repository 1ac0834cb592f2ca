"""Image classification: augmented keyed batches of a prepared image folder, scored by top-1/top-5 accuracy.

The space's fixed settings ``img_size``, ``in_chans`` (1: grayscale, 3: RGB) and ``num_classes`` say what the
model takes; images are decoded and resized to fit, and every label must be below ``num_classes``.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from tangle_ray.cluster import check_resources
from tangle_ray.configs import VOLATILE
from tangle_ray.data.images.augment import Augment
from tangle_ray.data.images.batches import EvalImages, ImageBatches, PrefetchedBatches, eval_records
from tangle_ray.data.images.prepare import META, ImageStore, check_image_folder, prepare_images
from tangle_ray.data.images.ray_decode import RayDataBatches
from tangle_ray.data.images.sources import ImageSource
from tangle_ray.errors import ConfigError, TangleRayError
from tangle_ray.space import SearchSpace
from tangle_ray.tasks import register_task
from tangle_ray.tasks.base import Batches, Metric, Tally, Task, materialize

FIXED = ("img_size", "in_chans", "num_classes")
MAX_LOADERS = 256  # decoding processes of one trainer on any machine
MAX_PREFETCH = 64  # micro-batches decoded ahead: each holds micro_batch decoded images
MAX_CALIBRATION = 100_000  # images a recalibration may hold in memory
CALIBRATION_SEED = 0  # the key of the calibration images' draw from the weight split: the same in every scorer
SAMPLINGS = ("replacement", "epochs")


@dataclass(frozen=True)
class ImageData:
    """The ``data:`` section of an image-classification run: a prepared folder, or a source to prepare."""

    dir: str = "data/imagenet"  # a prepared folder (images.bin, offsets.npy, labels.npy, split .npy files, meta.json)
    source: dict[str, Any] | None = None  # an ImageSource (kind, path, ...): prepared into ``dir``, cached
    valid_fraction: float = 0.2  # the architecture split's class-balanced share of the training images
    short_side: int = 0  # preparation: re-encode images with a larger shorter side to this one (0: originals)
    num_workers: int = field(default=0, metadata=VOLATILE)  # decoding processes per trainer (0: in the trainer)
    prefetch: int = field(default=2, metadata=VOLATILE)  # micro-batches decoded ahead per worker
    # training and architecture batches decoded by up to this many Ray Data actors per trainer and split,
    # anywhere in the cluster, instead of by the trainer's node (0: off; num_workers then serves evaluation only)
    decoders: int = field(default=0, metadata=VOLATILE)
    # the Ray resources of each decoding actor: {CPU: 1, decode: 1} keeps them on nodes declaring ``decode``
    decoder_resources: dict[str, float] = field(default_factory=lambda: {"CPU": 1.0}, metadata=VOLATILE)
    # evaluation: shorter side to img_size / eval_crop, then the centre crop; none (default): 1.0 where training
    # used no random crop or the images are no larger than img_size, else 0.875 (AutoFormer's 224 of 256)
    eval_crop: float | None = None
    # "replacement": every micro-batch draws its images uniformly at random (like text windows); "epochs": each
    # image once per epoch, in a fresh permutation per epoch (AutoFormer's and the paper's way)
    sampling: str = "replacement"
    augment: Augment = field(default_factory=Augment)
    # batch-norm recalibration of an extracted subnet before it is scored (families that ``calibrate``:
    # MobileNetV3): this many fixed images of the weight split (OFA: 2000 in batches of 200; 256 here so that CPU
    # tests and Tune trials stay cheap), drawn once by a fixed key, evaluation transform, in batches of
    # ``calibration_batch_size`` (each batch's statistics are averaged, so the batch size changes the result)
    calibration_images: int = field(default=256, metadata=VOLATILE)  # scoring only: the weights train alike
    calibration_batch_size: int = field(default=64, metadata=VOLATILE)

    def __post_init__(self) -> None:
        checks = {
            "calibration_images": (1 <= self.calibration_images <= MAX_CALIBRATION, f"1 to {MAX_CALIBRATION:,}"),
            "calibration_batch_size": (2 <= self.calibration_batch_size <= MAX_CALIBRATION,
                                       f"2 (batch statistics) to {MAX_CALIBRATION:,}"),
            "valid_fraction": (0 < self.valid_fraction < 1, "in (0, 1)"),
            "short_side": (self.short_side >= 0, ">= 0"),
            "num_workers": (0 <= self.num_workers <= MAX_LOADERS, f"0 to {MAX_LOADERS} (and at most the cores "
                            "of a worker's node)"),
            "prefetch": (1 <= self.prefetch <= MAX_PREFETCH, f"1 to {MAX_PREFETCH} micro-batches"),
            "decoders": (0 <= self.decoders <= MAX_LOADERS, f"0 to {MAX_LOADERS} Ray Data actors per trainer"),
            "decoder_resources": (isinstance(self.decoder_resources, dict) and all(
                isinstance(k, str) and k and isinstance(v, (int, float)) and not isinstance(v, bool)
                and math.isfinite(v) and v >= 0 for k, v in self.decoder_resources.items()),
                "a mapping of Ray resource names to amounts >= 0, e.g. {CPU: 1, decode: 1}"),
            "eval_crop": (self.eval_crop is None or 0 < self.eval_crop <= 1, "in (0, 1], or null (follow training)"),
            "sampling": (self.sampling in SAMPLINGS, str(list(SAMPLINGS))),
        }
        for name, (ok, allowed) in checks.items():
            if not ok:
                raise ConfigError(f"run config: data.{name} = {getattr(self, name)!r}; allowed: {allowed}")


def _fixed(fixed: dict[str, Any]) -> tuple[int, int, int]:
    """(img_size, in_chans, num_classes) of a space's or a model's fixed settings."""
    missing = [k for k in FIXED if k not in fixed]
    if missing:
        raise ConfigError(f"the classify task needs fixed settings {list(FIXED)}; missing: {missing}")
    img_size, in_chans, num_classes = (fixed[k] for k in FIXED)
    if in_chans not in (1, 3):
        raise ConfigError(f"fixed.in_chans = {in_chans!r}: images have 1 or 3 channels; allowed: [1, 3]")
    if img_size < 1 or num_classes < 1:
        raise ConfigError(f"fixed.img_size = {img_size} and fixed.num_classes = {num_classes} must be >= 1")
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
        """Prepare ``data.source`` into ``data.dir`` (kept while its files are unchanged; the train/valid split
        is drawn by ``seed`` when the folder is first made), refuse a folder split with another
        ``valid_fraction``, and check that the labels fit the space's ``num_classes``."""
        folder = Path(data.dir)
        try:
            _, _, num_classes = _fixed(space.fixed)
        except TangleRayError as e:
            raise ConfigError(f"space {space.name!r}: {e}") from None
        try:
            meta = ImageStore(folder).meta
        except TangleRayError:
            if data.source is not None:
                meta = None
            elif not (folder / META).is_file():
                raise ConfigError(
                    f"data.dir = {str(folder)!r} holds no prepared images (meta.json); give data.source "
                    "(e.g. {kind: imagefolder, path: imagenet}) to prepare them"
                ) from None
            else:
                raise
        if meta is not None and abs(meta["valid_fraction"] - data.valid_fraction) > 1e-9:
            raise ConfigError(
                f"data.dir {str(folder)!r} was split with valid_fraction {meta['valid_fraction']}, the run asks for "
                f"data.valid_fraction = {data.valid_fraction}: use another data.dir or set "
                f"data.valid_fraction: {meta['valid_fraction']}"
            )
        if data.source is not None:
            try:
                source = ImageSource(**data.source)
            except TypeError as e:
                raise ConfigError(
                    f"data.source = {data.source!r}: {e}; allowed keys: kind, path, train_split, "
                    "test_split, image_field, label_field, files"
                ) from None
            split_seed = seed if meta is None else meta["seed"]
            prepare_images(source, folder, data.valid_fraction, split_seed, short_side=data.short_side)
        store = check_image_folder(folder)  # arrays, ranges, a sample decoded; then the space's classes:
        top = int(store.labels.max())
        if top >= num_classes:
            raise ConfigError(
                f"data.dir {str(folder)!r}: label {top} ({store.num_classes} classes) is out of range for "
                f"space {space.name!r} (fixed.num_classes = {num_classes}; "
                f"allowed labels 0..{num_classes - 1})"
            )
        check_image_folder(folder, num_classes)
        return replace(data, dir=str(folder.resolve()))

    def batches(self, data: ImageData, fixed: dict[str, Any], split: str, micro_batch: int, seed: int,
                micro_per_step: int = 1) -> Batches:
        """Augmented micro-batches of ``split`` (the training augmentation for every split)."""
        img_size, in_chans, num_classes = _fixed(fixed)
        cores = os.cpu_count() or 1
        if data.num_workers > cores and not data.decoders:  # on the node that decodes: what it can serve
            raise ConfigError(f"data.num_workers = {data.num_workers} decoding processes per trainer; this node has "
                              f"{cores} cores: set at most {cores}")
        store = check_image_folder(data.dir, num_classes)  # in each worker too: decoded once per process
        batches = ImageBatches(
            store, split, micro_batch, seed, img_size, in_chans, num_classes, data.augment,
            epochs_of=micro_per_step if data.sampling == "epochs" else None,
        )
        if data.decoders:
            return RayDataBatches(batches, data.decoders, data.decoder_resources, data.prefetch)
        return PrefetchedBatches(batches, data.num_workers, data.prefetch) if data.num_workers else batches

    def check_helpers(self, data: ImageData) -> None:
        """With ``data.decoders``: one decoding actor of ``data.decoder_resources`` must fit on some node."""
        if data.decoders:
            check_resources(1, data.decoder_resources, "data.decoder_resources (one Ray Data decoding actor)")

    def eval_set(self, data: ImageData, fixed: dict[str, Any], split: str, num: int, seed: int) -> EvalImages:
        """``num`` fixed images of ``split`` (all if fewer), evaluation transform; y: int64 class indices."""
        img_size, in_chans, num_classes = _fixed(fixed)
        store = check_image_folder(Path(data.dir).resolve(), num_classes)  # read in any working directory
        records = eval_records(store.split(split), num, seed)
        return EvalImages(store, records, img_size, in_chans, data.eval_crop, data.augment, data.num_workers)

    def calibration_set(self, data: ImageData, fixed: dict[str, Any]) -> list[Tensor]:
        """``data.calibration_images`` fixed images of the weight split (``train``; all if fewer), drawn by
        ``CALIBRATION_SEED`` whatever the run's or search's seed, evaluation transform, in batches of
        ``data.calibration_batch_size`` (a last batch of one image is left out: it has no batch variance)."""
        x, _ = materialize(self.eval_set(data, fixed, "train", data.calibration_images, CALIBRATION_SEED))
        b = data.calibration_batch_size
        return [x[i:i + b] for i in range(0, len(x), b) if len(x[i:i + b]) > 1]

    def random_batch(self, fixed: dict[str, Any], n: int, gen: torch.Generator) -> tuple[Tensor, Tensor]:
        """Normal noise images [n, in_chans, img_size, img_size] and class indices [n]."""
        size, chans, classes = (fixed[k] for k in FIXED)
        return torch.randn(n, chans, size, size, generator=gen), torch.randint(0, classes, (n,), generator=gen)

    def units_per_sample(self, fixed: dict[str, Any]) -> int:
        return 1

    def tally(self, output: Tensor, y: Tensor) -> Tally:
        """Each image's cross-entropy (in float32, kept as float64) and integer counts of top-1 and top-5 hits.
        ``y`` holds class indices."""
        if y.ndim != 1 or len(output) != len(y) or len(y) == 0:
            raise ValueError(f"expected n > 0 outputs and n class indices, got {tuple(output.shape)}, {tuple(y.shape)}")
        logits = output.float()
        y = y.to(logits.device)
        losses = F.cross_entropy(logits, y, reduction="none").double().cpu().numpy()
        hits = logits.topk(min(5, logits.size(-1)), dim=-1).indices == y[:, None]
        return Tally([losses], [losses], {"top1": int(hits[:, 0].sum()), "top5": int(hits.any(dim=-1).sum())})

    def summarize(self, tally: Tally) -> dict[str, Any]:
        """Mean cross-entropy (``math.fsum`` of per-image losses) and top-1/top-5 accuracy (integer counts)."""
        n = tally.samples
        return {"top1": tally.counts["top1"] / n, "top5": tally.counts["top5"] / n, "loss": tally.mean_loss(),
                "samples": n, "images": n, "sample_losses": tally.per_sample()}
