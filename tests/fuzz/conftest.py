"""Fuzzing the boundary: mutated files and options either load as valid or fail with one TangleRayError.

Each example runs under a wall-clock alarm (a hang fails it). Examples per test: ``TANGLE_RAY_FUZZ_EXAMPLES``
(default 400: 4,000 cases in CI in under a minute, a fixed sequence; e.g. 10000 for a long run, which draws
fresh random examples).
"""

from __future__ import annotations

import contextlib
import os
import resource
import signal
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import yaml
from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st

from tangle_ray.errors import TangleRayError, clip

DEFAULT_EXAMPLES = 400
EXAMPLES = int(os.environ.get("TANGLE_RAY_FUZZ_EXAMPLES", DEFAULT_EXAMPLES))
HANG_S = float(os.environ.get("TANGLE_RAY_FUZZ_HANG_S", "5"))
MEMORY = 2 << 30  # bytes an example may allocate: reading /dev/zero fails with MemoryError, not the machine
settings.register_profile(
    "fuzz", max_examples=EXAMPLES, deadline=None, derandomize=EXAMPLES <= DEFAULT_EXAMPLES, database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
)
FUZZ = settings.get_profile("fuzz")


class Hang(AssertionError):
    """An example ran longer than ``HANG_S`` seconds."""


@contextlib.contextmanager
def within(seconds: float = HANG_S) -> Iterator[None]:
    """Fail with ``Hang`` after ``seconds``, and with MemoryError beyond ``MEMORY`` more bytes of data."""

    def fire(signum, frame):
        raise Hang(f"no answer within {seconds} s")

    previous = signal.signal(signal.SIGALRM, fire)
    limits = resource.getrlimit(resource.RLIMIT_DATA)
    with open("/proc/self/status") as f:
        used = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmData:"))
    cap = used + MEMORY if limits[1] == resource.RLIM_INFINITY else min(used + MEMORY, limits[1])
    resource.setrlimit(resource.RLIMIT_DATA, (cap, limits[1]))
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        resource.setrlimit(resource.RLIMIT_DATA, limits)


def outcome(call: Callable[[], Any]) -> tuple[str, Any]:
    """("error", message) for a TangleRayError, ("ok", value) otherwise; any other exception or a hang fails."""
    try:
        with within():
            value = call()
    except TangleRayError as e:
        message = str(e)
        assert message.strip(), "an error without a message"
        assert len(message) < 2000, f"a message of {len(message)} characters: values must be shortened"
        event("refused")
        return "error", message
    except (Exception, Hang) as e:  # one short line where it happened (deep tracebacks confuse pytest)
        raise AssertionError(failure(e)) from None
    event("accepted")
    return "ok", value


def failure(e: BaseException) -> str:
    """``Type: message`` and the innermost frames, on one line."""
    frames = traceback.extract_tb(e.__traceback__)[-4:]
    where = " <- ".join(f"{Path(f.filename).name}:{f.lineno} {f.name}" for f in reversed(frames))
    return f"{type(e).__name__}: {clip(str(e), 300)} at {where}"


# ===================================================================== values and texts

NASTY_STRINGS = [
    "", " ", ".", "..", "../x", "/abs/path", "a/b", "a\\b", "a\x00b", "a\nb", "tab\there", "\x7f", "x" * 5000,
    "nan", "NaN", "inf", "-inf", "1e999", "-1", "0", "2.0", "2.5", "1e-3", "0x10", "true", "null", "~", "é",
    "/dev/zero", "/proc/self/status", "PACK", "SPREAD", "STRICT_PACK", "gpt-nano", "CPU", "GPU",
]
SPECIAL_NUMBERS = [0, -1, 1, 2, 2**31, 2**63 - 1, 2**63, 2**64, -(2**63) - 1, 10**30, 2.0, 0.5, 1.0, -0.0,
                   1e-300, 1e300, 0.9999999, 1.0000001, float("nan"), float("inf"), float("-inf")]

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.sampled_from(SPECIAL_NUMBERS),
    st.floats(allow_nan=True, allow_infinity=True), st.sampled_from(NASTY_STRINGS),
    st.text(st.characters(blacklist_categories=("Cs",)), max_size=12),
)
plausible = st.one_of(st.integers(-2, 100), st.sampled_from([2.0, 3.5, 0.1, 0.2, 0.99, 1e-3, 64, 128, 50257]))
values = st.one_of(
    plausible, scalars, st.lists(st.one_of(plausible, scalars), max_size=4),
    st.dictionaries(st.text(max_size=6), scalars, max_size=3),
)


