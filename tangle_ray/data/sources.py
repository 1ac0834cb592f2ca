"""Text sources: a Hugging Face hub dataset or local text / JSONL / Parquet / saved-dataset files."""

from __future__ import annotations

import hashlib
import socket
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

import datasets
import pyarrow as pa
from datasets import DatasetDict

from tangle_ray.errors import ConfigError

KINDS = ("hub", "text", "jsonl", "parquet", "saved")
TEXT_MODES = ("paragraph", "line")
_EXTENSIONS = {"text": (".txt", ".text", ".md"), "jsonl": (".jsonl", ".json"), "parquet": (".parquet",)}
_BUILDERS = {"text": "text", "jsonl": "json", "parquet": "parquet"}


@dataclass
class TextSource:
    """Where documents come from.

    ``kind``: ``hub`` (``path`` is a dataset id), ``text``/``jsonl``/``parquet`` (``path`` is a directory
    holding ``train.*`` and ``validation.*``, or ``files`` maps each split name to a file), ``saved``
    (``path`` is a ``DatasetDict.save_to_disk`` folder). Plain text holds one document per blank-line
    separated block (``text_mode="paragraph"``) or per line (``"line"``).
    """

    kind: str = "hub"
    path: str = "roneneldan/TinyStories"
    text_field: str = "text"
    train_split: str = "train"
    test_split: str = "validation"
    text_mode: str = "paragraph"
    files: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ConfigError(f"data source kind {self.kind!r} is unknown; allowed: {list(KINDS)}")
        if self.text_mode not in TEXT_MODES:
            raise ConfigError(
                f"data source text_mode {self.text_mode!r} is unknown; allowed: {list(TEXT_MODES)}"
            )
        if self.files and self.kind in ("hub", "saved"):
            raise ConfigError(f"data source files= applies to text/jsonl/parquet, not kind {self.kind!r}")

    @property
    def splits(self) -> dict[str, str]:
        """Output split name -> the source's split name."""
        return {"train": self.train_split, "test": self.test_split}


def split_files(src: TextSource) -> dict[str, list[Path]]:
    """The local files of each output split (``train``, ``test``) of a text/jsonl/parquet source.

    Any source with ``kind``, ``path``, ``files`` and ``splits`` works (the image sources reuse it).
    """
    out: dict[str, list[Path]] = {}
    for split, name in src.splits.items():
        if src.files:
            if name not in src.files:
                raise ConfigError(f"data source files= has no {name!r} entry; given: {sorted(src.files)}")
            paths = [Path(src.path) / src.files[name] if Path(src.path).is_dir() else Path(src.files[name])]
        else:
            root = Path(src.path)
            if not root.is_dir():
                raise ConfigError(
                    f"data source path {src.path!r} is not a directory: give a folder holding "
                    f"{src.train_split}.* and {src.test_split}.* files, or files={{split: file}}"
                )
            paths = sorted(
                p
                for p in [*root.glob(f"{name}.*"), *root.glob(f"{name}-*")]
                if p.suffix in _EXTENSIONS[src.kind]
            )
            if not paths:
                raise ConfigError(
                    f"data source {src.path!r} has no {name!r} file for kind {src.kind!r} "
                    f"(looked for {name}.* / {name}-* with extension {'/'.join(_EXTENSIONS[src.kind])})"
                )
        for p in paths:
            _check_file(p, src.kind)
        out[split] = paths
    return out


def _check_file(path: Path, kind: str) -> None:
    if not path.is_file():
        raise ConfigError(f"data file {str(path)!r} does not exist")
    if path.stat().st_size == 0:
        raise ConfigError(f"data file {str(path)!r} is empty")
    if kind != "parquet":
        with open(path, "rb") as f:
            head = f.read(8192)
        if b"\0" in head:
            raise ConfigError(f"data file {str(path)!r} is binary, not {kind} (UTF-8 text expected)")


def source_hash(src: TextSource) -> str | None:
    """SHA-256 over a local source's file contents and parsing options; None for the hub (known after loading)."""
    if src.kind == "hub":
        return None
    h = hashlib.sha256(repr((src.kind, src.text_field, src.text_mode)).encode())
    if src.kind == "saved":
        root = Path(src.path)
        if not root.is_dir():
            raise ConfigError(f"saved dataset {src.path!r} is not a directory")
        groups = {"all": sorted(p for p in root.rglob("*") if p.is_file())}
    else:
        groups = split_files(src)
    for split, paths in groups.items():
        for p in paths:
            h.update(f"{split}:{p.name}:{p.stat().st_size}:".encode())
            with open(p, "rb") as f:
                while chunk := f.read(1 << 22):
                    h.update(chunk)
    return h.hexdigest()


