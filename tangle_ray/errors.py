"""The exception types for user mistakes and failed runs, and ``shorten`` for values quoted in messages."""

from __future__ import annotations

import reprlib
from typing import Any

SHORT = 80  # characters of a user value quoted in a message


class ConfigError(ValueError):
    """A space, run or search file, an option or a checkpoint that cannot be used as given.

    The message names the source (file or option), the offending value and what is allowed.
    """


class RunFailed(RuntimeError):
    """A training run or search stopped before its end; the message is one line, and rerunning resumes."""


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


def failure_line(error: BaseException) -> str:
    """One line saying why a Ray run failed: the innermost cause of ``error`` (Ray wraps worker errors)."""
    seen, root = set(), error
    while id(root) not in seen:
        seen.add(id(root))
        inner = getattr(root, "cause", None) or root.__cause__
        failures = getattr(root, "worker_failures", None)  # Ray Train V2: {rank: exception}
        if isinstance(failures, dict) and failures:
            inner = next(iter(failures.values()))
        if not isinstance(inner, BaseException):
            break
        root = inner
    lines = [ln.strip() for ln in str(root).splitlines() if ln.strip()]
    # Ray's own messages put the worker's exception last ("...ActorDiedError: The actor died ...")
    text = next((ln for ln in reversed(lines) if "Error" in ln or "died" in ln or "failure" in ln), "")
    text = text or (lines[-1] if lines else type(root).__name__)
    if not text.startswith(type(root).__name__) and ":" not in text[:40]:
        text = f"{type(root).__name__}: {text}"
    return text if len(text) <= 300 else text[:297] + "..."
