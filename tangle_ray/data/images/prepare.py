"""Prepare an image source once into a memory-mappable folder, and read it back (:class:`ImageStore`).

The folder holds ``images.bin`` (the encoded images back to back: the originals, unless ``short_side`` shrinks
larger ones), ``offsets.npy`` (int64, N + 1 byte offsets), ``labels.npy`` (int64, N), the record indices of
each split (``train.npy``, ``valid.npy``, ``test.npy``) and ``meta.json`` (classes, counts, format version).
``train`` and ``valid`` are a class-balanced split of the source's training images (``valid_fraction`` of each
class, drawn by ``seed``); ``test`` is the source's own held-out split. Everything is written into a temporary
folder that is then renamed into place, so an interrupted run leaves nothing :class:`ImageStore` accepts. A
new split of the same images links the image files instead of rewriting them.
"""

from __future__ import annotations

import io
import json
import os
import shutil
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from tangle_ray.configs import read_json
from tangle_ray.data.folder import prepare_lock, temporary_name
from tangle_ray.data.images.sources import ImageSource, OpenedSource, open_source, split_balanced
from tangle_ray.errors import ConfigError, DataError, TangleRayError

FORMAT_VERSION = 2  # 1: an unreleased draft without the split files
META = "meta.json"
SPLITS = ("train", "valid", "test")
_IMAGE_FILES = ("images.bin", "offsets.npy", "labels.npy")


def read_image_meta(data_dir: str | Path) -> dict[str, Any]:
    """The ``meta.json`` of a prepared image folder (ConfigError when missing, corrupt or outdated)."""
    path = Path(data_dir) / META
    if not path.is_file():
        raise DataError(f"{str(path)!r} is missing: {str(data_dir)!r} is not a prepared image folder")
    try:
        meta = read_json(path, META)
    except TangleRayError as e:
        raise DataError(f"{str(path)!r} is corrupt ({e}): prepare again") from None
    if not isinstance(meta, dict) or meta.get("kind") != "images":
        kind = meta.get("kind") if isinstance(meta, dict) else None
        raise DataError(f"{str(path)!r} does not describe prepared images (kind {kind!r})")
    if meta.get("format_version") != FORMAT_VERSION:
        raise DataError(
            f"{str(path)!r} has format {meta.get('format_version')!r}, not {FORMAT_VERSION}: prepare again"
        )
    return meta


class ImageStore:
    """Read-only access to a prepared folder: encoded images by record, labels, split record indices.

    ``images.bin`` is memory-mapped on first use in each process (pickling drops the map: safe for workers).
    """

    def __init__(self, data_dir: str | Path):
        self.dir = Path(data_dir)
        self.meta = read_image_meta(self.dir)
        try:
            self.offsets = np.load(self.dir / "offsets.npy", allow_pickle=False)
            self.labels = np.load(self.dir / "labels.npy", allow_pickle=False)
            self.splits = {s: np.load(self.dir / f"{s}.npy", allow_pickle=False) for s in SPLITS}
            size = (self.dir / "images.bin").stat().st_size
        except (OSError, ValueError) as e:
            raise DataError(f"prepared images {str(self.dir)!r} are incomplete ({e}): prepare again") from None
        try:
            n, counts = self.meta["records"], [self.meta["splits"][s]["images"] for s in SPLITS]
            consistent = (
                self.offsets.shape == (n + 1,)
                and self.labels.shape == (n,)
                and int(self.offsets[-1]) == size
                and [len(self.splits[s]) for s in SPLITS] == counts
                and all(k in self.meta for k in ("num_classes", "parts", "valid_fraction", "seed"))
            )
        except (KeyError, TypeError):
            consistent = False
        if not consistent:
            raise DataError(f"prepared images {str(self.dir)!r} do not match meta.json: prepare again")
        self._bin: np.memmap | None = None

    def __len__(self) -> int:
        return len(self.labels)

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_bin": None}

    @property
    def num_classes(self) -> int:
        return self.meta["num_classes"]

    def split(self, name: str) -> np.ndarray:
        """Sorted record indices of split ``name`` (``train``, ``valid`` or ``test``); never empty."""
        if name not in SPLITS:
            raise ConfigError(f"image split {name!r} is unknown; allowed: {list(SPLITS)}")
        return self.splits[name]

    def encoded(self, record: int) -> bytes:
        if self._bin is None:
            self._bin = np.memmap(self.dir / "images.bin", dtype=np.uint8, mode="r")
        return self._bin[self.offsets[record] : self.offsets[record + 1]].tobytes()

    def where(self, record: int) -> str:
        return f"{self.dir / 'images.bin'} record {record}"


