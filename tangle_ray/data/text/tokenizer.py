"""Tokenizers: tiktoken encodings; GPT-2's BPE file ships with the package, so ``gpt2`` works offline."""

from __future__ import annotations

import base64
import hashlib
import os
from pathlib import Path

import numpy as np
import tiktoken
from tiktoken_ext.openai_public import r50k_pat_str

from tangle_ray.errors import ConfigError, DataError

BPE_ENV = "TANGLE_RAY_GPT2_BPE"
ENDOFTEXT = "<|endoftext|>"
# Byte-identical to r50k_base.tiktoken, the file tiktoken downloads for r50k_base (tiktoken checks the same
# sha256); tiktoken's "gpt2" builds the same ranks from GPT-2's vocab.bpe/encoder.json. openai-whisper (MIT)
# ships this file as whisper/assets/gpt2.tiktoken.
PACKAGED_BPE = Path(__file__).with_name("gpt2.tiktoken")
PACKAGED_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"
# Encodings a GPT-2 BPE file stands for.
_GPT2_FAMILY = ("gpt2", "r50k_base")
_GPT2_RANKS = 50256  # merge ranks 0..50255; end-of-text is 50256


def _packaged_bpe() -> bytes:
    """The shipped GPT-2 BPE file, checked against its sha256."""
    fix = f"reinstall tangle-ray, or set {BPE_ENV} to a copy of gpt2.tiktoken (sha256 {PACKAGED_SHA256})"
    try:
        data = PACKAGED_BPE.read_bytes()
    except OSError as e:
        raise DataError(f"the GPT-2 BPE file shipped with tangle-ray cannot be read ({e}): {fix}") from e
    if hashlib.sha256(data).hexdigest() != PACKAGED_SHA256:
        raise DataError(f"the GPT-2 BPE file shipped with tangle-ray ({PACKAGED_BPE}) is corrupt: {fix}")
    return data


def _parse_bpe(data: bytes, where: str) -> dict[bytes, int]:
    """Merge ranks of a tiktoken BPE file (lines ``<base64 token> <rank>``), as a GPT-2 vocabulary."""
    ranks = {}
    for i, line in enumerate(data.splitlines(), 1):
        if line:
            try:
                token, rank = line.split()
                ranks[base64.b64decode(token, validate=True)] = int(rank)
            except ValueError as e:
                raise DataError(
                    f"tokenizer BPE file {where!r} line {i} is not '<base64 token> <rank>': it is not a "
                    "tiktoken BPE file"
                ) from e
    if sorted(ranks.values()) != list(range(_GPT2_RANKS)):
        raise DataError(
            f"tokenizer BPE file {where!r} has {len(ranks)} tokens; a GPT-2 vocabulary has the ranks "
            f"0..{_GPT2_RANKS - 1}, once each"
        )
    return ranks


def _build(name: str, bpe_file: str | None) -> tiktoken.Encoding:
    if name not in tiktoken.list_encoding_names():
        raise ConfigError(
            f"tokenizer: unknown encoding {name!r}; allowed: {sorted(tiktoken.list_encoding_names())}"
        )
    if name not in _GPT2_FAMILY:
        if bpe_file is not None:
            raise ConfigError(f"tokenizer {name!r}: a bpe_file is supported for {list(_GPT2_FAMILY)} only")
        try:
            return tiktoken.get_encoding(name)
        except Exception as e:  # tiktoken downloads the BPE file: offline, a proxy, a bad cache...
            raise DataError(
                f"tokenizer {name!r}: tiktoken could not download its BPE file ({type(e).__name__}: {e}). "
                "Offline, copy a TIKTOKEN_CACHE_DIR filled on a machine with network, or use 'gpt2' "
                "(shipped with tangle-ray)"
            ) from e
    if bpe_file is None:
        data, where = _packaged_bpe(), str(PACKAGED_BPE)
    else:  # read here, not by tiktoken: it caches local files by path and would miss a replaced file
        try:
            data, where = Path(bpe_file).read_bytes(), bpe_file
        except OSError as e:
            raise DataError(f"tokenizer BPE file {bpe_file!r} cannot be read: {e.strerror}") from e
    return tiktoken.Encoding(
        name=name,
        pat_str=r50k_pat_str,
        mergeable_ranks=_parse_bpe(data, where),
        special_tokens={ENDOFTEXT: _GPT2_RANKS},
    )


