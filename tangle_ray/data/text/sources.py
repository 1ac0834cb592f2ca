"""Text sources: a Hugging Face hub dataset or local text / JSONL / Parquet / saved-dataset files."""

from __future__ import annotations

import hashlib
import json
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlparse

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from tangle_ray.errors import ConfigError, DataError

if TYPE_CHECKING:  # datasets is imported where text is loaded, not by every process that imports tangle_ray
    from datasets import Dataset, DatasetDict

KINDS = ("hub", "text", "jsonl", "parquet", "saved")
TEXT_MODES = ("paragraph", "line")
DEFAULT_TEST_FRACTION = 0.1
TEST_SEED = 0  # the held-out test slice of a single file does not follow the preparation seed
_EXTENSIONS = {"text": (".txt", ".text", ".md"), "jsonl": (".jsonl", ".json"), "parquet": (".parquet",)}
_BUILDERS = {"text": "text", "jsonl": "json", "parquet": "parquet"}
_LOCAL_HINT = (
    "`tangle-ray data prepare --kind jsonl --path FILE` (also --kind text or parquet; --kind saved --path "
    "FOLDER for a save_to_disk copy), or in a run file `data.source: {kind: jsonl, path: FILE}`"
)


@dataclass
class TextSource:
    """Where documents come from.

    ``kind``: ``hub`` (``path`` is a dataset id), ``text``/``jsonl``/``parquet`` (``path`` is one file, the
    whole corpus, or a directory holding ``train.*`` and ``validation.*``, or ``files`` maps each split name
    to a file), ``saved`` (``path`` is a ``DatasetDict.save_to_disk`` folder). Plain text holds one document
    per blank-line separated block (``text_mode="paragraph"``) or per line (``"line"``). From a single file,
    ``test_fraction`` (default 0.1) of the documents, a fixed draw, are held out as the test split.
    """

    kind: str = "hub"
    path: str = "roneneldan/TinyStories"
    text_field: str = "text"
    train_split: str = "train"
    test_split: str = "validation"
    text_mode: str = "paragraph"
    files: dict[str, str] = field(default_factory=dict)
    test_fraction: float | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ConfigError(f"data source kind {self.kind!r} is unknown; allowed: {list(KINDS)}")
        if self.text_mode not in TEXT_MODES:
            raise ConfigError(
                f"data source text_mode {self.text_mode!r} is unknown; allowed: {list(TEXT_MODES)}"
            )
        if self.files and self.kind in ("hub", "saved"):
            raise ConfigError(f"data source files applies to kinds text/jsonl/parquet, not {self.kind!r}")
        if self.test_fraction is not None and not 0.0 < self.test_fraction < 1.0:
            raise ConfigError(
                f"data source test_fraction={self.test_fraction!r} must lie strictly between 0 and 1"
            )

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
                raise DataError(f"data source files has no {name!r} entry; given: {sorted(src.files)}")
            paths = [Path(src.path) / src.files[name] if Path(src.path).is_dir() else Path(src.files[name])]
        else:
            root = Path(src.path)
            if not root.exists():
                raise DataError(f"data source path {src.path!r} does not exist")
            if not root.is_dir():
                raise DataError(
                    f"data source path {src.path!r} is not a directory: give a folder holding "
                    f"{src.train_split}.* and {src.test_split}.* files, or files (split name -> file)"
                )
            paths = sorted(
                p
                for p in [*root.glob(f"{name}.*"), *root.glob(f"{name}-*")]
                if p.suffix in _EXTENSIONS[src.kind]
            )
            if not paths:
                raise DataError(
                    f"data source {src.path!r} has no {name!r} file for kind {src.kind!r} "
                    f"(looked for {name}.* / {name}-* with extension {'/'.join(_EXTENSIONS[src.kind])})"
                )
        for p in paths:
            _check_file(p, src.kind)
        out[split] = paths
    return out


def _check_file(path: Path, kind: str) -> None:
    if not path.is_file():
        raise DataError(f"data file {str(path)!r} does not exist")
    size = path.stat().st_size
    if size == 0:
        raise DataError(f"data file {str(path)!r} is empty")
    if kind == "parquet":
        try:
            rows = pq.ParquetFile(path).metadata.num_rows
        except (pa.ArrowException, OSError) as e:
            raise DataError(f"data file {str(path)!r} is not a Parquet file ({e})") from e
        if rows == 0:
            raise DataError(f"data file {str(path)!r} holds no rows")
        return
    with open(path, "rb") as f:
        head = f.read(8192)
    if b"\0" in head:
        raise DataError(f"data file {str(path)!r} is binary, not {kind} (UTF-8 text expected)")
    if len(head) == size and not head.strip():
        raise DataError(f"data file {str(path)!r} holds only blank lines: no documents")


