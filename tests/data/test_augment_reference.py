"""tangle_ray's augmentation against the reference definitions it follows (timm is not installed: it needs
torchvision). The reference rules are written here as small functions of their own, read from

- torchvision ``RandomResizedCrop.get_params`` (timm's ``RandomResizedCropAndInterpolation.get_params`` is the
  same but for accepting a zero-width crop, which cannot occur at these scales);
- timm ``data/auto_augment.py``: ``rand_augment_transform("rand-m9-mstd0.5-inc1", hparams)`` as AutoFormer and
  DeiT configure it (``_RAND_INCREASING_TRANSFORMS``, ``AugmentOp.__call__``, the ``_LEVEL_DENOM`` = 10 level
  functions, ``img_mean`` fill from ``create_transform``);
- timm ``data/random_erasing.py`` (``RandomErasing._erase``, one rectangle, mode "pixel");
- timm ``data/mixup.py`` (``Mixup`` in "batch" mode: ``_params_per_batch``, ``rand_bbox``, ``cutmix_bbox_and_lam``
  with ``correct_lam``, ``mixup_target``);
- microsoft/Cream ``AutoFormer/supernet_train.py``'s argument defaults (the recipe).

Each rule is checked by giving ours and the reference the same draws (a scripted stand-in for numpy's
Generator), and where ours owns the draws, by their distribution. Documented departures (docs/fidelity.md):
bilinear instead of bicubic resampling, reduced-DCT JPEG decoding.
"""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image, ImageEnhance, ImageOps

from tangle_ray.data.images import augment
from tangle_ray.data.images.augment import Augment, crop_box, mix, rand_augment, random_erase


class Scripted:
    """A stand-in for ``np.random.Generator`` that answers from scripted draws and records what it was asked.

    ``uniform(a, b)`` and ``random()`` use unit draws ``u`` (``a + (b - a) u``, the formula of numpy's, Python's
    and torch's uniform); ``integers`` answers ``rule(low, high)`` (``high`` exclusive) whatever the order of the
    calls; ``standard_normal`` gives ``normal`` (one value, or an array filled with it)."""

    def __init__(self, units=(), rule=lambda low, high: low, normals=(), betas=(), choices=()):
        self.units, self.rule = list(units), rule
        self.normals, self.betas, self.choices = list(normals), list(betas), list(choices)
        self.asked: list[tuple] = []

    def uniform(self, low, high):
        self.asked.append(("uniform", low, high))
        return low + (high - low) * self.units.pop(0)

    def random(self):
        self.asked.append(("random",))
        return self.units.pop(0)

    def integers(self, low, high=None):
        low, high = (0, low) if high is None else (low, high)
        self.asked.append(("integers", low, high))
        return self.rule(low, high)

    def standard_normal(self, size=None, dtype=np.float64):
        self.asked.append(("standard_normal", size))
        return self.normals.pop(0) if size is None else np.full(size, 7.0, dtype)

    def beta(self, a, b):
        self.asked.append(("beta", a, b))
        return self.betas.pop(0)

    def choice(self, names, size):
        self.asked.append(("choice", tuple(names), size))
        return np.array([self.choices.pop(0) for _ in range(size)])


def at_fraction(f: float):
    """An ``integers`` rule: the value at fraction ``f`` of [low, high)."""
    return lambda low, high: low + min(high - low - 1, int(f * (high - low)))


