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
import math
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
from tangle_ray.data.images.augment import open_image
from tangle_ray.data.images.sources import ImageSource, OpenedSource, open_source, split_balanced
from tangle_ray.errors import ConfigError, DataError, TangleRayError, clip, shorten

FORMAT_VERSION = 2  # 1: an unreleased draft without the split files
META = "meta.json"
SPLITS = ("train", "valid", "test")
_IMAGE_FILES = ("images.bin", "offsets.npy", "labels.npy")
SAMPLE = 16  # records ``check_image_folder`` decodes
MAX_CLASSES = 1 << 20  # labels of a source must be below this (ImageNet-21k has 21,841 classes)
_DECODED: set[tuple] = set()  # folders whose sample check_image_folder decoded in this process


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
        """Read the folder's arrays and check them against each other and ``meta.json``: integer dtypes, shapes,
        offsets that start at 0, grow with every record and end at the size of ``images.bin``, labels of
        ``0..num_classes - 1`` and split indices of existing records (a DataError naming the file, the value and
        "prepare again"). Cheap: a few numpy passes over N integers. ``check_image_folder`` adds decoding."""
        self.dir = Path(data_dir)
        self.meta = read_image_meta(self.dir)
        self.offsets, self.labels = _load_array(self.dir / "offsets.npy"), _load_array(self.dir / "labels.npy")
        self.splits = {s: _load_array(self.dir / f"{s}.npy") for s in SPLITS}
        try:
            size = (self.dir / "images.bin").stat().st_size
        except OSError as e:
            raise DataError(f"prepared images {str(self.dir)!r} are incomplete ({clip(str(e), 200)}): "
                            "prepare again") from None
        self._check(size)
        self._bin: np.memmap | None = None

    def _check(self, size: int) -> None:
        where, meta = f"prepared images {str(self.dir)!r}", self.meta
        try:
            n, counts = meta["records"], [meta["splits"][s]["images"] for s in SPLITS]
            classes = meta["num_classes"]
            complete = (all(_is_count(v) for v in (n, classes, *counts)) and n > 0 and classes > 0
                        and all(k in meta for k in ("parts", "valid_fraction", "seed")))
        except (KeyError, TypeError):
            complete = False
        if not complete:
            raise DataError(f"{where}: meta.json lacks records, num_classes or split counts: prepare again")
        for name, array, shape in (("offsets.npy", self.offsets, (n + 1,)), ("labels.npy", self.labels, (n,)),
                                   *((f"{s}.npy", self.splits[s], (c,)) for s, c in zip(SPLITS, counts))):
            if array.dtype.kind not in "iu" or array.shape != shape:
                raise DataError(f"{where}: {name} holds {array.dtype} of shape {array.shape}, not integers of shape "
                                f"{shape} (meta.json): prepare again")
        self.offsets, self.labels = self.offsets.astype(np.int64, copy=False), self.labels.astype(np.int64, copy=False)
        first, last, steps = int(self.offsets[0]), int(self.offsets[-1]), np.diff(self.offsets)
        if last != size:
            raise DataError(f"{where}: images.bin is {size:,} bytes, offsets.npy says {last:,}: cut or modified; "
                            "prepare again")
        if first != 0 or int(steps.min()) <= 0:
            bad = f"starts at {first:,}, not 0" if first else f"does not grow at record {int(np.argmax(steps <= 0)):,}"
            raise DataError(f"{where}: offsets.npy {bad} (offsets increase from 0, one encoded image each): "
                            "prepare again")
        low, high = int(self.labels.min()), int(self.labels.max())
        if low < 0 or high >= classes:
            at = int(np.argmax((self.labels < 0) | (self.labels >= classes)))
            raise DataError(f"{where}: labels.npy holds label {int(self.labels[at])} at record {at:,}, outside "
                            f"0..{classes - 1} (meta.json num_classes): prepare again")
        for s in SPLITS:
            records = self.splits[s] = self.splits[s].astype(np.int64, copy=False)
            if len(records) and (int(records.min()) < 0 or int(records.max()) >= n):
                at = int(np.argmax((records < 0) | (records >= n)))
                raise DataError(f"{where}: {s}.npy holds record {int(records[at]):,} at position {at:,}, outside "
                                f"0..{n - 1:,}: prepare again")

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


