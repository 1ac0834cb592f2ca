"""Prepare an image source once into a memory-mappable folder, and read it back (:class:`ImageStore`).

The folder holds ``images.bin`` (the encoded images back to back, originals unless ``short_side`` shrinks larger
ones), ``offsets.npy`` (int64, N + 1 byte offsets), ``labels.npy`` (int64, N) and ``meta.json`` (classes, counts,
the record ranges of the source's train and test splits, format version). It is built in a temporary folder and
renamed into place, so an interrupted run leaves nothing that :class:`ImageStore` accepts. Splits: ``train`` and
``valid`` are a class-balanced split of the source's train part (``valid_fraction``, seed), computed on load;
``test`` is the source's own held-out split.
"""

from __future__ import annotations

import fcntl
import io
import json
import os
import shutil
from collections import Counter
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from tangle_ray.data.images import ImageSource, OpenedSource, open_source, split_balanced
from tangle_ray.errors import ConfigError

FORMAT_VERSION = 1
META = "meta.json"
SPLITS = ("train", "valid", "test")
_FILES = ("images.bin", "offsets.npy", "labels.npy")


def read_image_meta(data_dir: str | Path) -> dict[str, Any]:
    """The ``meta.json`` of a prepared image folder (ConfigError when missing, corrupt or outdated)."""
    path = Path(data_dir) / META
    if not path.is_file():
        raise ConfigError(f"{str(path)!r} is missing: {str(data_dir)!r} is not a prepared image folder")
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"{str(path)!r} is corrupt ({e}): prepare again") from None
    if not isinstance(meta, dict) or meta.get("kind") != "images":
        raise ConfigError(f"{str(path)!r} does not describe prepared images (kind {meta.get('kind')!r})")
    if meta.get("format_version") != FORMAT_VERSION:
        raise ConfigError(f"{str(path)!r} has format {meta.get('format_version')!r}, not {FORMAT_VERSION}: prepare again")
    return meta


class ImageStore:
    """Read-only access to a prepared folder: encoded images by record, labels, and split record indices.

    ``images.bin`` is memory-mapped on first use in each process (pickling drops the map: safe for workers).
    """

    def __init__(self, data_dir: str | Path):
        self.dir = Path(data_dir)
        self.meta = read_image_meta(self.dir)
        try:
            self.offsets = np.load(self.dir / "offsets.npy", allow_pickle=False)
            self.labels = np.load(self.dir / "labels.npy", allow_pickle=False)
            size = (self.dir / "images.bin").stat().st_size
        except (OSError, ValueError) as e:
            raise ConfigError(f"prepared images {str(self.dir)!r} are incomplete ({e}): prepare again") from None
        n = self.meta["records"]
        if self.offsets.shape != (n + 1,) or self.labels.shape != (n,) or int(self.offsets[-1]) != size:
            raise ConfigError(f"prepared images {str(self.dir)!r} do not match meta.json: prepare again")
        self._bin: np.memmap | None = None
        self._splits: dict[tuple, np.ndarray] = {}

    def __len__(self) -> int:
        return len(self.labels)

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_bin": None}

    @property
    def num_classes(self) -> int:
        return self.meta["num_classes"]

    def encoded(self, record: int) -> bytes:
        if self._bin is None:
            self._bin = np.memmap(self.dir / "images.bin", dtype=np.uint8, mode="r")
        return self._bin[self.offsets[record] : self.offsets[record + 1]].tobytes()

    def where(self, record: int) -> str:
        return f"{self.dir / 'images.bin'} record {record}"

    def split(self, name: str, valid_fraction: float, seed: int) -> np.ndarray:
        """Sorted record indices of split ``name`` (``train``, ``valid`` or ``test``); never empty."""
        if name not in SPLITS:
            raise ConfigError(f"image split {name!r} is unknown; allowed: {list(SPLITS)}")
        key = (name, valid_fraction, seed)
        if key not in self._splits:
            lo, hi = self.meta["parts"]["test" if name == "test" else "train"]
            if name == "test":
                records = np.arange(lo, hi)
            else:
                rest, share = split_balanced(self.labels[lo:hi], valid_fraction, seed)
                records = (rest if name == "train" else share) + lo
            if len(records) == 0:
                raise ConfigError(
                    f"image split {name!r} of {str(self.dir)!r} is empty ({hi - lo} source images, "
                    f"valid_fraction={valid_fraction}): give more images per class or another valid_fraction"
                )
            self._splits[key] = records
        return self._splits[key]


