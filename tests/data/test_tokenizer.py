import hashlib
import inspect
import pickle
import shutil
from pathlib import Path

import pytest
import tiktoken
from tiktoken.load import load_tiktoken_bpe
from tiktoken_ext import openai_public
from tiktoken_ext.openai_public import r50k_pat_str

from tangle_ray.data.text import tokenizer as tokenizer_mod
from tangle_ray.data.text.tokenizer import BPE_ENV, PACKAGED_BPE, PACKAGED_SHA256, get_tokenizer
from tangle_ray.errors import TangleRayError

TEXT = (
    "Once upon a time, Lily's  dog—named \"Max\"—ate 1234 cookies!\n\n  It's 3.14°C outside; naïve café, 日本語, "
    "emoji 🙂.\tTabs\r\nand <|endoftext|> as plain text.   Trailing spaces   "
)


@pytest.fixture
def offline(monkeypatch):
    """No BPE file from the environment, and no tiktoken download."""
    monkeypatch.delenv(BPE_ENV, raising=False)
    monkeypatch.setattr(tokenizer_mod.tiktoken, "get_encoding", lambda name: pytest.fail("downloaded"))


def test_gpt2_works_offline_and_matches_tiktoken(offline, bpe_file):
    tok = get_tokenizer("gpt2")  # the packaged file: no argument, no environment variable
    assert tok.bpe_file is None and tok.encode("Hello world") == [15496, 995]
    assert (tok.n_vocab, tok.eot) == (50257, 50256)
    # the packaged file is tiktoken's own r50k_base file (tiktoken pins its sha256) ...
    assert PACKAGED_SHA256 in inspect.getsource(openai_public.r50k_base)
    assert hashlib.sha256(PACKAGED_BPE.read_bytes()).hexdigest() == PACKAGED_SHA256
    ref = tiktoken.Encoding(  # ... and encodes like tiktoken's gpt2 built from an independent copy
        name="gpt2",
        pat_str=r50k_pat_str,
        mergeable_ranks=load_tiktoken_bpe(bpe_file),
        special_tokens={"<|endoftext|>": 50256},
    )
    expected = ref.encode_ordinary(TEXT)
    assert tok.encode(TEXT) == expected and 50256 not in expected
    assert tok.encode_array(TEXT).tolist() == expected
    assert tok.encode_batch([TEXT, "Hello world"]) == [expected, [15496, 995]]
    assert tok.encode_batch([TEXT, "Hello world"], num_threads=2) == [expected, [15496, 995]]
    assert tok.decode(expected) == TEXT
    same = (get_tokenizer(bpe_file=bpe_file), get_tokenizer("r50k_base"))
    assert {t.fingerprint for t in same} == {tok.fingerprint}


def test_env_variable_and_pickling(bpe_file, monkeypatch):
    monkeypatch.setenv(BPE_ENV, bpe_file)
    tok = get_tokenizer()
    assert tok.bpe_file == bpe_file
    clone = pickle.loads(pickle.dumps(tok))
    assert clone._enc is None and len(pickle.dumps(tok)) < 500
    assert clone.encode(TEXT) == tok.encode(TEXT)
    assert clone.fingerprint == tok.fingerprint


def test_override_loads_as_given_and_is_reread(offline, bpe_file, other_bpe_file, tmp_path):
    """A BPE file the user gives has no hash check (it may be a vocabulary of one's own): it loads when it
    parses as a GPT-2 vocabulary, and its fingerprint tells it apart, so prepared data is never mixed up."""
    tok, tampered = get_tokenizer(), get_tokenizer(bpe_file=other_bpe_file)  # ranks 5000 and 5001 swapped
    assert tampered.encode(tok.decode([5000])) == [5001]
    assert tampered.fingerprint != tok.fingerprint
    path = tmp_path / "vocab.tiktoken"
    shutil.copy(bpe_file, path)
    assert get_tokenizer(bpe_file=str(path)).fingerprint == tok.fingerprint
    shutil.copy(other_bpe_file, path)  # replaced at the same path (tiktoken's loader caches by path)
    assert get_tokenizer(bpe_file=str(path)).fingerprint == tampered.fingerprint


def test_packaged_file_is_checked(offline, other_bpe_file, tmp_path, monkeypatch):
    monkeypatch.setattr(tokenizer_mod, "PACKAGED_BPE", tmp_path / "gpt2.tiktoken")
    with pytest.raises(TangleRayError, match=f"cannot be read.*reinstall tangle-ray, or set {BPE_ENV}"):
        get_tokenizer()
    shutil.copy(other_bpe_file, tmp_path / "gpt2.tiktoken")  # parses, but is not the file we ship
    with pytest.raises(TangleRayError, match=f"gpt2.tiktoken'?\\) is corrupt: reinstall.*{PACKAGED_SHA256}"):
        get_tokenizer()


def test_other_encodings_download_and_say_what_to_do_offline(monkeypatch):
    def no_network(name):
        raise ConnectionError("no network")

    monkeypatch.setattr(tokenizer_mod.tiktoken, "get_encoding", no_network)
    with pytest.raises(TangleRayError, match="'cl100k_base'.*no network.*TIKTOKEN_CACHE_DIR.*'gpt2'") as info:
        get_tokenizer("cl100k_base")
    assert "--" not in str(info.value)  # no command-line flag: none fits every entry point


def test_bad_tokenizer_arguments(offline, bpe_file, tmp_path):
    with pytest.raises(TangleRayError, match="unknown encoding 'nope'.*allowed.*gpt2"):
        get_tokenizer("nope")
    with pytest.raises(TangleRayError, match="missing.tiktoken' cannot be read: No such file"):
        get_tokenizer(bpe_file=str(tmp_path / "missing.tiktoken"))
    junk = tmp_path / "junk.tiktoken"
    junk.write_text("this is not a bpe file\n")
    with pytest.raises(TangleRayError, match="junk.tiktoken' line 1 is not '<base64 token> <rank>'"):
        get_tokenizer(bpe_file=str(junk))
    short = tmp_path / "short.tiktoken"
    short.write_bytes(b"\n".join(Path(bpe_file).read_bytes().splitlines()[:100]))
    with pytest.raises(TangleRayError, match="has 100 tokens; a GPT-2 vocabulary has the ranks 0..50255"):
        get_tokenizer(bpe_file=str(short))
    with pytest.raises(TangleRayError, match="supported for"):
        get_tokenizer("cl100k_base", bpe_file=str(junk))