def prepare_images(
    source: ImageSource,
    out_dir: str | Path,
    valid_fraction: float = 0.2,
    seed: int = 0,
    short_side: int = 0,
    quality: int = 90,
) -> Path:
    """Prepare ``source`` into ``out_dir`` (see the module docstring); returns ``out_dir``.

    A rerun with the same input files (path, size, modification time), ``short_side`` and ``quality`` keeps
    the images; a different ``valid_fraction`` or ``seed`` only writes a new split. ``short_side`` > 0
    re-encodes images whose shorter side is larger as JPEG of ``quality``. Every image's header is read: an
    undecodable file is a ConfigError naming it. Concurrent calls on one folder wait for each other.
    """
    if short_side < 0 or not 1 <= quality <= 100:
        raise ConfigError(f"short_side={short_side} must be >= 0 and quality={quality} in 1..100")
    out = Path(out_dir)
    with prepare_lock(out):
        opened = open_source(source)
        key = {
            "format_version": FORMAT_VERSION,
            "kind": "images",
            "input_hash": opened.input_hash,
            "short_side": short_side,
            "quality": quality if short_side else None,
        }
        meta = _current_meta(out)
        if meta is not None and {k: meta.get(k) for k in key} == key:
            _resplit(out, meta, valid_fraction, seed)
            return out
        _check_replaceable(out)

        def build(tmp: Path) -> dict[str, Any]:
            return {**key, "source": asdict(source), **_write(opened, tmp, short_side, quality)}

        _build(out, build, valid_fraction, seed)
    return out


def _current_meta(out: Path) -> dict[str, Any] | None:
    try:
        return ImageStore(out).meta
    except TangleRayError:
        return None


def _resplit(out: Path, meta: dict[str, Any], valid_fraction: float, seed: int) -> None:
    if (meta["valid_fraction"], meta["seed"]) != (valid_fraction, seed):

        def link(tmp: Path) -> dict[str, Any]:
            for name in _IMAGE_FILES:
                try:
                    os.link(out / name, tmp / name)
                except OSError:  # no hard links on this file system
                    shutil.copyfile(out / name, tmp / name)
            return {k: v for k, v in meta.items() if k not in ("valid_fraction", "seed", "splits")}

        _build(out, link, valid_fraction, seed)


def _build(out: Path, fill: Callable[[Path], dict[str, Any]], valid_fraction: float, seed: int) -> None:
    """Fill a temporary folder (images by ``fill``, then the split and ``meta.json``) and swap it in."""
    tmp = temporary_name(out, str(os.getpid()))
    tmp.mkdir()
    try:
        meta = fill(tmp)
        splits = _write_splits(tmp, meta, valid_fraction, seed)
        meta = {**meta, "valid_fraction": valid_fraction, "seed": seed, "splits": splits}
        (tmp / META).write_text(json.dumps(meta, indent=1))
        if out.exists():
            old = temporary_name(out, f"old-{os.getpid()}")
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _write_splits(folder: Path, meta: dict[str, Any], valid_fraction: float, seed: int) -> dict[str, Any]:
    labels = np.load(folder / "labels.npy", allow_pickle=False)
    (lo, hi), (test_lo, test_hi) = meta["parts"]["train"], meta["parts"]["test"]
    rest, share = split_balanced(labels[lo:hi], valid_fraction, seed)
    out = {}
    for name, records in (("train", rest + lo), ("valid", share + lo), ("test", np.arange(test_lo, test_hi))):
        if len(records) == 0:
            raise DataError(
                f"image split {name!r} would be empty ({hi - lo} training images in "
                f"{meta['num_classes']} classes, valid_fraction={valid_fraction}): give more images per "
                "class or another valid_fraction"
            )
        np.save(folder / f"{name}.npy", records.astype(np.int64))
        counts = np.bincount(labels[records], minlength=meta["num_classes"]).tolist()
        out[name] = {"file": f"{name}.npy", "images": len(records), "class_counts": counts}
    return out


