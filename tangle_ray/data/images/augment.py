"""Decoding and augmentation with Pillow and torch (no torchvision); every random draw from a numpy Generator.

Training: random resized crop (torchvision's algorithm; or none), horizontal flip, RandAugment (timm's
"rand-m9-mstd0.5-inc1", AutoFormer's and DeiT's: its 15 ops, magnitudes increasing), random erasing, then per batch
mixup or cutmix and label smoothing (soft targets [B, C]); tests/data/test_augment_reference.py checks each rule
against the reference's, docs/fidelity.md lists where they differ (bilinear resampling, JPEG draft decoding).
Evaluation: shorter side to ``size / crop``, centre crop (``eval_crop`` picks the crop that fits the training
transform and the images). JPEGs decode at a reduced DCT scale where the output still has enough pixels
(Pillow's ``draft``). Images become uint8 [C, H, W]; :func:`normalise` makes float32 batches (ImageNet mean/std
for RGB, their averages for one channel).
"""

from __future__ import annotations

import io
import math
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageEnhance, ImageOps

from tangle_ray.errors import ConfigError, DataError

MAX_RANDAUGMENT_OPS = 64  # ops applied to one image (each a full-image pass)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
GRAY_MEAN, GRAY_STD = (0.449,), (0.226,)  # one channel: the averages of the ImageNet values
# geometric ops fill uncovered pixels with the mean colour, as timm's RandAugment under create_transform
# (``img_mean``: the ImageNet mean x 255, rounded; one channel: the average, 0.449)
_FILL = {"RGB": tuple(min(255, round(255 * m)) for m in IMAGENET_MEAN), "L": round(255 * GRAY_MEAN[0])}


@dataclass(frozen=True)
class Augment:
    """Training augmentation; the defaults are the DeiT / AutoFormer recipe (zeros switch parts off)."""

    crop_scale: tuple[float, float] = (0.08, 1.0)  # area of the random resized crop, share of the image;
    # [1, 1]: no crop, the whole image resized
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)  # its aspect ratio
    hflip: float = 0.5  # probability of a horizontal flip
    randaugment: bool = True
    randaugment_ops: int = 2  # ops per image (each applied with probability 0.5)
    randaugment_magnitude: float = 9.0  # 0..10
    randaugment_std: float = 0.5  # Gaussian noise on the magnitude per op
    random_erase: float = 0.25  # probability of erasing a rectangle with Gaussian noise
    mixup_alpha: float = 0.8  # Beta(alpha, alpha) mixing; with cutmix too, one of them per batch
    cutmix_alpha: float = 1.0
    label_smoothing: float = 0.1

    def __post_init__(self) -> None:
        checks = {
            "crop_scale": 0 < self.crop_scale[0] <= self.crop_scale[1] <= 1,
            "crop_ratio": 0 < self.crop_ratio[0] <= self.crop_ratio[1],
            "hflip": 0 <= self.hflip <= 1,
            "randaugment_ops": 0 <= self.randaugment_ops <= MAX_RANDAUGMENT_OPS,
            "randaugment_magnitude": 0 <= self.randaugment_magnitude <= 10,
            "randaugment_std": self.randaugment_std >= 0,
            "random_erase": 0 <= self.random_erase <= 1,
            "mixup_alpha": self.mixup_alpha >= 0,
            "cutmix_alpha": self.cutmix_alpha >= 0,
            "label_smoothing": 0 <= self.label_smoothing < 1,
        }
        allowed = {
            "crop_scale": "0 < low <= high <= 1",
            "crop_ratio": "0 < low <= high",
            "randaugment_magnitude": "0..10",
            "randaugment_ops": f"0 to {MAX_RANDAUGMENT_OPS} ops per image (AutoFormer: 2)",
        }
        for name, ok in checks.items():
            if not ok:
                rule = allowed.get(name, "in [0, 1)" if name == "label_smoothing" else ">= 0 (probabilities <= 1)")
                raise ConfigError(f"run config: data.augment.{name} = {getattr(self, name)!r}; allowed: {rule}")

    @property
    def crops(self) -> bool:
        """Whether training draws random resized crops (``crop_scale`` other than [1, 1])."""
        return tuple(self.crop_scale) != (1.0, 1.0)

    @property
    def soft_targets(self) -> bool:
        """Whether batches carry soft targets [B, C] instead of class indices."""
        return self.mixup_alpha > 0 or self.cutmix_alpha > 0 or self.label_smoothing > 0


