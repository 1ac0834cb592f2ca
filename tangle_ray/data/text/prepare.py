"""Tokenize a text source once into flat token files: ``train.bin``, ``valid.bin``, ``test.bin`` + ``meta.json``.

``train`` trains the weights, ``valid`` (a seeded document-level share of the source's train split) scores
architectures, ``test`` is the source's own held-out split (from a single file: the fixed slice that
:func:`~tangle_ray.data.text.sources.load_text_source` holds out, the same for every seed). Files appear under
temporary names and are renamed when complete, ``meta.json`` last, so an interrupted run never leaves files
that :func:`load_split` accepts.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from contextlib import ExitStack
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from tangle_ray.configs import read_json
from tangle_ray.data.folder import SPLITS, prepare_lock
from tangle_ray.data.text.sources import TextSource, load_text_source, loaded_hash, source_hash
from tangle_ray.data.text.tokenizer import Tokenizer, get_tokenizer
from tangle_ray.errors import ConfigError, DataError, TangleRayError, shorten
from tangle_ray.names import check_name

if TYPE_CHECKING:  # datasets is imported where text is prepared, not where token files are read (the workers)
    from datasets import Dataset, DatasetDict, Features

FORMAT_VERSION = 1
META = "meta.json"
TMP = ".tmp"  # suffix of files being written
MAX_META_BYTES = 1 << 20
_CHUNK = 1 << 24  # tokens per read when verifying a file
_VERIFIED: set[tuple] = set()  # files check_token_folder read in this process: (path, size, mtime, vocabulary)


def token_dtype(n_vocab: int) -> np.dtype:
    """The smallest unsigned dtype holding every token id of an ``n_vocab`` vocabulary."""
    for dtype in (np.uint16, np.uint32):
        if n_vocab <= np.iinfo(dtype).max + 1:
            return np.dtype(dtype)
    raise ConfigError(f"tokenizer vocabulary of {n_vocab} tokens is too large for uint32 (at most 2**32 ids)")


class _Pack:
    """Batched ``map`` function: tokenizes a batch of documents, appends end-of-text to each, and packs the
    tokens of each part (e.g. train / valid) into a single output row."""

    def __init__(
        self, tokenizer: Tokenizer, dtype: np.dtype, parts: tuple[str, ...], part_of: np.ndarray | None
    ):
        self.tokenizer, self.dtype, self.parts, self.part_of = tokenizer, dtype, parts, part_of

    def features(self) -> Features:
        from datasets import Features, List, Value

        cols = {}
        for p in self.parts:
            cols[p] = List(Value(self.dtype.name))
            cols[f"{p}_docs"] = Value("int64")
        return Features(cols)

    def __call__(self, batch: dict, indices: list[int]) -> dict:
        eot = np.array([self.tokenizer.eot], np.uint32)
        docs = [self.tokenizer.encode_array(t) for t in batch["text"]]
        part = np.zeros(len(docs), np.int8) if self.part_of is None else self.part_of[indices]
        row: dict = {}
        for k, name in enumerate(self.parts):
            pieces = [piece for d, q in zip(docs, part) if q == k for piece in (d, eot)]
            flat = np.concatenate(pieces).astype(self.dtype) if pieces else np.empty(0, self.dtype)
            row[name], row[f"{name}_docs"] = [flat], [len(pieces) // 2]
        return row


def read_meta(data_dir: str | Path) -> dict:
    """The ``meta.json`` of a prepared data folder (ConfigError when missing, corrupt, incomplete or outdated)."""
    path = Path(data_dir) / META
    if not path.is_file():
        raise DataError(
            f"{str(path)!r} is missing: {str(data_dir)!r} is not a prepared data folder "
            "(run the data preparation first)"
        )
    try:
        meta = read_json(path, META, MAX_META_BYTES)
    except TangleRayError as e:
        raise DataError(f"{str(path)!r} is corrupt ({e}): prepare again") from None
    if not isinstance(meta, dict) or meta.get("format_version") != FORMAT_VERSION:
        version = meta.get("format_version") if isinstance(meta, dict) else None
        raise DataError(f"{str(path)!r} has format {shorten(version)}, not {FORMAT_VERSION}: prepare again")
    splits = meta.get("splits") if isinstance(meta.get("splits"), dict) else {}
    complete = (
        meta.get("dtype") in ("uint16", "uint32")
        and all(_is_int(meta.get(k)) for k in ("vocab_size", "eot"))
        and all(
            isinstance(splits.get(s), dict)
            and _is_int(splits[s].get("tokens"))
            and isinstance(splits[s].get("file"), str)
            for s in SPLITS
        )
    )
    if not complete:
        raise DataError(
            f"{str(path)!r} is incomplete (dtype, vocab_size, eot or split entries): prepare again"
        )
    vocab, dtype = meta["vocab_size"], np.dtype(meta["dtype"])
    if not 0 < vocab <= np.iinfo(dtype).max + 1 or not 0 <= meta["eot"] < vocab:
        raise DataError(f"{str(path)!r}: vocab_size {vocab} and eot {meta['eot']} do not fit dtype "
                          f"{dtype.name}: prepare again")
    fractions = meta.get("fractions", {"valid": 0.5})
    valid = fractions.get("valid") if isinstance(fractions, dict) else None
    if isinstance(valid, bool) or not isinstance(valid, (int, float)) or not 0 < valid < 1:
        raise DataError(f"{str(path)!r}: fractions = {shorten(fractions)} is not a share in (0, 1): prepare again")
    for name, info in splits.items():
        # a split's file is a name inside the folder: never a path elsewhere
        check_name(info.get("file") if isinstance(info, dict) else None, f"{path}: splits.{shorten(name)}.file")
        if not _is_int(info.get("tokens")) or info["tokens"] < 0:
            raise DataError(f"{path}: splits.{shorten(name)}.tokens = {shorten(info.get('tokens'))} "
                              "must be a count >= 0")
    return meta


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def load_split(data_dir: str | Path, split: str) -> np.memmap:
    """Read-only memmap of one prepared split's 1-D token array."""
    meta = read_meta(data_dir)
    if split not in meta["splits"]:
        raise ConfigError(f"data split {shorten(split)} is unknown; allowed: {list(meta['splits'])}")
    info, dtype = meta["splits"][split], np.dtype(meta["dtype"])
    path = Path(data_dir) / info["file"]
    expected = info["tokens"] * dtype.itemsize
    if not path.is_file() or path.stat().st_size != expected:
        size = path.stat().st_size if path.is_file() else "missing"
        raise DataError(
            f"data file {str(path)!r} is {size} bytes, meta.json says {expected}: prepare again"
        )
    if info["tokens"] == 0:  # numpy cannot map an empty file
        return np.zeros(0, dtype)
    return np.memmap(path, dtype=dtype, mode="r", shape=(info["tokens"],))


