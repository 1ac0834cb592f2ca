"""Fixtures for the search tests: a trained gpt-micro supernet, prepared tokens, a local Ray cluster."""

from __future__ import annotations

import itertools
import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from tangle_ray.data.text.prepare import FORMAT_VERSION, SPLITS, load_split
from tangle_ray.data.text.sampler import eval_windows
from tangle_ray.folders import load_supernet, save_supernet
from tangle_ray.models import load_space
from tangle_ray.tasks import Samples
from tangle_ray.tune.config import SearchConfig, search_config_from_dict

VOCAB = 97  # gpt-micro
_names = itertools.count()


def markov_tokens(n: int, seed: int) -> np.ndarray:
    """Tokens of a fixed sparse Markov chain (3 likely successors per token, 10% noise): learnable."""
    successors = np.random.default_rng(0).integers(0, VOCAB, size=(VOCAB, 3))
    rng = np.random.default_rng(seed)
    pick, noise, other = rng.integers(0, 3, n), rng.random(n) < 0.1, rng.integers(0, VOCAB, n)
    out = np.zeros(n, np.int64)
    for i in range(1, n):
        out[i] = other[i] if noise[i] else successors[out[i - 1], pick[i]]
    return out


@pytest.fixture(autouse=True)
def _one_thread():
    """The CPU is shared: two threads here can be 100x slower than one."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> Path:
    """A prepared-token folder of Markov-chain tokens, written directly in the layout ``load_split`` reads."""
    out = tmp_path_factory.mktemp("tokens")
    splits = {}
    for seed, split in enumerate(SPLITS):
        tokens = markov_tokens(20_000 if split == "train" else 4_000, seed)
        (out / f"{split}.bin").write_bytes(tokens.astype(np.uint16).tobytes())
        splits[split] = {"file": f"{split}.bin", "tokens": len(tokens)}
    (out / "meta.json").write_text(
        json.dumps(
            {
                "format_version": FORMAT_VERSION,
                "dtype": "uint16",
                "vocab_size": VOCAB,
                "eot": 0,
                "splits": splits,
            }
        )
    )
    return out


@pytest.fixture(scope="session")
def supernet_dir(tmp_path_factory, data_dir) -> Path:
    """gpt-micro trained for 300 SPOS steps (Adam) on the train split, saved as a supernet folder."""
    torch.manual_seed(0)
    supernet = load_space("gpt-micro").build_supernet()
    tokens = torch.from_numpy(np.asarray(load_split(data_dir, "train"), dtype=np.int64))
    opt = torch.optim.Adam(supernet.net.parameters(), lr=1e-2)
    rng, threads = random.Random(0), torch.get_num_threads()
    torch.set_num_threads(1)
    for _ in range(300):
        starts = torch.randint(0, len(tokens) - 17, (16,))
        x = torch.stack([tokens[s : s + 16] for s in starts])
        y = torch.stack([tokens[s + 1 : s + 17] for s in starts])
        _, loss = supernet(x, y, arch=supernet.space.sample(rng))
        opt.zero_grad()
        loss.backward()
        opt.step()
    torch.set_num_threads(threads)
    return save_supernet(supernet, tmp_path_factory.mktemp("supernet") / "micro", meta={"steps": 300})


@pytest.fixture(scope="session")
def supernet(supernet_dir):
    return load_supernet(supernet_dir)


@pytest.fixture(scope="session")
def eval_samples(data_dir) -> Samples:
    """The windows a search with ``eval.samples=32, eval.seed=0`` scores architectures on."""
    return Samples(*eval_windows(load_split(data_dir, "valid"), 16, 32, 0))


@pytest.fixture
def make_config(supernet_dir, data_dir, tmp_path):
    """A function building a small SearchConfig; keyword arguments override (nested groups as dicts)."""

    def make(**overrides) -> SearchConfig:
        raw = {
            "supernet": str(supernet_dir),
            "data": {"dir": str(data_dir)},
            "eval": {"samples": 32, "batch_size": 8},
            "resources": {"max_concurrent_trials": 2},
            "run": {"storage_path": str(tmp_path / "runs"), "name": f"s{next(_names)}"},
        }
        return search_config_from_dict({**raw, **overrides})

    return make