def max_pixels() -> int:
    """The most pixels an image may claim: Pillow's decompression-bomb bound (``PIL.Image.MAX_IMAGE_PIXELS``,
    about 89 million) or, where that is switched off, the same default."""
    return int(Image.MAX_IMAGE_PIXELS or 89_478_485)


def open_image(data: bytes, where: str, max_side: int | None = None) -> Image.Image:
    """The image's header, without decoding its pixels; a DataError naming ``where`` for data Pillow cannot read
    and for a header claiming more than ``max_pixels()`` pixels, or a side above ``max_side`` (a decompression
    bomb: a few bytes that decode to gigabytes)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # refused below with a line of ours
            img = Image.open(io.BytesIO(data))
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise DataError(f"image {where!r} cannot be decoded: {e}") from None
    width, height = img.size
    if width * height > max_pixels() or (max_side is not None and max(width, height) > max_side):
        bound = (f"more than {max_pixels():,} pixels (PIL.Image.MAX_IMAGE_PIXELS)" if width * height > max_pixels()
                 else f"a side above {max_side:,}, the largest side meta.json records")
        raise DataError(f"image {where!r} claims {width:,} x {height:,} pixels, {bound}: a decompression bomb or a "
                        "corrupt header")
    return img


def _resized(img: Image.Image, box: tuple[float, float, float, float], size: int, mode: str, where: str) -> Image.Image:
    """``box`` (in ``img``'s full-size coordinates) decoded in ``mode``, resized to ``size`` x ``size``."""
    width, height = img.size
    scale = min(box[2] - box[0], box[3] - box[1]) / size
    try:
        img.draft(mode, (math.ceil(width / scale), math.ceil(height / scale)))
        sx, sy = img.width / width, img.height / height
        if img.mode != mode:  # convert() of an image already in ``mode`` is a full-size copy: 8% of a crop's time
            img = img.convert(mode)
        img = img.resize(
            (size, size), Image.Resampling.BILINEAR, box=(box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy)
        )
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise DataError(f"image {where!r} cannot be decoded: {e}") from None
    return img


def crop_box(width: int, height: int, aug: Augment, rng: np.random.Generator) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) of a random resized crop, drawn as torchvision's RandomResizedCrop does."""
    area, log_ratio = width * height, (math.log(aug.crop_ratio[0]), math.log(aug.crop_ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(*aug.crop_scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w, h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            left, top = int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1))
            return left, top, left + w, top + h
    w, h = width, height  # fallback: the largest centred crop within the ratio range
    if width / height < aug.crop_ratio[0]:
        h = round(width / aug.crop_ratio[0])
    elif width / height > aug.crop_ratio[1]:
        w = round(height * aug.crop_ratio[1])
    left, top = (width - w) // 2, (height - h) // 2
    return left, top, left + w, top + h


def train_image(data: bytes, where: str, size: int, mode: str, aug: Augment, rng: np.random.Generator) -> np.ndarray:
    """Random resized crop, flip and RandAugment of one encoded image: uint8 [C, size, size]."""
    img = open_image(data, where)
    box = crop_box(*img.size, aug, rng) if aug.crops else (0, 0, *img.size)
    img = _resized(img, box, size, mode, where)
    if rng.random() < aug.hflip:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    if aug.randaugment:
        img = rand_augment(img, aug.randaugment_ops, aug.randaugment_magnitude, aug.randaugment_std, rng)
    return _chw(img)


def eval_image(data: bytes, where: str, size: int, mode: str, crop: float | None = 0.875) -> np.ndarray:
    """Shorter side resized to ``size / crop``, centre ``size`` x ``size`` crop (``crop`` None: the whole image
    resized, as training without crops sees it): uint8 [C, size, size]."""
    img = open_image(data, where)
    if crop is None:
        return _chw(_resized(img, (0, 0, *img.size), size, mode, where))
    side = min(img.size) * size / math.floor(size / crop)  # the crop's side in original pixels
    left, top = (img.width - side) / 2, (img.height - side) / 2
    return _chw(_resized(img, (left, top, left + side, top + side), size, mode, where))


def eval_crop(asked: float | None, aug: Augment, shorter_sides: list[int], size: int) -> float | None:
    """The evaluation crop of ``eval_image``: ``asked`` if given; else None (the whole image, resized) where
    training used no random crop; the largest centre square (1.0) where the images are no larger than the
    model's input (e.g. 28 x 28 digits); otherwise AutoFormer's and DeiT's 0.875 (224 of 256 at ImageNet size)."""
    if asked is not None:
        return asked
    if not aug.crops:
        return None
    if not shorter_sides or sorted(shorter_sides)[len(shorter_sides) // 2] <= size:
        return 1.0
    return 0.875


def _chw(img: Image.Image) -> np.ndarray:
    a = np.array(img, dtype=np.uint8)
    return a[None] if a.ndim == 2 else a.transpose(2, 0, 1)


def normalise(batch: torch.Tensor) -> torch.Tensor:
    """uint8 [B, C, H, W] -> float32 normalised with the ImageNet mean/std (one channel: their averages)."""
    mean, std = (IMAGENET_MEAN, IMAGENET_STD) if batch.shape[1] == 3 else (GRAY_MEAN, GRAY_STD)
    mean_t, std_t = torch.tensor(mean)[:, None, None], torch.tensor(std)[:, None, None]
    scale, shift = 1 / (255 * std_t), -mean_t / std_t  # one multiply-add: 5x faster on CPU than (x/255 - m)/s
    out = torch.empty(batch.shape, dtype=torch.float32)
    for image, normalised in zip(batch, out):  # an image at a time, while it is in the cache
        torch.mul(image, scale, out=normalised).add_(shift)
    return out


# --------------------------------------------------------------------------------------------- RandAugment
def _affine(img: Image.Image, matrix: tuple[float, ...]) -> Image.Image:
    return img.transform(img.size, Image.Transform.AFFINE, matrix, Image.Resampling.BILINEAR, fillcolor=_fill(img))


def _fill(img: Image.Image) -> int | tuple[int, ...]:
    return _FILL[img.mode]


def _posterize(img: Image.Image, bits: int) -> Image.Image:
    """Keep the ``bits`` high bits; 0 bits: black (Pillow's posterize gave that until it started to refuse 0)."""
    return ImageOps.posterize(img, bits) if bits > 0 else Image.new(img.mode, img.size)


def _solarize_add(img: Image.Image, add: int, threshold: int = 128) -> Image.Image:
    """Add ``add`` to every value below ``threshold``, capped at 255 (timm's solarize_add)."""
    lut = [min(255, i + add) if i < threshold else i for i in range(256)]
    return img.point(lut * len(img.getbands()))


_OPS = {  # timm's _RAND_INCREASING_TRANSFORMS in its order; v in [-1, 1]: signed magnitude (unsigned ops use |v|)
    "AutoContrast": lambda img, v: ImageOps.autocontrast(img),
    "Equalize": lambda img, v: ImageOps.equalize(img),
    "Invert": lambda img, v: ImageOps.invert(img),
    "Rotate": lambda img, v: img.rotate(30 * v, resample=Image.Resampling.BILINEAR, fillcolor=_fill(img)),
    "Posterize": lambda img, v: _posterize(img, 4 - int(4 * abs(v))),
    "Solarize": lambda img, v: ImageOps.solarize(img, 256 - int(256 * abs(v))),
    "SolarizeAdd": lambda img, v: _solarize_add(img, int(110 * abs(v))),
    "Color": lambda img, v: ImageEnhance.Color(img).enhance(max(0.1, 1 + 0.9 * v)),
    "Contrast": lambda img, v: ImageEnhance.Contrast(img).enhance(max(0.1, 1 + 0.9 * v)),
    "Brightness": lambda img, v: ImageEnhance.Brightness(img).enhance(max(0.1, 1 + 0.9 * v)),
    "Sharpness": lambda img, v: ImageEnhance.Sharpness(img).enhance(max(0.1, 1 + 0.9 * v)),
    "ShearX": lambda img, v: _affine(img, (1, 0.3 * v, 0, 0, 1, 0)),
    "ShearY": lambda img, v: _affine(img, (1, 0, 0, 0.3 * v, 1, 0)),
    "TranslateX": lambda img, v: _affine(img, (1, 0, 0.45 * v * img.width, 0, 1, 0)),
    "TranslateY": lambda img, v: _affine(img, (1, 0, 0, 0, 1, 0.45 * v * img.height)),
}
_OP_NAMES = tuple(_OPS)


def rand_augment(img: Image.Image, ops: int, magnitude: float, std: float, rng: np.random.Generator) -> Image.Image:
    """``ops`` ops drawn uniformly with replacement, each applied with probability 0.5 at a magnitude drawn
    from N(magnitude, std) clipped to [0, 10], with a random sign."""
    for name in rng.choice(_OP_NAMES, size=ops):
        if rng.random() < 0.5:
            m = float(np.clip(magnitude + std * rng.standard_normal(), 0, 10)) / 10
            img = _OPS[name](img, m if rng.random() < 0.5 else -m)
    return img


# ----------------------------------------------------------------------------------------- batch-level parts
def random_erase(x: torch.Tensor, rng: np.random.Generator) -> None:
    """Fill one rectangle (2-33% of the area, aspect 0.3-3.3) of a normalised image [C, H, W] with noise."""
    channels, height, width = x.shape
    for _ in range(10):
        target = height * width * rng.uniform(0.02, 1 / 3)
        aspect = math.exp(rng.uniform(math.log(0.3), math.log(1 / 0.3)))
        h, w = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if h < height and w < width:  # timm's test: a rectangle of zero height or width erases nothing
            top, left = int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1))
            x[:, top : top + h, left : left + w] = torch.from_numpy(rng.standard_normal((channels, h, w), np.float32))
            return