def check_token_folder(data_dir: str | Path, vocab_size: int | None = None,
                       splits: tuple[str, ...] = SPLITS) -> dict:
    """The checks every reader of a prepared token folder runs (``search``'s driver, ``evaluate``, ``tune`` and
    the workers, through the language-model task); returns its ``meta.json``.

    ``meta.json`` is complete and its files are plain names inside the folder (``read_meta``); the vocabulary it
    names fits the model's ``vocab_size`` (when given); every split's file has the size ``meta.json`` gives; and
    every token id is below the vocabulary (a file of random bytes, or prepared with another tokenizer, holds
    larger ones). Each file is read once, in chunks (page-cached, about 40 ms a GB); a file already checked in
    this process (same size and modification time) is not read again. A DataError names the folder, the file,
    the value and says to prepare again."""
    meta = read_meta(data_dir)
    path = Path(data_dir) / META
    if vocab_size is not None and meta["vocab_size"] > vocab_size:
        raise DataError(
            f"prepared tokens {str(data_dir)!r}: {str(path)!r} says a vocabulary of {meta['vocab_size']:,} tokens, "
            f"more than the model's {vocab_size:,}: prepared with another tokenizer, or meta.json is wrong; "
            "prepare again with the model's tokenizer"
        )
    limit = meta["vocab_size"]
    for split in splits:
        tokens = load_split(data_dir, split)
        path = Path(data_dir) / meta["splits"][split]["file"]
        st = path.stat() if len(tokens) else None
        key = (str(path.resolve()), st.st_size, st.st_mtime_ns, limit) if st else None
        if key is None or key in _VERIFIED:
            continue
        for start in range(0, len(tokens), _CHUNK):
            chunk = tokens[start:start + _CHUNK]
            if int(chunk.max()) >= limit:
                at = start + int(np.argmax(chunk >= limit))
                raise DataError(
                    f"data file {str(path)!r} holds token id {int(tokens[at])} at position {at:,}, outside the "
                    f"vocabulary of {limit:,}: garbled, or prepared with another tokenizer; prepare again"
                )
        _VERIFIED.add(key)
    return meta


def _reusable(out: Path, key: dict) -> bool:
    try:
        meta = read_meta(out)
        for s in SPLITS:
            load_split(out, s)  # files present with the sizes meta.json gives
    except TangleRayError:
        return False
    return {k: meta.get(k) for k in key} == key