# ------------------------------------------------------------------------------------------ random resized crop
def reference_crop(width, height, scale, ratio, uniform, randint):
    """torchvision's RandomResizedCrop.get_params: (top, left, h, w), and whether the fallback was taken.
    ``uniform(a, b)``; ``randint(a, b)`` inclusive."""
    area = height * width
    for _ in range(10):
        target_area = area * uniform(scale[0], scale[1])
        aspect = math.exp(uniform(math.log(ratio[0]), math.log(ratio[1])))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return (randint(0, height - h), randint(0, width - w), h, w), False
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        w, h = int(round(height * max(ratio))), height
    else:
        w, h = width, height
    return ((height - h) // 2, (width - w) // 2, h, w), True


@pytest.mark.parametrize("scale, ratio", [((0.08, 1.0), (3 / 4, 4 / 3)), ((0.5, 1.0), (0.5, 2.0)),
                                          ((1.0, 1.0), (1.0, 1.0))])
def test_crop_parameters_follow_torchvision(scale, ratio):
    draws = np.random.default_rng(0)
    sizes = [(500, 375), (375, 500), (333, 500), (224, 224), (500, 20), (20, 500), (3, 3), (1000, 40), (17, 31)]
    fallbacks = 0
    for width, height in sizes:
        for _ in range(60):
            units, f = list(draws.random(20)), float(draws.random())
            ours = Scripted(units, at_fraction(f))
            left, top, right, bottom = crop_box(width, height, Augment(crop_scale=scale, crop_ratio=ratio), ours)
            script = iter(units)
            asked = []

            def uniform(a, b):
                asked.append(("uniform", a, b))
                return a + (b - a) * next(script)

            (ref_top, ref_left, h, w), fell_back = reference_crop(
                width, height, scale, ratio, uniform, lambda a, b: at_fraction(f)(a, b + 1))
            assert (left, top, right, bottom) == (ref_left, ref_top, ref_left + w, ref_top + h), (width, height)
            # the same uniform draws in the same order: scale linear in area, log-uniform aspect ratio
            assert [a for a in ours.asked if a[0] == "uniform"] == asked
            if fell_back:
                assert len(asked) == 20  # 10 attempts before the centred fallback
            fallbacks += fell_back
    if scale != (1.0, 1.0):
        assert fallbacks > 10  # the centred fallback crop was exercised (thin images)


# ------------------------------------------------------------------------------------------------- RandAugment
# timm's _RAND_INCREASING_TRANSFORMS (what "-inc1" selects), in its order, and ours by the same position
REFERENCE_OPS = ("AutoContrast", "Equalize", "Invert", "Rotate", "PosterizeIncreasing", "SolarizeIncreasing",
                 "SolarizeAdd", "ColorIncreasing", "ContrastIncreasing", "BrightnessIncreasing",
                 "SharpnessIncreasing", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel")
OURS_TO_REFERENCE = {"Posterize": "PosterizeIncreasing", "Solarize": "SolarizeIncreasing", "Color": "ColorIncreasing",
                     "Contrast": "ContrastIncreasing", "Brightness": "BrightnessIncreasing",
                     "Sharpness": "SharpnessIncreasing", "TranslateX": "TranslateXRel", "TranslateY": "TranslateYRel"}
SIGNED = {"Rotate", "ColorIncreasing", "ContrastIncreasing", "BrightnessIncreasing", "SharpnessIncreasing",
          "ShearX", "ShearY", "TranslateXRel", "TranslateYRel"}  # the level functions that negate at random
LEVEL_DENOM = 10.0


def reference_argument(name: str, level: float, negate: bool):
    """timm's level -> op argument for the increasing set (``None``: the op takes none)."""
    f = level / LEVEL_DENOM
    sign = -1 if negate and name in SIGNED else 1
    if name == "Rotate":
        return sign * (f * 30.0)
    if name == "PosterizeIncreasing":
        return 4 - int(f * 4)
    if name == "SolarizeIncreasing":
        return 256 - int(f * 256)
    if name == "SolarizeAdd":
        return int(f * 110)
    if name.endswith("Increasing"):  # Color, Contrast, Brightness, Sharpness: 1 +- 0.9 f, at least 0.1
        return max(0.1, 1.0 + sign * (f * 0.9))
    if name in ("ShearX", "ShearY"):
        return sign * (f * 0.3)
    if name in ("TranslateXRel", "TranslateYRel"):
        return sign * (f * 0.45)
    return None


def reference_fill(mode: str):
    """create_transform's ``img_mean``: the normalisation mean x 255, rounded (one channel: its one mean)."""
    mean = (0.485, 0.456, 0.406) if mode == "RGB" else (0.449,)
    fill = tuple(min(255, round(255 * m)) for m in mean)
    return fill if mode == "RGB" else fill[0]


def reference_op(img: Image.Image, name: str, arg) -> Image.Image:
    """timm's op functions, with Pillow as they call it; resampling bilinear (a documented departure: AutoFormer
    passes bicubic), fill ``reference_fill``."""
    resample, fill = Image.Resampling.BILINEAR, reference_fill(img.mode)

    def affine(matrix):
        return img.transform(img.size, Image.Transform.AFFINE, matrix, resample, fillcolor=fill)

    def lut(f):
        return img.point([f(i) for i in range(256)] * len(img.getbands()))

    if name == "AutoContrast":
        return ImageOps.autocontrast(img)
    if name == "Equalize":
        return ImageOps.equalize(img)
    if name == "Invert":
        return ImageOps.invert(img)
    if name == "Rotate":
        return img.rotate(arg, resample=resample, fillcolor=fill)
    if name == "PosterizeIncreasing":  # Pillow's former posterize: keep the high ``arg`` bits (0 bits: black)
        return img if arg >= 8 else lut(lambda i: i & ~(2 ** (8 - arg) - 1))
    if name == "SolarizeIncreasing":
        return lut(lambda i: i if i < arg else 255 - i)
    if name == "SolarizeAdd":
        return lut(lambda i: min(255, i + arg) if i < 128 else i)
    if name.endswith("Increasing"):
        enhancer = {"Color": ImageEnhance.Color, "Contrast": ImageEnhance.Contrast,
                    "Brightness": ImageEnhance.Brightness, "Sharpness": ImageEnhance.Sharpness}[name[:-10]]
        return enhancer(img).enhance(arg)
    if name == "ShearX":
        return affine((1, arg, 0, 0, 1, 0))
    if name == "ShearY":
        return affine((1, 0, 0, arg, 1, 0))
    if name == "TranslateXRel":
        return affine((1, 0, arg * img.size[0], 0, 1, 0))
    if name == "TranslateYRel":
        return affine((1, 0, 0, 0, 1, arg * img.size[1]))
    raise KeyError(name)


def test_op_list_is_timms_increasing_set_in_its_order():
    assert tuple(OURS_TO_REFERENCE.get(n, n) for n in augment._OP_NAMES) == REFERENCE_OPS


@pytest.mark.parametrize("mode", ["RGB", "L"])
def test_each_op_at_each_magnitude_gives_the_reference_pixels(mode):
    rng = np.random.default_rng(0)
    coarse = Image.fromarray(rng.integers(0, 256, (5, 7, 3), dtype=np.uint8)).resize((40, 30))
    noisy = np.asarray(coarse, np.int16) + rng.integers(-30, 30, (30, 40, 3))
    img = Image.fromarray(noisy.clip(0, 255).astype(np.uint8)).convert(mode)
    for ours_name in augment._OP_NAMES:
        name = OURS_TO_REFERENCE.get(ours_name, ours_name)
        for level in (0.0, 0.4, 2.5, 5.0, 7.3, 9.0, 9.5, 10.0):
            for negate in (False, True):
                v = -level / 10 if negate else level / 10
                got = augment._OPS[ours_name](img, v)
                want = reference_op(img, name, reference_argument(name, level, negate))
                assert got.mode == want.mode and got.size == want.size
                assert np.array_equal(np.asarray(got), np.asarray(want)), (mode, name, level, negate)


def reference_rand_augment(names, applied, normals, signs, magnitude=9.0, std=0.5, prob=0.5):
    """timm's RandAugment.__call__ / AugmentOp.__call__ on given draws: per chosen op a unit draw (skip when
    above ``prob``), a standard normal (magnitude = N(m, std) clipped to [0, 10]) and, for the signed ops, a unit
    draw (negate when above 0.5). Returns (op, level / 10, negated; None for the unsigned ops) of the ops
    applied: what reference_argument turns into the op's argument."""
    done = []
    for name, u, z, s in zip(names, applied, normals, signs):
        if prob < 1.0 and u > prob:
            continue
        level = max(0.0, min(magnitude + std * z, LEVEL_DENOM))
        done.append((name, level / LEVEL_DENOM, s > 0.5 if name in SIGNED else None))
    return done


def recording(monkeypatch):
    """Replace our ops by recorders of (reference name, |v|, v < 0 for the signed ops): our ops' argument is a
    function of these (the pixel test above checks which)."""
    seen = []

    def recorder(name):
        ref = OURS_TO_REFERENCE.get(name, name)
        return lambda img, v: seen.append((ref, abs(v), v < 0 if ref in SIGNED else None)) or img

    monkeypatch.setattr(augment, "_OPS", {n: recorder(n) for n in augment._OP_NAMES})
    return seen


def test_op_choice_probability_and_magnitude_follow_timm(monkeypatch):
    seen = recording(monkeypatch)
    draws = np.random.default_rng(1)
    for _ in range(300):
        names = [str(n) for n in draws.choice(augment._OP_NAMES, 2)]
        applied, normals, signs = draws.random(2), draws.normal(0, 2, 2), draws.random(2)
        units = []  # ours asks: apply? and, if applied, the sign
        for u, s in zip(applied, signs):
            units += [u, s] if u < 0.5 else [u]
        ours = Scripted(units, normals=[z for u, z in zip(applied, normals) if u < 0.5], choices=names)
        seen.clear()
        rand_augment(None, 2, 9.0, 0.5, ours)
        assert ours.asked[0] == ("choice", augment._OP_NAMES, 2)  # uniform over the 15 ops, with replacement
        ref_names = [OURS_TO_REFERENCE.get(n, n) for n in names]
        assert seen == reference_rand_augment(ref_names, applied, normals, signs)


def test_drawn_ops_magnitudes_and_signs_have_timms_distribution(monkeypatch):
    seen = recording(monkeypatch)
    rng, n = np.random.default_rng(2), 20_000
    for _ in range(n):
        rand_augment(None, 2, 9.0, 0.5, rng)
    counts = Counter(name for name, *_ in seen)
    assert set(counts) == set(REFERENCE_OPS)
    expected = 2 * n * 0.5 / len(REFERENCE_OPS)  # 2 ops, each applied with probability 0.5
    assert all(abs(c - expected) < 0.1 * expected for c in counts.values()), counts
    levels = 10 * np.array([f for _, f, _ in seen])
    clipped = np.clip(np.random.default_rng(3).normal(9, 0.5, 200_000), 0, 10)
    assert abs(levels.mean() - clipped.mean()) < 0.02 and abs(levels.std() - clipped.std()) < 0.02
    assert levels.max() <= 10 and (levels == 10).mean() > 0.01  # clipped at 10: 2.3% of N(9, 0.5)
    negated = [neg for name, _, neg in seen if name in SIGNED]
    assert abs(np.mean(negated) - 0.5) < 0.02


# ---------------------------------------------------------------------------------------------- random erasing
def reference_erase_box(img_h, img_w, uniform, randint, min_area=0.02, max_area=1 / 3, min_aspect=0.3):
    """timm's RandomErasing._erase with one rectangle: (top, left, h, w) of the erased box, or None."""
    area = img_h * img_w
    log_aspect = (math.log(min_aspect), math.log(1 / min_aspect))
    for _ in range(10):
        target_area = uniform(min_area, max_area) * area / 1
        aspect = math.exp(uniform(*log_aspect))
        h = int(round(math.sqrt(target_area * aspect)))
        w = int(round(math.sqrt(target_area / aspect)))
        if w < img_w and h < img_h:
            return randint(0, img_h - h), randint(0, img_w - w), h, w
    return None


def test_erasing_area_aspect_and_place_follow_timm():
    draws = np.random.default_rng(4)
    nothing = 0
    for img_h, img_w in ((224, 224), (28, 28), (16, 40), (3, 3), (2, 2), (1, 5)):
        for _ in range(80):
            units, f = list(draws.random(20)), float(draws.random())
            x = torch.zeros(3, img_h, img_w)
            ours = Scripted(units, at_fraction(f))
            random_erase(x, ours)
            script = iter(units)
            box = reference_erase_box(img_h, img_w, lambda a, b: a + (b - a) * next(script),
                                      lambda a, b: at_fraction(f)(a, b + 1))
            want = torch.zeros(3, img_h, img_w)
            if box is not None:
                top, left, h, w = box
                want[:, top:top + h, left:left + w] = 7.0  # what the scripted normals fill in
                nothing += h * w == 0
            assert torch.equal(x, want), (img_h, img_w, box)
            uniforms = [a[1:] for a in ours.asked if a[0] == "uniform"]
            assert uniforms[:2] == [(0.02, 1 / 3), (math.log(0.3), math.log(1 / 0.3))]
    assert nothing > 0  # zero-height rectangles: timm's test accepts them and erases nothing; ours too


# ----------------------------------------------------------------------------------------------- mixup, cutmix
def reference_mix(x, target, num_classes, use_cutmix, lam, cy, cx, smoothing):
    """timm's Mixup (mode "batch", prob 1, correct_lam) for given draws: (x, soft targets, lam used)."""
    x = x.clone()
    if use_cutmix:
        img_h, img_w = x.shape[-2:]
        ratio = np.sqrt(1 - lam)
        cut_h, cut_w = int(img_h * ratio), int(img_w * ratio)
        yl, yh = np.clip(cy - cut_h // 2, 0, img_h), np.clip(cy + cut_h // 2, 0, img_h)
        xl, xh = np.clip(cx - cut_w // 2, 0, img_w), np.clip(cx + cut_w // 2, 0, img_w)
        lam = 1.0 - (yh - yl) * (xh - xl) / float(img_h * img_w)
        x[:, :, yl:yh, xl:xh] = x.flip(0)[:, :, yl:yh, xl:xh]
    else:
        x_flipped = x.flip(0).mul_(1.0 - lam)
        x.mul_(lam).add_(x_flipped)
    off = smoothing / num_classes
    on = 1.0 - smoothing + off

    def one_hot(y):
        return torch.full((len(y), num_classes), off).scatter_(1, y.long().view(-1, 1), on)

    return x, one_hot(target) * lam + one_hot(target.flip(0)) * (1.0 - lam), lam


@pytest.mark.parametrize("mixup, cutmix", [(0.8, 1.0), (0.8, 0.0), (0.0, 1.0)])
def test_mixup_and_cutmix_follow_timm(mixup, cutmix):
    draws = np.random.default_rng(5)
    corrected = 0
    for batch, height, width in ((6, 16, 16), (5, 224, 224), (4, 7, 12), (2, 1, 9)):
        for _ in range(40):
            torch.manual_seed(int(draws.integers(1 << 30)))
            x, y = torch.randn(batch, 3, height, width), torch.randint(0, 10, (batch,))
            use_cutmix = cutmix > 0 and (mixup == 0 or bool(draws.random() < 0.5))
            lam = float(draws.beta(1.0, 1.0))
            cy, cx = int(draws.integers(height)), int(draws.integers(width))
            both = mixup > 0 and cutmix > 0
            answers = iter([int(use_cutmix) if both else 0, cy, cx])  # which of the enabled ones, then the centre
            ours = Scripted(rule=lambda low, high: next(answers), betas=[lam])
            got_x, got_t = mix(x.clone(), y, 10, Augment(mixup_alpha=mixup, cutmix_alpha=cutmix), ours)
            want_x, want_t, used = reference_mix(x, y, 10, use_cutmix, lam, cy, cx, 0.1)
            assert torch.equal(got_x, want_x) and torch.equal(got_t, want_t)
            alpha = cutmix if use_cutmix else mixup
            centre = [("integers", 0, height), ("integers", 0, width)] if use_cutmix else []
            assert ours.asked == [("integers", 0, 2 if both else 1), ("beta", alpha, alpha), *centre]
            corrected += use_cutmix and not math.isclose(used, lam)
    if cutmix > 0:
        assert corrected > 0  # boxes clipped at the border: lambda corrected by the pasted area


def test_cutmix_is_chosen_half_the_time_and_lambda_is_beta():
    rng, cut, lams = np.random.default_rng(6), 0, []
    x = torch.arange(2.0)[:, None, None, None].expand(2, 1, 8, 8)
    for _ in range(4000):
        mixed, _ = mix(x.clone(), torch.tensor([0, 1]), 2, Augment(), rng)
        values = mixed[0].unique()
        if bool(((values == 0) | (values == 1)).all()):
            cut += 1  # pasted pixels keep their values; mixup blends every one
        else:
            lams.append(1 - float(values[0]))  # image 0 becomes 0 * lam + 1 * (1 - lam)
    assert abs(cut / 4000 - 0.5) < 0.03
    # mixup's lambda ~ Beta(0.8, 0.8): mean 0.5, variance a^2 / ((2a)^2 (2a + 1)) = 1 / 10.4
    assert abs(np.mean(lams) - 0.5) < 0.03 and abs(np.var(lams) - 1 / 10.4) < 0.01


# ------------------------------------------------------------------------------------------------------ recipe
def test_defaults_are_autoformers_recipe():
    """AutoFormer's supernet_train.py defaults: --aa rand-m9-mstd0.5-inc1 (2 ops), --reprob 0.25 --remode pixel
    --recount 1, --mixup 0.8 --cutmix 1.0 --mixup-prob 1.0 --mixup-switch-prob 0.5 --mixup-mode batch,
    --smoothing 0.1; create_transform's scale (0.08, 1), ratio (3/4, 4/3) and flip 0.5."""
    aug = Augment()
    assert (aug.crop_scale, aug.crop_ratio, aug.hflip) == ((0.08, 1.0), (3 / 4, 4 / 3), 0.5)
    assert (aug.randaugment, aug.randaugment_ops, aug.randaugment_magnitude, aug.randaugment_std) == (True, 2, 9, 0.5)
    assert (aug.random_erase, aug.mixup_alpha, aug.cutmix_alpha, aug.label_smoothing) == (0.25, 0.8, 1.0, 0.1)
