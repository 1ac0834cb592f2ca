"""The exceptions tangle_ray reports in one line, ``shorten``/``clip`` for what messages quote, and
``write_fault`` for writes the machine refused (a full disk).

Every one names what failed, the value and the fix; the CLI prints it as one line (``TangleRayError``):
``ConfigError`` (a setting, option, or run, search, space or architecture file), ``DataError`` (a data source,
a prepared data folder, or a folder tangle_ray wrote: checkpoint, export, manifest), ``StorageError`` (an object
store or shared folder that cannot be reached) and ``ClusterError`` (a Ray cluster that cannot be started,
joined, or hold the request).
"""

from __future__ import annotations

import errno
import os
import re
import reprlib
from pathlib import Path
from typing import Any

SHORT = 80  # characters of a user value quoted in a message


class TangleRayError(ValueError):
    """A problem tangle_ray reports in one line: where, the value, and what is allowed or what to do."""


class ConfigError(TangleRayError):
    """A setting, an option, or a run, search, space or architecture file that cannot be used as given."""


class DataError(TangleRayError):
    """A data source, a prepared data folder, or a folder tangle_ray wrote (checkpoint, export) that cannot be
    used: missing, truncated, corrupt, or of another kind."""


class StorageError(TangleRayError):
    """An object store or shared folder that cannot be reached, read or written."""


class ClusterError(TangleRayError):
    """A Ray cluster that cannot be started or joined, or that cannot hold what a run asks for."""


_repr = reprlib.Repr()
_repr.maxstring, _repr.maxother, _repr.maxlong = SHORT, SHORT, 40
_repr.maxlist = _repr.maxtuple = _repr.maxdict = _repr.maxset = 8
_repr.maxlevel = 3


def shorten(value: Any, limit: int = SHORT) -> str:
    """``repr(value)`` cut to about ``limit`` characters (containers, strings and huge numbers alike)."""
    try:
        text = _repr.repr(value)
    except (ValueError, RecursionError):  # e.g. an int of more digits than Python prints
        bits = value.bit_length() if isinstance(value, int) else 0
        text = f"<{type(value).__name__} of {bits} bits>" if bits else f"<{type(value).__name__}>"
    except Exception:
        text = f"<{type(value).__name__}>"
    return text if len(text) <= limit else f"{text[:limit - 3]}..."


def clip(text: str, limit: int = 300) -> str:
    """A message from elsewhere (an exception's text) on one line, cut to ``limit`` characters."""
    text = " ".join(str(text).split())
    return text if len(text) <= limit else f"{text[:limit - 3]}..."


_WRITE_FAULTS = {  # errno -> what happened, what to do about it
    errno.ENOSPC: ("disk full", "free space there"),
    errno.EDQUOT: ("disk quota exceeded", "free space there or raise the quota"),
    errno.EROFS: ("read-only file system", "mount it writable or use another folder"),
    errno.EACCES: ("permission denied", "make it writable for this user"),
}


def write_fault(error: BaseException, folder: Path) -> str | None:
    """``"disk full at FOLDER (No space left on device): free space there"`` when a write that failed for lack of
    space or permission is in ``error``'s chain (its causes, Ray Train's worker and controller failures, a
    safetensors error's "os error N"); None otherwise. The folder is the failed file's, else ``folder``."""
    todo: list[Any] = [error]
    seen: set[int] = set()
    while todo:
        e = todo.pop()
        if not isinstance(e, BaseException) or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, OSError):
            code = e.errno
        else:
            found = re.search(r"\(os error (\d+)\)", str(e))
            code = int(found.group(1)) if found else None
        if code in _WRITE_FAULTS:
            what, fix = _WRITE_FAULTS[code]
            where = Path(e.filename).parent if isinstance(e, OSError) and isinstance(e.filename, str) else folder
            return f"{what} at {where} ({os.strerror(code)}): {fix}"
        todo += [e.__cause__, getattr(e, "cause", None), getattr(e, "controller_failure", None),
                 *getattr(e, "worker_failures", {}).values()]
    return None