def smooth_targets(y: torch.Tensor, num_classes: int, smoothing: float) -> torch.Tensor:
    """Class indices -> float32 targets [B, C]: smoothing / C everywhere, plus 1 - smoothing on the class."""
    off = smoothing / num_classes
    target = torch.full((len(y), num_classes), off, dtype=torch.float32)
    return target.scatter_(1, y[:, None], 1 - smoothing + off)


def mix(
    x: torch.Tensor, y: torch.Tensor, num_classes: int, aug: Augment, rng: np.random.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mixup or cutmix (one per batch; cutmix with probability 0.5 when both are on) of the batch with its
    reverse, and label smoothing: (x, soft targets [B, C] that sum to 1). ``x`` is mixed in place."""
    target = smooth_targets(y, num_classes, aug.label_smoothing)
    alphas = [(a, cut) for a, cut in ((aug.mixup_alpha, False), (aug.cutmix_alpha, True)) if a > 0]
    if not alphas:
        return x, target
    alpha, cut = alphas[int(rng.integers(len(alphas)))]
    lam = float(rng.beta(alpha, alpha))
    if cut:
        height, width = x.shape[-2:]
        ratio = math.sqrt(1 - lam)
        cy, cx = int(rng.integers(height)), int(rng.integers(width))
        y0, y1 = np.clip([cy - int(height * ratio) // 2, cy + int(height * ratio) // 2], 0, height)
        x0, x1 = np.clip([cx - int(width * ratio) // 2, cx + int(width * ratio) // 2], 0, width)
        x[:, :, y0:y1, x0:x1] = x[:, :, y0:y1, x0:x1].flip(0)  # the box of the reversed batch
        lam = 1 - float((y1 - y0) * (x1 - x0)) / (height * width)
    else:  # in place, a pair of images (i, B-1-i) at a time: no batch-size temporaries (their pages cost more
        # than the arithmetic); every value is x * lam + reversed x * (1 - lam), as before
        rest = 1 - lam
        for i in range((len(x) + 1) // 2):
            j = len(x) - 1 - i
            mixed = x[i] * lam + x[j] * rest
            if j != i:
                x[j].mul_(lam).add_(x[i] * rest)
            x[i] = mixed
    return x, target * lam + target.flip(0) * (1 - lam)