def prepare_images(source: ImageSource, out_dir: str | Path, short_side: int = 0, quality: int = 90) -> Path:
    """Prepare ``source`` into ``out_dir`` (see the module docstring); returns ``out_dir``.

    A rerun with the same input files (path, size, modification time), ``short_side`` and ``quality`` returns
    at once; any change rebuilds. ``short_side`` > 0 re-encodes images whose shorter side is larger as JPEG of
    ``quality``. Concurrent calls on one folder wait for each other (a file lock). Every image's header is
    read: an undecodable file is a ConfigError naming it.
    """
    if short_side < 0 or not 1 <= quality <= 100:
        raise ConfigError(f"short_side={short_side} must be >= 0 and quality={quality} in 1..100")
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.parent / f".{out.name}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        for stale in out.parent.glob(f".{out.name}.tmp-*"):  # left by a killed run
            shutil.rmtree(stale, ignore_errors=True)
        opened = open_source(source)
        key = {"format_version": FORMAT_VERSION, "kind": "images", "input_hash": opened.input_hash,
               "short_side": short_side, "quality": quality if short_side else None}
        try:
            meta = ImageStore(out).meta
            if {k: meta.get(k) for k in key} == key:
                return out
        except ConfigError:
            pass
        _check_replaceable(out)
        tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
        tmp.mkdir()
        try:
            meta = {**key, "source": asdict(source), **_write(opened, tmp, short_side, quality)}
            (tmp / META).write_text(json.dumps(meta, indent=1))
            _swap(tmp, out)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def _check_replaceable(out: Path) -> None:
    """Refuse to replace a folder that holds something other than prepared images."""
    if out.is_dir() and any(out.iterdir()):
        try:
            kind = json.loads((out / META).read_text()).get("kind")
        except (OSError, ValueError, AttributeError):
            kind = None
        if kind != "images":
            raise ConfigError(
                f"data.dir {str(out)!r} exists and holds no prepared images (no images meta.json): "
                "choose an empty or new folder"
            )


def _swap(tmp: Path, out: Path) -> None:
    if out.exists():
        old = out.parent / f".{out.name}.tmp-old-{os.getpid()}"
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)


def _write(opened: OpenedSource, folder: Path, short_side: int, quality: int) -> dict[str, Any]:
    """Stream every sample into ``folder``; returns the content part of ``meta.json``."""
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
                    raise ConfigError(f"image {where!r}: label {label} is out of range (allowed {allowed})")
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
                raise ConfigError(f"image source split {split!r} holds no images")
            parts[split] = [start, len(labels)]
    np.save(folder / "offsets.npy", np.asarray(offsets, np.int64))
    np.save(folder / "labels.npy", np.asarray(labels, np.int64))
    num_classes = len(classes) if classes is not None else max(labels) + 1
    lab = np.asarray(labels)
    return {
        "classes": classes if classes is not None else [str(c) for c in range(num_classes)],
        "num_classes": num_classes,
        "records": len(labels),
        "parts": parts,
        "class_counts": {s: np.bincount(lab[lo:hi], minlength=num_classes).tolist() for s, (lo, hi) in parts.items()},
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
        raise ConfigError(f"image {where!r} cannot be decoded: {e}") from None


def _shrink(data: bytes, short_side: int, quality: int) -> bytes:
    img = Image.open(io.BytesIO(data))
    scale = short_side / min(img.size)
    size = (max(1, round(img.width * scale)), max(1, round(img.height * scale)))
    img.draft("RGB", size)  # JPEG: decode at a reduced scale where it still covers ``size``
    img = img.convert("L" if img.mode == "L" else "RGB").resize(size, Image.BICUBIC)
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality)
    return buf.getvalue()
