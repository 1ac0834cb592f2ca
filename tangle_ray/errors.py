"""The exception type for user mistakes, and ``shorten``/``clip`` for what messages quote."""

from __future__ import annotations

import reprlib
from typing import Any

SHORT = 80  # characters of a user value quoted in a message


class ConfigError(ValueError):
    """A space, run or search file, an option or a checkpoint that cannot be used as given.

    The message names the source (file or option), the offending value and what is allowed.
    """


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
