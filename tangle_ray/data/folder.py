"""What both kinds of prepared data folder share: one lock that serialises their preparation.

A text folder (``data/text/prepare.py``) and an image folder (``data/images/prepare.py``) are each written under
``prepare_lock(out)``: an exclusive ``fcntl`` lock on ``.<name>.lock`` beside the folder (so it survives the
folder being swapped in whole), which also clears the temporaries ``.<name>.tmp-*`` that killed runs left.
Splits are named ``train``, ``valid`` and ``test`` in both; their random draws are keyed by
``tangle_ray.keyed.name_key``.
"""

from __future__ import annotations

import fcntl
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

SPLITS = ("train", "valid", "test")


def temporary_name(out: Path, tag: str) -> Path:
    """A temporary path beside ``out`` that ``prepare_lock`` clears if its writer is killed."""
    return out.parent / f".{out.name}.tmp-{tag}"


@contextmanager
def prepare_lock(out: Path) -> Iterator[None]:
    """Hold the exclusive preparation lock of folder ``out`` (waits for another preparer); on entry, remove the
    temporaries that killed preparers left beside it."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.parent / f".{out.name}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        for stale in out.parent.glob(f".{out.name}.tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
        yield