def leaves(d: dict[str, Any], prefix: str = "") -> list[str]:
    """The dotted keys of a nested mapping (groups included)."""
    out = []
    for k, v in d.items():
        out.append(prefix + k)
        if isinstance(v, dict):
            out += leaves(v, f"{prefix}{k}.")
    return out


@st.composite
def mutated(draw, base: dict[str, Any], extra_keys: list[str] = ()) -> dict[str, Any]:
    """``base`` with a few settings replaced by nasty values, removed, or unknown ones added."""
    raw = yaml.safe_load(yaml.safe_dump(base))  # a deep copy
    keys = leaves(raw) + list(extra_keys)
    for _ in range(draw(st.integers(1, 3))):
        key = draw(st.sampled_from(keys + ["unknown_setting", "optimizer.nope"]))
        *parents, last = key.split(".")
        node = raw
        for p in parents:
            if not isinstance(node.get(p), dict):
                node[p] = {}
            node = node[p]
        if draw(st.integers(0, 9)) == 0:
            node.pop(last, None)
        elif isinstance(node.get(last), list) and node[last] and draw(st.booleans()):
            node[last][draw(st.integers(0, len(node[last]) - 1))] = draw(values)  # one element of a list
        else:
            node[last] = draw(values)
    return raw


BOMB = "a: &a [x,x,x,x,x,x,x,x,x]\n" + "".join(
    f"{chr(98 + i)}: &{chr(98 + i)} [{','.join(['*' + chr(97 + i)] * 9)}]\n" for i in range(8))


@st.composite
def file_bytes(draw, raw: Any) -> bytes:
    """``raw`` as YAML, often damaged: cut short, bytes flipped or inserted, not UTF-8, a YAML bomb, nested deep."""
    try:
        text = yaml.safe_dump(raw, allow_unicode=True).encode()
    except (yaml.YAMLError, UnicodeEncodeError):
        text = b"{}"
    kind = draw(st.sampled_from(["as is"] * 6 + ["cut", "flip", "insert", "latin1", "bomb", "deep", "alias"]))
    if kind == "cut":
        return text[: draw(st.integers(0, len(text)))]
    if kind == "flip" and text:
        i = draw(st.integers(0, len(text) - 1))
        return text[:i] + bytes([draw(st.integers(0, 255))]) + text[i + 1:]
    if kind == "insert":
        i = draw(st.integers(0, len(text)))
        return text[:i] + draw(st.binary(min_size=1, max_size=8)) + text[i:]
    if kind == "latin1":
        return text + b"\nname: caf\xe9\n"
    if kind == "bomb":
        return BOMB.encode() + text
    if kind == "deep":
        n = draw(st.sampled_from([40, 1000, 100_000]))
        return b"x: " + b"[" * n + b"]" * n + b"\n" + text
    if kind == "alias":
        return b"x: &a [*a]\n" + text
    return text


def is_finite_data(value: Any) -> bool:
    """Plain data without NaN, infinities or NUL."""
    if isinstance(value, float):
        return value == value and abs(value) != float("inf")
    if isinstance(value, str):
        return "\x00" not in value
    if isinstance(value, (list, tuple)):
        return all(is_finite_data(v) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and is_finite_data(v) for k, v in value.items())
    return value is None or isinstance(value, (bool, int))