def _check_replaceable(out: Path) -> None:
    """Refuse to replace a folder that holds something other than prepared images."""
    if out.is_dir() and any(out.iterdir()):
        try:
            kind = json.loads((out / META).read_text()).get("kind")
        except (OSError, ValueError, AttributeError):
            kind = None
        if kind != "images":
            raise DataError(
                f"data.dir {str(out)!r} exists and holds no prepared images (no images meta.json): "
                "choose an empty or new folder"
            )


def _write(opened: OpenedSource, folder: Path, short_side: int, quality: int) -> dict[str, Any]:
    """Stream every sample into ``folder``; returns the image part of ``meta.json``."""
    from datasets.utils import tqdm  # honours datasets.disable_progress_bars()

    classes = opened.classes
    offsets, labels, parts, modes = [0], [], {}, Counter()
    sides = [np.inf, 0]
    with open(folder / "images.bin", "wb") as f, tqdm(desc="Preparing images", unit="img") as bar:
        for split in ("train", "test"):
            start = len(labels)
            for where, data, label in opened.splits[split]():
                if label < 0 or (classes is not None and label >= len(classes)):
                    allowed = f"0..{len(classes) - 1}" if classes is not None else ">= 0"
                    raise DataError(f"image {where!r}: label {label} is out of range (allowed {allowed})")
                img = _inspect(data, where)
                if short_side and min(img.size) > short_side:
                    data = _shrink(data, short_side, quality)
                    img = Image.open(io.BytesIO(data))
                f.write(data)
                offsets.append(offsets[-1] + len(data))
                labels.append(label)
                modes[img.mode] += 1
                sides = [min(sides[0], *img.size), max(sides[1], *img.size)]
                bar.update()
            if len(labels) == start:
                raise DataError(f"image source split {split!r} holds no images")
            parts[split] = [start, len(labels)]
    np.save(folder / "offsets.npy", np.asarray(offsets, np.int64))
    np.save(folder / "labels.npy", np.asarray(labels, np.int64))
    num_classes = len(classes) if classes is not None else max(labels) + 1
    return {
        "classes": classes if classes is not None else [str(c) for c in range(num_classes)],
        "num_classes": num_classes,
        "records": len(labels),
        "parts": parts,
        "modes": dict(modes),
        "min_side": int(sides[0]),
        "max_side": int(sides[1]),
    }


def _inspect(data: bytes, where: str) -> Image.Image:
    """The image's header (size, mode), after Pillow's integrity check; ConfigError naming ``where``."""
    try:
        img = Image.open(io.BytesIO(data))
        img.verify()
        return img
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise DataError(f"image {where!r} cannot be decoded: {e}") from None


def _shrink(data: bytes, short_side: int, quality: int) -> bytes:
    img = Image.open(io.BytesIO(data))
    scale = short_side / min(img.size)
    size = (max(1, round(img.width * scale)), max(1, round(img.height * scale)))
    img.draft("RGB", size)  # JPEG: decode at a reduced scale where it still covers ``size``
    img = img.convert("L" if img.mode == "L" else "RGB").resize(size, Image.Resampling.BICUBIC)
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality)
    return buf.getvalue()