def loaded_hash(dsd: DatasetDict) -> str:
    """Hash of a loaded dataset's fingerprints (for hub sources: they follow the hub revision)."""
    return hashlib.sha256(repr(sorted((k, v._fingerprint) for k, v in dsd.items())).encode()).hexdigest()


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face hub answers a TCP connection (checked before slow retrying downloads)."""
    url = urlparse(datasets.config.HF_ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def load_hub(dataset_id: str, local_hint: str) -> DatasetDict:
    """``datasets.load_dataset(dataset_id)``, failing fast with a ConfigError that suggests ``local_hint``
    when the hub is unreachable (instead of datasets' slow retries) or the dataset is not cached offline."""
    how = f"download it elsewhere and use a local copy: {local_hint}"
    if not datasets.config.HF_HUB_OFFLINE and not hub_reachable():
        raise ConfigError(f"hub dataset {dataset_id!r}: the Hugging Face hub is unreachable; {how}")
    try:
        return datasets.load_dataset(dataset_id)
    except ConnectionError as e:
        raise ConfigError(f"hub dataset {dataset_id!r} is not available offline ({e}); {how}") from e


def _load_raw(src: TextSource) -> DatasetDict:
    if src.kind == "hub":
        return load_hub(
            src.path,
            "TextSource(kind='jsonl'|'text'|'parquet', path=folder with train.* and validation.*) "
            "or TextSource(kind='saved', path=a save_to_disk folder)",
        )
    if src.kind == "saved":
        if not Path(src.path).is_dir():
            raise ConfigError(f"saved dataset {src.path!r} is not a directory")
        try:
            loaded = datasets.load_from_disk(src.path)
        except FileNotFoundError as e:
            raise ConfigError(f"{src.path!r} is not a dataset saved with save_to_disk: {e}") from e
        if not isinstance(loaded, DatasetDict):
            raise ConfigError(
                f"saved dataset {src.path!r} holds one split; a DatasetDict with splits is needed"
            )
        return loaded
    files = split_files(src)
    kwargs = {"sample_by": src.text_mode} if src.kind == "text" else {}
    try:
        return datasets.load_dataset(
            _BUILDERS[src.kind],
            data_files={src.splits[s]: [str(p) for p in ps] for s, ps in files.items()},
            **kwargs,
        )
    except (datasets.exceptions.DatasetGenerationError, pa.ArrowInvalid, StopIteration) as e:
        cause = e.__cause__ or e
        what = "UTF-8 text" if isinstance(cause, UnicodeDecodeError) else src.kind
        raise ConfigError(
            f"data files {[str(p) for ps in files.values() for p in ps]} could not be read as {what}: "
            f"{type(cause).__name__}: {str(cause)[:200]}"
        ) from e


def _clean(batch: dict, field: str, strip: bool) -> dict:
    texts = (t.strip("\r\n") if strip else t for t in batch[field])
    return {"text": [t for t in texts if t.strip()]}


def load_text_source(src: TextSource) -> DatasetDict:
    """Load ``src`` as a DatasetDict with splits ``train`` and ``test``: one non-blank document a row in ``text``.

    Local sources never touch the network. Blank documents are dropped; in text files, line breaks around a
    document are stripped.
    """
    raw = _load_raw(src)
    out = {}
    for split, name in src.splits.items():
        if name not in raw:
            raise ConfigError(f"data source {src.path!r} has no split {name!r}; available: {sorted(raw)}")
        ds = raw[name]
        feature = ds.features.get(src.text_field)
        if feature is None:
            raise ConfigError(
                f"data source {src.path!r} split {name!r} has no text field {src.text_field!r}; "
                f"columns: {ds.column_names} (set text_field)"
            )
        if getattr(feature, "dtype", None) not in ("string", "large_string"):
            raise ConfigError(
                f"data source {src.path!r} field {src.text_field!r} holds {feature}, not text (strings)"
            )
        ds = ds.select_columns([src.text_field]).map(
            _clean,
            batched=True,
            remove_columns=[src.text_field],
            desc=f"Cleaning {split}",
            fn_kwargs={"field": src.text_field, "strip": src.kind == "text"},
        )
        if len(ds) == 0:
            raise ConfigError(f"data source {src.path!r} split {name!r} holds no (non-blank) documents")
        out[split] = ds
    return DatasetDict(out)