def _fingerprint(enc: tiktoken.Encoding) -> str:
    h = hashlib.sha256(enc._pat_str.encode())  # tiktoken keeps its tables private; they define the encoding
    for token, rank in sorted(enc._mergeable_ranks.items(), key=lambda kv: kv[1]):
        h.update(rank.to_bytes(4, "little") + len(token).to_bytes(2, "little") + token)
    for token, rank in sorted(enc._special_tokens.items()):
        h.update(b"special" + token.encode() + rank.to_bytes(4, "little"))
    return h.hexdigest()[:16]


class Tokenizer:
    """A tiktoken encoding with its end-of-text id and a fingerprint of its vocabulary.

    Pickles as its constructor arguments (for ``datasets.map(num_proc=...)``) and rebuilds lazily.
    """

    def __init__(self, name: str, bpe_file: str | None = None):
        self.name, self.bpe_file = name, bpe_file
        self._enc: tiktoken.Encoding | None = None
        self._fp: str | None = None

    def __getstate__(self) -> dict:
        return {"name": self.name, "bpe_file": self.bpe_file}

    def __setstate__(self, state: dict) -> None:
        self.__init__(**state)

    def __repr__(self) -> str:
        return f"Tokenizer(name={self.name!r}, bpe_file={self.bpe_file!r})"

    @property
    def encoding(self) -> tiktoken.Encoding:
        if self._enc is None:
            self._enc = _build(self.name, self.bpe_file)
        return self._enc

    @property
    def n_vocab(self) -> int:
        return self.encoding.n_vocab

    @property
    def eot(self) -> int:
        return self.encoding.eot_token

    @property
    def fingerprint(self) -> str:
        """Stable hash of pattern, merges and special tokens: changes whenever the encoding does."""
        if self._fp is None:
            self._fp = _fingerprint(self.encoding)
        return self._fp

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``; special-token strings count as plain text; no end-of-text is added."""
        return self.encoding.encode_ordinary(text)

    def encode_batch(self, texts: list[str], num_threads: int = 1) -> list[list[int]]:
        """:meth:`encode` for each text; ``num_threads > 1`` uses tiktoken's thread pool (whose overhead
        made one thread about 2x slower than a plain loop here)."""
        if num_threads == 1:
            return [self.encoding.encode_ordinary(t) for t in texts]
        return self.encoding.encode_ordinary_batch(texts, num_threads=num_threads)

    def encode_array(self, text: str) -> np.ndarray:
        """Like :meth:`encode`, as a uint32 array (no Python ints: the fast path for preparation)."""
        return self.encoding.encode_to_numpy(text, disallowed_special=())

    def decode(self, ids: list[int]) -> str:
        return self.encoding.decode(ids)


def get_tokenizer(name: str = "gpt2", bpe_file: str | None = None) -> Tokenizer:
    """Load a tokenizer. ``gpt2`` / ``r50k_base``: from ``bpe_file`` (any GPT-2-format BPE file, loaded as
    given: no hash check), else ``$TANGLE_RAY_GPT2_BPE`` (gpt2), else the file shipped with the package
    (offline, sha256-checked). Other tiktoken encodings: tiktoken's download (or its cache).

    Raises ConfigError when the tokenizer cannot be loaded.
    """
    if bpe_file is None and name == "gpt2" and os.environ.get(BPE_ENV):
        bpe_file = os.environ[BPE_ENV]
    tok = Tokenizer(name, None if bpe_file is None else str(Path(bpe_file).resolve()))
    _ = tok.encoding  # fail here, not later in a worker
    return tok
