import pickle

import pytest
import tiktoken
from tiktoken.load import load_tiktoken_bpe
from tiktoken_ext.openai_public import r50k_pat_str

from tangle_ray.data import tokenizer as tokenizer_mod
from tangle_ray.data.tokenizer import BPE_ENV, get_tokenizer
from tangle_ray.errors import ConfigError

TEXT = (
    "Once upon a time, Lily's  dog—named \"Max\"—ate 1234 cookies!\n\n  It's 3.14°C outside; naïve café, 日本語, "
    "emoji 🙂.\tTabs\r\nand <|endoftext|> as plain text.   Trailing spaces   "
)


def test_matches_tiktoken_gpt2(bpe_file):
    tok = get_tokenizer("gpt2", bpe_file=bpe_file)
    assert tok.encode("Hello world") == [15496, 995]
    assert (tok.n_vocab, tok.eot) == (50257, 50256)
    ref = tiktoken.Encoding(
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


def test_env_variable_and_pickling(bpe_file, monkeypatch):
    monkeypatch.setenv(BPE_ENV, bpe_file)
    tok = get_tokenizer()
    clone = pickle.loads(pickle.dumps(tok))
    assert clone._enc is None and len(pickle.dumps(tok)) < 500
    assert clone.encode(TEXT) == tok.encode(TEXT)
    assert clone.fingerprint == tok.fingerprint


def test_fingerprint_follows_the_vocabulary(bpe_file, other_bpe_file):
    tok = get_tokenizer(bpe_file=bpe_file)
    assert tok.fingerprint == get_tokenizer(bpe_file=bpe_file).fingerprint
    assert get_tokenizer(bpe_file=other_bpe_file).fingerprint != tok.fingerprint


def test_offline_download_failure_says_what_to_do(monkeypatch):
    def offline(name):
        raise ConnectionError("no network")

    monkeypatch.setattr(tokenizer_mod.tiktoken, "get_encoding", offline)
    monkeypatch.delenv(BPE_ENV, raising=False)
    with pytest.raises(ConfigError, match=f"bpe_file.*{BPE_ENV}"):
        get_tokenizer("gpt2")


def test_bad_tokenizer_arguments(tmp_path):
    with pytest.raises(ConfigError, match="unknown encoding 'nope'.*allowed.*gpt2"):
        get_tokenizer("nope")
    with pytest.raises(ConfigError, match="does not exist"):
        get_tokenizer(bpe_file=str(tmp_path / "missing.tiktoken"))
    junk = tmp_path / "junk.tiktoken"
    junk.write_text("this is not a bpe file\n")
    with pytest.raises(ConfigError, match="not a tiktoken BPE file"):
        get_tokenizer(bpe_file=str(junk))
    with pytest.raises(ConfigError, match="supported for"):
        get_tokenizer("cl100k_base", bpe_file=str(junk))