def _single_file(src: TextSource) -> Path | None:
    """``path`` when it names one text/jsonl/parquet file (the whole corpus), else None."""
    single = src.kind in _BUILDERS and Path(src.path).is_file()
    if single and src.files:
        raise DataError(
            f"data source path {src.path!r} is a file; files (split name -> file) needs a folder path"
        )
    if src.test_fraction is not None and not single:
        raise DataError(
            f"data source test_fraction applies to a single-file path; {src.path!r} is not one (its test "
            f"split is {src.test_split!r})"
        )
    return Path(src.path) if single else None


def _local_files(src: TextSource) -> dict[str, list[Path]]:
    """Files per output split; a single file is the ``train`` split alone (the test slice comes later)."""
    single = _single_file(src)
    if single is None:
        return split_files(src)
    _check_file(single, src.kind)
    return {"train": [single]}


def source_hash(src: TextSource) -> str | None:
    """SHA-256 over a local source's file contents and parsing options; None for the hub (known after loading)."""
    if src.kind == "hub":
        return None
    options = (src.kind, src.text_field, src.text_mode)
    if src.kind == "saved":
        root = Path(src.path)
        if not root.is_dir():
            raise DataError(f"saved dataset {src.path!r} is not a directory")
        groups = {"all": sorted(p for p in root.rglob("*") if p.is_file())}
    else:
        groups = _local_files(src)
        if _single_file(src):
            options += (src.test_fraction or DEFAULT_TEST_FRACTION,)
    h = hashlib.sha256(repr(options).encode())
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
    import datasets

    url = urlparse(datasets.config.HF_ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def load_hub(dataset_id: str, local_hint: str) -> DatasetDict:
    """``datasets.load_dataset(dataset_id)``, failing fast with a ConfigError that suggests ``local_hint``
    when the hub is unreachable (instead of datasets' slow retries) or the dataset is not cached offline."""
    import datasets

    how = f"download it elsewhere and use a local copy: {local_hint}"
    if not datasets.config.HF_HUB_OFFLINE and not hub_reachable():
        raise DataError(f"hub dataset {dataset_id!r}: the Hugging Face hub is unreachable; {how}")
    try:
        return datasets.load_dataset(dataset_id)
    except ConnectionError as e:
        raise DataError(f"hub dataset {dataset_id!r} is not available offline ({e}); {how}") from e


def _load_hub_or_saved(src: TextSource) -> DatasetDict:
    import datasets

    if src.kind == "hub":
        if Path(src.path).exists():
            what = "file" if Path(src.path).is_file() else "folder"
            raise DataError(
                f"data source path {src.path!r} is a local {what} but kind is 'hub': give its kind "
                "(--kind text|jsonl|parquet|saved; run file: data.source.kind)"
            )
        return load_hub(src.path, _LOCAL_HINT)
    if not Path(src.path).is_dir():
        raise DataError(f"saved dataset {src.path!r} is not a directory")
    try:
        loaded = datasets.load_from_disk(src.path)
    except FileNotFoundError as e:
        raise DataError(f"{src.path!r} is not a dataset saved with save_to_disk: {e}") from e
    if not isinstance(loaded, datasets.DatasetDict):
        raise DataError(f"saved dataset {src.path!r} holds one split; a DatasetDict with splits is needed")
    return loaded


def _bad_line(src: TextSource, paths: list[Path]) -> str | None:
    """Where the first malformed line of text/JSONL files is and what is wrong with it (None: none found)."""
    if src.kind not in ("text", "jsonl"):
        return None
    field = src.text_field
    for p in paths:
        with open(p, "rb") as f:
            for i, raw in enumerate(f, 1):
                where = f"data file {str(p)!r} line {i}"
                try:
                    line = raw.decode("utf-8-sig" if i == 1 else "utf-8")
                except UnicodeDecodeError as e:
                    return f"{where} is not UTF-8 text ({e.reason} at byte {e.start}): save the file as UTF-8"
                if src.kind == "text" or not line.strip():
                    continue
                if i == 1 and line.lstrip().startswith("["):
                    break  # one JSON array, not JSON lines: rows have no line numbers
                try:
                    doc = json.loads(line)
                except ValueError as e:
                    return f"{where} is not JSON ({e}); allowed: one JSON object per line"
                if not isinstance(doc, dict):
                    return f"{where} holds a JSON {type(doc).__name__}; allowed: one JSON object per line"
                if not isinstance(value := doc.get(field), str):
                    got = json.dumps(value)[:50] if field in doc else "missing"
                    return (
                        f"{where}: text field {field!r} is {got}; allowed: a string in every line "
                        "(choose the field with --text-field / data.source.text_field)"
                    )
    return None


def _load_local(src: TextSource, paths: list[Path]) -> Dataset:
    """Read local files as one split (each split on its own: their columns need not agree)."""
    import datasets

    kwargs = {"sample_by": src.text_mode} if src.kind == "text" else {}
    try:
        return datasets.load_dataset(
            _BUILDERS[src.kind], data_files=[str(p) for p in paths], split="train", **kwargs
        )
    except (datasets.exceptions.DatasetGenerationError, pa.ArrowInvalid, StopIteration, UnicodeError) as e:
        if found := _bad_line(src, paths):
            raise DataError(found) from e
        cause = e.__cause__ or e
        what = "UTF-8 text" if isinstance(cause, UnicodeError) else src.kind
        raise DataError(
            f"data files {[str(p) for p in paths]} could not be read as {what}: "
            f"{type(cause).__name__}: {str(cause)[:200]}"
        ) from e


def _text_error(src: TextSource, where: str, ds: Dataset, paths: list[Path]) -> ConfigError | None:
    """Why the text field is not a UTF-8 string in every row, at the first bad line or row; None if it is."""
    feature, column = ds.features[src.text_field], ds.data.column(src.text_field)
    if getattr(feature, "dtype", None) not in ("string", "large_string"):
        problem = f"{where} field {src.text_field!r} holds {feature}; allowed: text (strings)"
    elif column.null_count:
        row = pc.index(pc.is_null(column), True).as_py()
        if src.kind == "parquet":
            for p in paths:  # rows follow the files in order
                n = pq.ParquetFile(p).metadata.num_rows
                if row < n:
                    where = f"data file {str(p)!r}"
                    break
                row -= n
        problem = f"{where} row {row + 1}: text field {src.text_field!r} is null; allowed: a string"
    else:
        try:
            column.validate(full=True)  # pyarrow's JSON reader lets bytes that are not UTF-8 through
            return None
        except pa.ArrowInvalid:
            problem = f"{where} field {src.text_field!r} holds text that is not UTF-8"
    return ConfigError(_bad_line(src, paths) or problem)


def _clean(batch: dict, field: str, strip: bool) -> dict:
    texts = (t.strip("\r\n") if strip else t for t in batch[field])
    return {"text": [t for t in texts if t.strip()]}


def _documents(src: TextSource, ds: Dataset, where: str, paths: list[Path]) -> Dataset:
    """One non-blank document a row in column ``text``."""
    feature = ds.features.get(src.text_field)
    if feature is None:
        raise DataError(
            f"{where} has no text field {src.text_field!r}; columns: {ds.column_names} "
            "(choose it with --text-field / data.source.text_field)"
        )
    if error := _text_error(src, where, ds, paths):
        raise error
    ds = ds.select_columns([src.text_field]).map(
        _clean,
        batched=True,
        remove_columns=[src.text_field],
        desc="Cleaning documents",
        fn_kwargs={"field": src.text_field, "strip": src.kind == "text"},
    )
    if len(ds) == 0:
        raise DataError(f"{where} holds no (non-blank) documents")
    return ds


def _hold_out(src: TextSource, ds: Dataset) -> DatasetDict:
    """Split a single file's documents into ``train`` and a fixed ``test`` draw (both in file order)."""
    from datasets import DatasetDict

    fraction = src.test_fraction or DEFAULT_TEST_FRACTION
    n = len(ds)
    n_test = round(n * fraction)
    if not 0 < n_test < n:
        raise DataError(
            f"data file {src.path!r}: test_fraction={fraction} of {n} documents leaves the "
            f"{'test' if n_test == 0 else 'train'} split empty: give more documents"
        )
    is_test = np.zeros(n, bool)
    is_test[np.random.default_rng(TEST_SEED).permutation(n)[:n_test]] = True
    return DatasetDict(
        {"train": ds.select(np.flatnonzero(~is_test)), "test": ds.select(np.flatnonzero(is_test))}
    )


def load_text_source(src: TextSource) -> DatasetDict:
    """Load ``src`` as a DatasetDict with splits ``train`` and ``test``: one non-blank document a row in ``text``.

    Local sources never touch the network. Blank documents are dropped; in text files, line breaks around a
    document are stripped. A single file is split into ``train`` and a held-out ``test`` slice.
    """
    from datasets import DatasetDict

    if src.kind in ("hub", "saved"):
        raw = _load_hub_or_saved(src)
        out = {}
        for split, name in src.splits.items():
            if name not in raw:
                raise DataError(f"data source {src.path!r} has no split {name!r}; available: {sorted(raw)}")
            out[split] = _documents(src, raw[name], f"data source {src.path!r} split {name!r}", [])
        return DatasetDict(out)
    single, out = _single_file(src), {}
    for split, paths in _local_files(src).items():
        where = (
            f"data file {src.path!r}" if single else f"data source {src.path!r} split {src.splits[split]!r}"
        )
        out[split] = _documents(src, _load_local(src, paths), where, paths)
    return _hold_out(src, out["train"]) if single else DatasetDict(out)
