import numpy as np
import pytest
import torch

from tangle_ray.data.text.sampler import WindowSampler, eval_windows
from tangle_ray.errors import TangleRayError

TOKENS = np.arange(10_000, dtype=np.uint16)  # token value == position: windows reveal where they start


def test_windows_are_shifted_pairs(tmp_path):
    path = tmp_path / "tokens.bin"
    TOKENS.tofile(path)
    memmap = np.memmap(path, dtype=np.uint16, mode="r")
    x, y = WindowSampler(memmap, block_size=16, micro_batch=4, seed=0, split="train").get(0, 0)
    assert x.shape == y.shape == (4, 16) and x.dtype == y.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1]) and torch.equal(y - x, torch.ones_like(x))
    assert torch.equal(x - x[:, :1], torch.arange(16).expand(4, 16))  # contiguous windows


def test_windows_are_a_pure_function_of_seed_split_step_micro_index():
    run = WindowSampler(TOKENS, 32, 8, seed=7, split="train")
    uninterrupted = [run.get(step, m)[0] for step in range(6) for m in range(4)]
    resumed = WindowSampler(TOKENS.copy(), 32, 8, seed=7, split="train")  # a restart at step 3
    assert all(torch.equal(a, resumed.get(3 + i // 4, i % 4)[0]) for i, a in enumerate(uninterrupted[12:]))
    firsts = {tuple(run.get(s, m)[0][:, 0].tolist()) for s in range(6) for m in range(4)}
    assert len(firsts) == 24  # every (step, micro index) draws different windows
    assert not torch.equal(run.get(0, 0)[0], WindowSampler(TOKENS, 32, 8, 7, "valid").get(0, 0)[0])
    assert not torch.equal(run.get(0, 0)[0], WindowSampler(TOKENS, 32, 8, 8, "train").get(0, 0)[0])


def test_global_batch_is_independent_of_the_number_of_ranks():
    micro_batches = 4  # per global batch

    def global_batch(world: int, step: int) -> torch.Tensor:
        gas = micro_batches // world
        ranks = [WindowSampler(TOKENS, 32, 2, seed=1, split="train") for _ in range(world)]
        per_rank = [torch.cat([s.get(step, r * gas + i)[0] for i in range(gas)]) for r, s in enumerate(ranks)]
        assert world == 1 or not torch.equal(per_rank[0], per_rank[1])
        return torch.cat(per_rank)

    for step in (0, 5):
        assert torch.equal(global_batch(1, step), global_batch(2, step))
        assert torch.equal(global_batch(1, step), global_batch(4, step))


def test_eval_windows_fixed_non_overlapping_and_short_splits():
    x, y = eval_windows(TOKENS, block_size=64, num_windows=20, seed=3)
    assert x.shape == (20, 64) and torch.equal(x[:, 1:], y[:, :-1])
    assert torch.equal(x, eval_windows(TOKENS.copy(), 64, 20, seed=3)[0])
    assert not torch.equal(x, eval_windows(TOKENS, 64, 20, seed=4)[0])
    starts = x[:, 0].numpy()
    assert (starts % 64 == 0).all() and (np.diff(starts) >= 64).all()
    short, _ = eval_windows(TOKENS[:200], block_size=64, num_windows=20, seed=3)
    assert short.shape == (3, 64)
    assert eval_windows(TOKENS[:65], 64, 5, seed=0)[0].shape == (1, 64)


def test_too_short_splits():
    with pytest.raises(
        TangleRayError, match="data split 'valid' has 64 tokens; a window of block_size=64 needs at least 65"
    ):
        WindowSampler(TOKENS[:64], 64, 2, seed=0, split="valid")
    with pytest.raises(TangleRayError, match="evaluation split has 10 tokens"):
        eval_windows(TOKENS[:10], 64, 4, seed=0)
