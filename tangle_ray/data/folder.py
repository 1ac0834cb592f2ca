"""What both kinds of prepared data folder share: one lock that serialises their preparation.

A text folder (``data/text/prepare.py``) and an image folder (``data/images/prepare.py``) are each written under
``prepare_lock(out)``: an exclusive ``fcntl`` lock on ``.<name>.lock`` beside the folder (so it survives the
folder being swapped in whole), which also clears the temporaries ``.<name>.tmp-*`` that killed runs left. It
first checks that ``out`` can be an output folder (``names.check_output_dir``: not under /proc, /sys or /dev, not
an existing file, below a writable folder), so every preparation refuses such a path with one line.
Splits are named ``train``, ``valid`` and ``test`` in both; their random draws are keyed by
``tangle_ray.keyed.name_key``.
"""

from __future__ import annotations

import fcntl
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tangle_ray.errors import ConfigError, clip, write_fault
from tangle_ray.names import check_output_dir

SPLITS = ("train", "valid", "test")


def temporary_name(out: Path, tag: str) -> Path:
    """A temporary path beside ``out`` that ``prepare_lock`` clears if its writer is killed."""
    return out.parent / f".{out.name}.tmp-{tag}"


@contextmanager
def prepare_lock(out: Path, what: str = "data.dir") -> Iterator[None]:
    """Hold the exclusive preparation lock of folder ``out`` (waits for another preparer); on entry, remove the
    temporaries that killed preparers left beside it. ``out`` must be a folder this process can write
    (``check_output_dir``; a ConfigError naming ``what``, the path and the fix otherwise)."""
    check_output_dir(out, what)  # the lock and temporaries stay beside ``out`` as given (a link is not followed)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        lock = open(out.parent / f".{out.name}.lock", "a")
    except OSError as e:  # a folder made or changed by someone else meanwhile, a full disk, permissions
        fault = write_fault(e, out.parent) or f"cannot write beside {out} ({clip(e.strerror or str(e), 200)})"
        raise ConfigError(f"{what} = {str(out)!r}: {fault}; give another folder") from None
    with lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        for stale in out.parent.glob(f".{out.name}.tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
        yield