def _load_array(path: Path) -> np.ndarray:
    """A .npy file of plain numbers whose header's shape and dtype account for the file's bytes exactly (checked
    before numpy reads or allocates anything); a DataError naming it otherwise."""
    try:
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, _, dtype = read(f)
            expected = math.prod(shape) * dtype.itemsize
            if dtype.hasobject or expected != os.fstat(f.fileno()).st_size - f.tell():
                raise ValueError(f"its header says {dtype} of shape {shape}, which is not what the file holds")
            f.seek(0)
            return np.load(f, allow_pickle=False)
    except Exception as e:  # numpy raises many kinds for a garbled header (ValueError, SyntaxError, TokenError...)
        raise DataError(f"prepared images {str(path.parent)!r}: {path.name} is missing or not a numpy array "
                        f"({clip(str(e) or type(e).__name__, 200)}): prepare again") from None


def check_image_folder(data_dir: str | Path, num_classes: int | None = None, sample: int = SAMPLE) -> ImageStore:
    """The checks every reader of a prepared image folder runs (``search``'s driver, ``evaluate``, ``tune`` and
    the workers, through the classify task); returns the folder's :class:`ImageStore`.

    The store's own checks (``meta.json``; dtypes and shapes of the arrays; offsets from 0, increasing, to the
    size of ``images.bin``; labels and split indices in range), the classes against the model's ``num_classes``
    (when given), and ``sample`` records spread over the folder decoded in full, none claiming more pixels than
    Pillow's decompression-bomb bound or a side beyond the largest ``meta.json`` records. A DataError names the
    folder, the file, the value and says to prepare again. Its cost is that of the sample (measured: a few ms
    for MNIST digits); a folder checked in this process, unchanged since, is not decoded again."""
    store = ImageStore(data_dir)
    where = f"prepared images {str(store.dir)!r}"
    if num_classes is not None and store.num_classes > num_classes:
        raise DataError(f"{where} have {store.num_classes} classes; the model has {num_classes}: prepare the "
                        "folder for this model's classes, or use a space with fixed.num_classes of "
                        f"{store.num_classes}")
    stats = tuple((name, *_stat(store.dir / name)) for name in (*_IMAGE_FILES, META))
    key = (str(store.dir.resolve()), stats, sample)
    if key in _DECODED:
        return store
    largest = store.meta.get("max_side")
    largest = largest if _is_count(largest) and largest > 0 else None
    records = np.unique(np.linspace(0, len(store) - 1, min(sample, len(store))).round().astype(np.int64))
    for r in records:
        img = open_image(store.encoded(int(r)), store.where(int(r)), largest)
        try:
            img.load()
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
            raise DataError(f"image {store.where(int(r))!r} cannot be decoded ({clip(str(e), 200)}): "
                            "prepare again") from None
    _DECODED.add(key)
    return store


def _stat(path: Path) -> tuple[int, int]:
    st = path.stat()
    return st.st_size, st.st_mtime_ns


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


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
                top = len(classes) if classes is not None else MAX_CLASSES
                if not isinstance(label, int) or isinstance(label, bool) or not 0 <= label < top:
                    raise DataError(f"image {where!r}: label {shorten(label)} is out of range (allowed 0..{top - 1:,}"
                                    f"{'' if classes is not None else ': at most 2**20 classes'})")
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
    """The image's header (size, mode), after Pillow's integrity check and the decompression-bomb bound
    (``open_image``); DataError naming ``where``."""
    img = open_image(data, where)
    try:
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