def _write_parts(packed: Dataset, parts: tuple[str, ...], out: Path) -> dict[str, dict]:
    """Write each part's packed tokens to ``<part>.bin.tmp``; returns token and document counts."""
    from datasets.utils import tqdm  # honours datasets.disable_progress_bars()

    counts = {p: {"file": f"{p}.bin", "tokens": 0, "documents": 0} for p in parts}
    with ExitStack() as stack:
        files = {p: stack.enter_context(open(out / f"{p}.bin{TMP}", "wb")) for p in parts}
        bar = stack.enter_context(tqdm(total=len(packed), desc=f"Writing {'/'.join(parts)}", unit="batch"))
        for table in packed.with_format("arrow").iter(batch_size=16):
            for p in parts:
                for chunk in table.column(p).chunks:
                    tokens = chunk.flatten().to_numpy(zero_copy_only=False)
                    files[p].write(memoryview(np.ascontiguousarray(tokens)))
                    counts[p]["tokens"] += len(tokens)
                counts[p]["documents"] += sum(table.column(f"{p}_docs").to_pylist())
            bar.update(table.num_rows)
    return counts


def _build(
    dsd: DatasetDict, is_valid: np.ndarray, tok: Tokenizer, out: Path, meta: dict, num_proc: int
) -> None:
    """Tokenize and write the three splits under temporary names, rename them, then write ``meta.json``."""
    dtype = np.dtype(meta["dtype"])
    work = out / f".prepare{TMP}"
    shutil.rmtree(work, ignore_errors=True)  # leftovers of a killed run
    work.mkdir()
    fingerprint = hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest()[:16]
    try:
        splits: dict[str, dict] = {}
        for split, parts, part_of in (("train", ("train", "valid"), is_valid), ("test", ("test",), None)):
            pack = _Pack(tok, dtype, parts, part_of)
            packed = dsd[split].map(
                pack,
                batched=True,
                with_indices=True,
                remove_columns=["text"],
                features=pack.features(),
                num_proc=num_proc if num_proc > 1 else None,
                writer_batch_size=16,
                load_from_cache_file=False,
                cache_file_name=str(work / f"{split}.arrow"),
                new_fingerprint=f"{fingerprint}-{split}",
                desc=f"Tokenizing {split}",
            )
            splits.update(_write_parts(packed, parts, out))
        for s in SPLITS:
            os.replace(out / f"{s}.bin{TMP}", out / f"{s}.bin")
        (out / f"{META}{TMP}").write_text(
            json.dumps({**meta, "splits": {s: splits[s] for s in SPLITS}}, indent=2)
        )
        os.replace(out / f"{META}{TMP}", out / META)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        for leftover in out.glob(f"*{TMP}"):
            leftover.unlink()


def prepare_text(
    source: TextSource,
    out_dir: str | Path,
    tokenizer: str = "gpt2",
    bpe_file: str | None = None,
    valid_fraction: float = 0.2,
    seed: int = 0,
    num_proc: int = 1,
) -> Path:
    """Tokenize ``source`` into ``out_dir`` (see the module docstring); returns ``out_dir``.

    A rerun with the same input content, tokenizer fingerprint, fraction and seed reuses the files at once;
    any change rebuilds them. Concurrent calls on one folder wait for each other (a file lock).
    """
    if not 0.0 < valid_fraction < 1.0:
        raise ConfigError(f"valid_fraction={valid_fraction!r} must lie strictly between 0 and 1")
    if num_proc < 1:
        raise ConfigError(f"num_proc={num_proc!r} must be at least 1")
    out = Path(out_dir)
    tok = get_tokenizer(tokenizer, bpe_file)
    dtype = token_dtype(tok.n_vocab)

    def key(input_hash: str) -> dict:
        return {
            "format_version": FORMAT_VERSION,
            "input_hash": input_hash,
            "seed": seed,
            "tokenizer": {"name": tok.name, "fingerprint": tok.fingerprint},
            "fractions": {"train": 1.0 - valid_fraction, "valid": valid_fraction},
        }

    with prepare_lock(out):
        out.mkdir(exist_ok=True)
        input_hash = source_hash(source)
        if input_hash is not None and _reusable(out, key(input_hash)):
            return out
        dsd = load_text_source(source)
        if input_hash is None:
            input_hash = loaded_hash(dsd)
            if _reusable(out, key(input_hash)):
                return out

        n = len(dsd["train"])
        n_valid = round(n * valid_fraction)
        if not 0 < n_valid < n:
            raise DataError(
                f"valid_fraction={valid_fraction} of {n} training documents leaves the "
                f"{'valid' if n_valid == 0 else 'train'} split empty: give more documents"
            )
        is_valid = np.zeros(n, np.int8)
        is_valid[np.random.default_rng(seed).permutation(n)[:n_valid]] = 1

        (out / META).unlink(missing_ok=True)  # from here on the folder holds nothing the loader accepts
        meta = {
            **key(input_hash),
            "source": asdict(source),
            "vocab_size": tok.n_vocab,
            "eot": tok.eot,
            "dtype": dtype.name,
        }
        _build(dsd, is_valid, tok, out, meta, num_proc)
    return out
