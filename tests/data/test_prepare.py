import json
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from tangle_ray.data.text import prepare as prepare_mod
from tangle_ray.data.text.prepare import load_split, prepare_text, read_meta, token_dtype
from tangle_ray.data.text.sources import TextSource
from tangle_ray.data.text.synth import generate_stories
from tangle_ray.data.text.tokenizer import BPE_ENV, get_tokenizer
from tangle_ray.errors import TangleRayError

SPLITS = ("train", "valid", "test")


def _docs(tokens: np.ndarray, eot: int) -> list[tuple[int, ...]]:
    ends = np.flatnonzero(tokens == eot)
    assert len(tokens) and ends[-1] == len(tokens) - 1, "every document ends with end-of-text"
    return [tuple(d) for d in np.split(np.asarray(tokens), ends + 1)[:-1]]


def _mtimes(out) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in out.iterdir()}


def test_tokens_splits_and_meta(corpus, tmp_path, monkeypatch):
    monkeypatch.delenv(BPE_ENV, raising=False)  # the packaged GPT-2 file, offline
    out = prepare_text(TextSource(kind="jsonl", path=str(corpus)), tmp_path / "out", seed=1)
    tok = get_tokenizer()
    meta = read_meta(out)
    assert meta["dtype"] == "uint16" and meta["vocab_size"] == 50257 and meta["eot"] == 50256
    assert meta["tokenizer"]["fingerprint"] == tok.fingerprint and meta["seed"] == 1
    assert {s: meta["splits"][s]["documents"] for s in SPLITS} == {"train": 240, "valid": 60, "test": 40}
    arrays = {s: load_split(out, s) for s in SPLITS}
    assert all(a.dtype == np.uint16 and not a.flags.writeable for a in arrays.values())
    assert {s: len(a) for s, a in arrays.items()} == {s: meta["splits"][s]["tokens"] for s in SPLITS}
    stories = generate_stories(340, seed=0)
    encoded = [tuple(tok.encode(s) + [tok.eot]) for s in stories]
    assert _docs(arrays["test"], tok.eot) == encoded[300:]  # the source's held-out split, in order
    train, valid = _docs(arrays["train"], tok.eot), _docs(arrays["valid"], tok.eot)
    assert sorted(train + valid) == sorted(encoded[:300])  # a partition of the documents ...
    assert not set(train) & set(valid)  # ... with no document in both
    again = prepare_text(TextSource(kind="jsonl", path=str(corpus)), tmp_path / "again", seed=2)
    assert _docs(load_split(again, "valid"), tok.eot) != valid  # the split follows the seed


def test_single_file_source(corpus, tmp_path):
    src = TextSource(kind="jsonl", path=str(corpus / "train.jsonl"))  # 300 stories
    one, two = prepare_text(src, tmp_path / "one", seed=1), prepare_text(src, tmp_path / "two", seed=2)
    counts = {s: read_meta(one)["splits"][s]["documents"] for s in SPLITS}
    assert counts == {"train": 216, "valid": 54, "test": 30}  # test: 10% held out; valid: 20% of the rest
    assert (one / "test.bin").read_bytes() == (two / "test.bin").read_bytes()  # the same for every seed
    assert (one / "valid.bin").read_bytes() != (two / "valid.bin").read_bytes()
    assert read_meta(one)["source"]["path"] == src.path


def test_rerun_reuses_and_changes_rebuild(corpus, tmp_path, bpe_file, other_bpe_file):
    src = TextSource(kind="jsonl", path=str(corpus))
    out = prepare_text(src, tmp_path / "out", bpe_file=bpe_file)
    first = _mtimes(out)
    assert prepare_text(src, out, bpe_file=bpe_file) == out
    assert _mtimes(out) == first  # nothing rewritten

    prepare_text(src, out, bpe_file=other_bpe_file)  # another tokenizer
    assert read_meta(out)["tokenizer"]["fingerprint"] == get_tokenizer(bpe_file=other_bpe_file).fingerprint
    second = _mtimes(out)
    assert second["meta.json"] != first["meta.json"]

    with open(corpus / "train.jsonl", "a") as f:  # changed input, same file names
        f.write(json.dumps({"text": "A new story."}) + "\n")
    prepare_text(src, out, bpe_file=other_bpe_file)
    assert _mtimes(out)["train.bin"] != second["train.bin"]
    assert sum(read_meta(out)["splits"][s]["documents"] for s in ("train", "valid")) == 301


