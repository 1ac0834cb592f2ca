"""Tokenizers: tiktoken encodings, loadable offline from a BPE file."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import tiktoken
from tiktoken.load import load_tiktoken_bpe
from tiktoken_ext.openai_public import r50k_pat_str

from tangle_ray.errors import ConfigError

BPE_ENV = "TANGLE_RAY_GPT2_BPE"
ENDOFTEXT = "<|endoftext|>"
# Encodings a GPT-2 BPE file (``gpt2.tiktoken`` == r50k_base's vocabulary) can stand for.
_GPT2_FAMILY = ("gpt2", "r50k_base")


def _build(name: str, bpe_file: str | None) -> tiktoken.Encoding:
    if bpe_file is None:
        if name not in tiktoken.list_encoding_names():
            raise ConfigError(
                f"tokenizer: unknown encoding {name!r}; allowed: {sorted(tiktoken.list_encoding_names())}"
            )
        try:
            return tiktoken.get_encoding(name)
        except Exception as e:  # tiktoken downloads the BPE file: offline, a proxy, a bad cache...
            raise ConfigError(
                f"tokenizer {name!r}: tiktoken could not fetch its BPE file ({type(e).__name__}: {e}). "
                f"Pass a local BPE file (bpe_file=... / --bpe-file) or set {BPE_ENV}=/path/to/gpt2.tiktoken"
            ) from e
    if name not in _GPT2_FAMILY:
        raise ConfigError(f"tokenizer {name!r}: a bpe_file is supported for {list(_GPT2_FAMILY)} only")
    path = Path(bpe_file)
    if not path.is_file():
        raise ConfigError(f"tokenizer BPE file {str(path)!r} does not exist")
    try:
        ranks = load_tiktoken_bpe(str(path))
    except (ValueError, UnicodeDecodeError) as e:
        raise ConfigError(f"tokenizer BPE file {str(path)!r} is not a tiktoken BPE file: {e}") from e
    if len(ranks) != 50256:
        raise ConfigError(
            f"tokenizer BPE file {str(path)!r} has {len(ranks)} tokens; GPT-2 has 50256 (+1 special)"
        )
    return tiktoken.Encoding(
        name=name, pat_str=r50k_pat_str, mergeable_ranks=ranks, special_tokens={ENDOFTEXT: 50256}
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
    """Load a tokenizer: from ``bpe_file``, else ``$TANGLE_RAY_GPT2_BPE`` (gpt2 only), else tiktoken's download.

    Raises ConfigError when none of these works (e.g. offline without a BPE file).
    """
    if bpe_file is None and name == "gpt2" and os.environ.get(BPE_ENV):
        bpe_file = os.environ[BPE_ENV]
    tok = Tokenizer(name, None if bpe_file is None else str(Path(bpe_file).resolve()))
    _ = tok.encoding  # fail here, not later in a worker
    return tok
