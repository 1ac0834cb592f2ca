"""Fixtures for the data tests: a private datasets cache, the GPT-2 BPE file, a small synthetic corpus."""

from __future__ import annotations

from pathlib import Path

import datasets
import pytest

from tangle_ray.data.text.synth import write_demo_corpus

SHARED_BPE = Path(__file__).resolve().parents[2] / ".." / "shared" / "data" / "gpt2.tiktoken"


@pytest.fixture(autouse=True)
def _isolated(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Keep datasets' cache out of the home folder."""
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path_factory.mktemp("hf_cache")))
    datasets.disable_progress_bars()


@pytest.fixture(scope="session")
def bpe_file() -> str:
    """A GPT-2 BPE file given as an override: the team's shared copy where there is one, else the packaged file
    (whose sha256 the tokenizer checks against the hash tiktoken pins for gpt2)."""
    from tangle_ray.data.text.tokenizer import PACKAGED_BPE

    return str((SHARED_BPE if SHARED_BPE.is_file() else PACKAGED_BPE).resolve())


@pytest.fixture
def other_bpe_file(bpe_file: str, tmp_path: Path) -> str:
    """A copy of the GPT-2 BPE file with the ranks of two tokens swapped: a different tokenizer."""
    lines = Path(bpe_file).read_text().splitlines()
    (a, rank_a), (b, rank_b) = lines[5000].split(), lines[5001].split()
    lines[5000], lines[5001] = f"{a} {rank_b}", f"{b} {rank_a}"
    path = tmp_path / "swapped.tiktoken"
    path.write_text("\n".join(lines) + "\n")
    return str(path)


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    """A synthetic JSONL corpus: 300 training and 40 validation stories."""
    return write_demo_corpus(tmp_path / "corpus", n_train=300, n_valid=40, seed=0)
