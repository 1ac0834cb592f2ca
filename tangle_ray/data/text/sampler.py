"""Random training windows (nanoGPT style) as a pure function of (seed, split, step, micro-batch index)."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import numpy as np
import torch

from tangle_ray.errors import ConfigError, DataError
from tangle_ray.keyed import name_key


def _check(tokens: np.ndarray, block_size: int, what: str) -> None:
    if block_size < 1:
        raise ConfigError(f"block_size={block_size} must be at least 1")
    if tokens.ndim != 1 or len(tokens) < block_size + 1:
        raise DataError(
            f"{what} has {len(tokens)} tokens; a window of block_size={block_size} needs at least {block_size + 1}"
        )


def _xy(tokens: np.ndarray, starts: np.ndarray, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    windows = tokens[starts[:, None] + np.arange(block_size + 1)]  # reads only these windows of a memmap
    return (
        torch.from_numpy(windows[:, :-1].astype(np.int64)),
        torch.from_numpy(windows[:, 1:].astype(np.int64)),
    )


class WindowSampler:
    """Micro-batches of random windows: ``x`` [micro_batch, block_size] int64, ``y`` = ``x`` shifted by one.

    ``get(step, micro_index)`` depends on nothing but ``(seed, split, step, micro_index)``: number the
    micro-batches of a global batch 0..G-1 and let rank r take r*gas .. r*gas+gas-1; the global batch is then
    the same for any number of ranks, and a resumed run sees exactly the windows it would have seen.
    """

    def __init__(self, tokens: np.ndarray, block_size: int, micro_batch: int, seed: int, split: str):
        _check(tokens, block_size, f"data split {split!r}")
        if micro_batch < 1 or seed < 0:
            raise ConfigError(f"micro_batch={micro_batch} must be >= 1 and seed={seed} >= 0")
        self.tokens, self.block_size, self.micro_batch = tokens, block_size, micro_batch
        self.seed, self.split = seed, split
        self._key = name_key(split)

    def starts(self, step: int, micro_index: int) -> np.ndarray:
        """First token position of each window of micro-batch ``micro_index`` at ``step``."""
        if step < 0 or micro_index < 0:
            raise ValueError(f"step={step} and micro_index={micro_index} must be >= 0")
        rng = np.random.default_rng(np.random.SeedSequence([self.seed, self._key, step, micro_index]))
        return rng.integers(0, len(self.tokens) - self.block_size, size=self.micro_batch)

    def get(self, step: int, micro_index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return _xy(self.tokens, self.starts(step, micro_index), self.block_size)

    def num_samples(self) -> int:
        """Distinct windows it draws from (one per start position)."""
        return len(self.tokens) - self.block_size


def eval_starts(tokens: np.ndarray, block_size: int, num_windows: int, seed: int) -> np.ndarray:
    """First token positions of a fixed set of ``num_windows`` full windows, the same for every caller with the
    same arguments.

    Windows are drawn without replacement from the tiling of the split into consecutive blocks, so they do not
    overlap; a short split gives fewer windows (at least one).
    """
    _check(tokens, block_size, "evaluation split")
    if num_windows < 1:
        raise ConfigError(f"num_windows={num_windows} must be at least 1")
    available = (len(tokens) - 1) // block_size
    rng = np.random.default_rng(np.random.SeedSequence([seed, name_key("eval")]))
    return np.sort(rng.choice(available, size=min(num_windows, available), replace=False)) * block_size


def eval_windows(
    tokens: np.ndarray, block_size: int, num_windows: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The windows of ``eval_starts`` as (x, y) tensors."""
    return _xy(tokens, eval_starts(tokens, block_size, num_windows, seed), block_size)


class EvalWindows:
    """An evaluation set (``tasks.base.EvalSet``) of fixed windows of a split, read from its memory map batch by
    batch; it pickles as the split's reader and the window starts."""

    def __init__(self, tokens: Callable[[], np.ndarray], block_size: int, starts: np.ndarray):
        self.tokens, self.block_size, self.starts = tokens, block_size, starts

    def __len__(self) -> int:
        return len(self.starts)

    def batches(self, size: int, which: Sequence[int]) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        tokens = self.tokens()
        for i in which:
            yield _xy(tokens, self.starts[i * size:(i + 1) * size], self.block_size)
