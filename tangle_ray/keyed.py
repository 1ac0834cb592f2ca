"""Keyed randomness: every random draw of a training step comes from a seed derived from what it is for.

A key is ``(run seed, step, global micro-batch index, purpose)`` (data keys put a split's ``name_key`` in
the purpose's place). Nothing in a step reads the process's global random state, so a step's result does not
depend on the number of workers, gradient accumulation, restarts or data-loader prefetching:

- ``Purpose.WEIGHT_MIX`` / ``ARCH_MIX``: the mixer's samples (DrNAS Dirichlet, GDAS Gumbel) of the weight and
  architecture phases (``keyed_generator``);
- ``Purpose.WEIGHT_FORWARD`` / ``ARCH_FORWARD``: everything torch draws inside a micro-batch's forward
  (dropout, attention dropout, drop path), under ``keyed_rng``;
- SPOS paths: ``(seed, step, path key)`` (``methods/spos.py``);
- text windows and images: ``(seed, name_key(split), step, micro index)`` (``data/text/sampler.py``,
  ``data/images/batches.py``).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from contextlib import contextmanager
from enum import IntEnum

import numpy as np
import torch


class Purpose(IntEnum):
    """What a keyed draw is for (the last element of its key)."""

    WEIGHT_MIX = 0
    ARCH_MIX = 1
    WEIGHT_FORWARD = 2
    ARCH_FORWARD = 3


def keyed_seed(*key: int) -> int:
    """A 63-bit seed from a tuple of non-negative integers (numpy's SeedSequence hashing)."""
    return int(np.random.SeedSequence([int(k) for k in key]).generate_state(1, np.uint64)[0] >> 1)


def keyed_generator(*key: int) -> torch.Generator:
    """A CPU generator seeded by ``keyed_seed(*key)``."""
    return torch.Generator().manual_seed(keyed_seed(*key))


def name_key(name: str) -> int:
    """A stable 64-bit number for a name such as a split (Python's ``hash`` differs between processes)."""
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "little")


@contextmanager
def keyed_rng(device: torch.device, *key: int) -> Iterator[None]:
    """Run the block with torch's global generators (CPU and ``device``'s) seeded by ``key``, and give the
    process its own state back afterwards."""
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices, device_type="cuda" if devices else "cpu"):
        torch.manual_seed(keyed_seed(*key))
        yield
