"""ImageNet-style classification data: loading through ``datasets``, Pillow transforms, a torch Dataset.

Transforms follow the usual ImageNet recipe (torchvision is not needed): training uses a random resized crop
(scale 0.08-1, ratio 3/4-4/3) and a horizontal flip, evaluation resizes the shorter side to size/0.875 and
crops the centre; both normalise with the ImageNet mean and std into float tensors [3, H, W].
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import datasets
import numpy as np
import torch
from datasets import DatasetDict
from PIL import Image, UnidentifiedImageError

from tangle_ray.data.sources import load_hub, split_files
from tangle_ray.errors import ConfigError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGE_KINDS = ("imagefolder", "parquet", "hub")


@dataclass
class ImageSource:
    """``imagefolder``: ``path`` holds ``train/<class>/*.png`` and ``validation/<class>/*``; ``parquet``: ``path``
    holds ``train.parquet`` and ``validation.parquet`` (or ``files`` maps split -> file); ``hub``: a dataset id."""

    kind: str = "imagefolder"
    path: str = ""
    image_field: str = "image"
    label_field: str = "label"
    train_split: str = "train"
    test_split: str = "validation"
    files: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.kind not in IMAGE_KINDS:
            raise ConfigError(f"image source kind {self.kind!r} is unknown; allowed: {list(IMAGE_KINDS)}")

    @property
    def splits(self) -> dict[str, str]:
        return {"train": self.train_split, "test": self.test_split}


def load_image_source(src: ImageSource) -> DatasetDict:
    """Splits ``train`` and ``test`` with columns ``image`` (undecoded: bytes or path) and ``label`` (int)."""
    if src.kind == "imagefolder":
        if not Path(src.path).is_dir():
            raise ConfigError(f"image folder {src.path!r} is not a directory")
        raw = datasets.load_dataset("imagefolder", data_dir=src.path)
    elif src.kind == "parquet":
        files = split_files(src)
        raw = datasets.load_dataset(
            "parquet", data_files={src.splits[s]: [str(p) for p in ps] for s, ps in files.items()}
        )
    else:
        raw = load_hub(src.path, "ImageSource(kind='imagefolder' or 'parquet', path=local folder)")
    out = {}
    for split, name in src.splits.items():
        if name not in raw:
            raise ConfigError(f"image source {src.path!r} has no split {name!r}; available: {sorted(raw)}")
        ds = raw[name]
        for col in (src.image_field, src.label_field):
            if col not in ds.column_names:
                raise ConfigError(
                    f"image source {src.path!r} split {name!r} has no column {col!r}; "
                    f"columns: {ds.column_names}"
                )
        ds = ds.select_columns([src.image_field, src.label_field])
        ds = ds.rename_columns({src.image_field: "image", src.label_field: "label"})
        out[split] = ds.cast_column("image", datasets.Image(decode=False))
    return DatasetDict(out)


def decode_image(value: dict) -> Image.Image:
    """An undecoded ``datasets`` image (``{"bytes", "path"}``) as an RGB Pillow image."""
    try:
        img = Image.open(io.BytesIO(value["bytes"]) if value.get("bytes") else value["path"])
        return img.convert("RGB")
    except (UnidentifiedImageError, OSError) as e:
        raise ConfigError(f"image {value.get('path') or '<bytes>'!r} cannot be decoded: {e}") from e


def to_tensor(img: Image.Image) -> torch.Tensor:
    """RGB image -> float tensor [3, H, W] normalised with the ImageNet mean and std."""
    x = torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1).float().div_(255)
    return x.sub_(torch.tensor(IMAGENET_MEAN)[:, None, None]).div_(torch.tensor(IMAGENET_STD)[:, None, None])


def _uniform(lo: float, hi: float, g: torch.Generator | None) -> float:
    return lo + (hi - lo) * torch.rand(1, generator=g).item()


@dataclass
class TrainTransform:
    """Random resized crop to ``size`` x ``size``, horizontal flip, normalisation; seeded by ``generator``."""

    size: int = 224
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)

    def crop_box(
        self, width: int, height: int, g: torch.Generator | None = None
    ) -> tuple[int, int, int, int]:
        """(left, top, right, bottom) of the crop, as torchvision's RandomResizedCrop draws it."""
        area, log_ratio = width * height, (math.log(self.ratio[0]), math.log(self.ratio[1]))
        for _ in range(10):
            target = area * _uniform(*self.scale, g)
            aspect = math.exp(_uniform(*log_ratio, g))
            w, h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
            if 0 < w <= width and 0 < h <= height:
                left = int(torch.randint(0, width - w + 1, (1,), generator=g))
                top = int(torch.randint(0, height - h + 1, (1,), generator=g))
                return left, top, left + w, top + h
        aspect = width / height  # fallback: the largest centred crop within the ratio range
        w, h = width, height
        if aspect < self.ratio[0]:
            h = round(width / self.ratio[0])
        elif aspect > self.ratio[1]:
            w = round(height * self.ratio[1])
        left, top = (width - w) // 2, (height - h) // 2
        return left, top, left + w, top + h

    def __call__(self, img: Image.Image, generator: torch.Generator | None = None) -> torch.Tensor:
        box = self.crop_box(img.width, img.height, generator)
        img = img.resize((self.size, self.size), Image.BILINEAR, box=box)
        if torch.rand(1, generator=generator).item() < 0.5:
            img = img.transpose(Image.FLIP_LEFT_RIGHT)
        return to_tensor(img)


@dataclass
class EvalTransform:
    """Resize the shorter side to ``size / crop_fraction``, crop the centre ``size`` x ``size``, normalise."""

    size: int = 224
    crop_fraction: float = 0.875

    def __call__(self, img: Image.Image, generator: torch.Generator | None = None) -> torch.Tensor:
        short = int(self.size / self.crop_fraction)
        scale = short / min(img.width, img.height)
        w, h = max(self.size, round(img.width * scale)), max(self.size, round(img.height * scale))
        img = img.resize((w, h), Image.BILINEAR)
        left, top = (w - self.size) // 2, (h - self.size) // 2
        return to_tensor(img.crop((left, top, left + self.size, top + self.size)))


def split_balanced(labels: Sequence[int], valid_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Class-balanced (train, valid) index arrays: ``round(valid_fraction * n_c)`` of each class's n_c examples
    go to valid (at least one stays in train), drawn deterministically from ``seed``."""
    if not 0.0 < valid_fraction < 1.0:
        raise ConfigError(f"valid_fraction={valid_fraction!r} must lie strictly between 0 and 1")
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    train, valid = [], []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        k = min(round(len(idx) * valid_fraction), len(idx) - 1)
        valid.append(idx[:k])
        train.append(idx[k:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(valid))


class ImageDataset(torch.utils.data.Dataset):
    """(image tensor, label) pairs from a :func:`load_image_source` split, optionally restricted to ``indices``.

    With a ``seed``, example i's augmentation depends only on (seed, epoch, i): reproducible in any worker.
    """

    def __init__(
        self,
        data: datasets.Dataset,
        transform: TrainTransform | EvalTransform,
        indices: Sequence[int] | None = None,
        seed: int | None = None,
    ):
        self.data, self.transform, self.seed, self.epoch = data, transform, seed, 0
        self.indices = np.arange(len(data)) if indices is None else np.asarray(indices)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        index = int(self.indices[i])
        row = self.data[index]
        generator = None
        if self.seed is not None:
            state = np.random.SeedSequence([self.seed, self.epoch, index]).generate_state(1, np.uint64)[0]
            generator = torch.Generator().manual_seed(int(state))
        return self.transform(decode_image(row["image"]), generator), int(row["label"])