def test_interrupted_run_leaves_nothing_loadable(corpus, tmp_path, bpe_file, monkeypatch):
    src, out = TextSource(kind="jsonl", path=str(corpus)), tmp_path / "out"
    prepare_text(src, out, bpe_file=bpe_file)  # a complete earlier run, then an interrupted rebuild
    real, calls = prepare_mod._write_parts, []

    def crash_on_second_split(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(prepare_mod, "_write_parts", crash_on_second_split)
    with pytest.raises(KeyboardInterrupt):
        prepare_text(src, out, bpe_file=bpe_file, seed=5)
    for split in SPLITS:
        with pytest.raises(TangleRayError, match="meta.json' is missing"):
            load_split(out, split)
    leftovers = sorted(p.name for p in out.iterdir())
    assert leftovers == ["test.bin", "train.bin", "valid.bin"]  # no temporary files
    monkeypatch.setattr(prepare_mod, "_write_parts", real)
    prepare_text(src, out, bpe_file=bpe_file, seed=5)
    assert read_meta(out)["seed"] == 5 and len(load_split(out, "test")) > 0


def test_concurrent_runs_build_once_and_clear_stale_temporaries(corpus, tmp_path, bpe_file, monkeypatch):
    out = tmp_path / "out"
    (out / ".prepare.tmp").mkdir(parents=True)  # left behind by a killed run
    (out / "train.bin.tmp").write_bytes(b"partial")
    real, builds = prepare_mod._build, []
    monkeypatch.setattr(prepare_mod, "_build", lambda *args: builds.append(1) or real(*args))
    src = TextSource(kind="jsonl", path=str(corpus))
    with ThreadPoolExecutor(2) as pool:
        assert list(pool.map(lambda _: prepare_text(src, out, bpe_file=bpe_file), range(2))) == [out, out]
    assert builds == [1]
    assert sorted(p.name for p in out.iterdir()) == [
        "meta.json",
        "test.bin",
        "train.bin",
        "valid.bin",
    ]


def test_parallel_tokenization_is_identical(corpus, tmp_path, bpe_file):
    src = TextSource(kind="jsonl", path=str(corpus))
    one = prepare_text(src, tmp_path / "one", bpe_file=bpe_file)
    two = prepare_text(src, tmp_path / "two", bpe_file=bpe_file, num_proc=2)
    for s in SPLITS:
        assert (one / f"{s}.bin").read_bytes() == (two / f"{s}.bin").read_bytes()


def test_load_split_rejects_bad_folders(corpus, tmp_path, bpe_file):
    with pytest.raises(TangleRayError, match="meta.json' is missing"):
        load_split(tmp_path, "train")
    out = prepare_text(TextSource(kind="jsonl", path=str(corpus)), tmp_path / "out", bpe_file=bpe_file)
    with pytest.raises(TangleRayError, match="split 'dev' is unknown; allowed: \\['train', 'valid', 'test'\\]"):
        load_split(out, "dev")
    with open(out / "valid.bin", "r+b") as f:
        f.truncate(10)
    with pytest.raises(TangleRayError, match="valid.bin' is 10 bytes, meta.json says"):
        load_split(out, "valid")
    (out / "meta.json").write_text('{"format_version": 1, "splits": {}')
    with pytest.raises(TangleRayError, match="meta.json' is corrupt"):
        load_split(out, "train")
    (out / "meta.json").write_text(json.dumps({"format_version": 1, "splits": {}, "dtype": "uint16"}))
    with pytest.raises(TangleRayError, match="meta.json' is incomplete"):
        read_meta(out)
    (out / "meta.json").write_text(json.dumps({"format_version": 0}))
    with pytest.raises(TangleRayError, match="meta.json' has format 0, not 1"):
        read_meta(out)


def test_vocabulary_too_large_and_empty_splits(corpus, tmp_path, bpe_file, monkeypatch):
    assert token_dtype(65536) == np.uint16 and token_dtype(65537) == np.uint32
    with pytest.raises(TangleRayError, match="vocabulary of 4294967297 tokens is too large for uint32"):
        token_dtype(2**32 + 1)

    class Huge:
        n_vocab = 2**32 + 1

    monkeypatch.setattr(prepare_mod, "get_tokenizer", lambda name, bpe_file: Huge())
    with pytest.raises(TangleRayError, match="too large"):
        prepare_text(TextSource(kind="jsonl", path=str(corpus)), tmp_path / "out")
    monkeypatch.undo()

    tiny = tmp_path / "tiny"
    tiny.mkdir()
    (tiny / "train.txt").write_text("One.\n\nTwo.\n")
    (tiny / "validation.txt").write_text("Three.\n")
    with pytest.raises(
        TangleRayError, match="valid_fraction=0.2 of 2 training documents leaves the valid split empty"
    ):
        prepare_text(TextSource(kind="text", path=str(tiny)), tmp_path / "out", bpe_file=bpe_file)
    with pytest.raises(TangleRayError, match="valid_fraction=1.0 must lie strictly between 0 and 1"):
        prepare_text(
            TextSource(kind="text", path=str(tiny)), tmp_path / "out", bpe_file=bpe_file, valid_fraction=1.0
        )
    assert not os.path.exists(tmp_path / "out" / "meta.json")
