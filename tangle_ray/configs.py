"""Typed configs from YAML files: dataclasses built from mappings, with errors that name the setting.

Shared by run files (``train/config.py``), search files (``tune/config.py``) and space files. Every YAML or
JSON file a user hands to tangle_ray is read by ``read_yaml`` / ``read_json``, which bound what a file may
hold (size, nesting, aliases, expanded nodes) so that no file can hang or exhaust the driver.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
from pathlib import Path
from types import UnionType
from typing import Any, Union, get_args, get_origin, get_type_hints

import pydantic
import pydantic_core
import yaml
from pydantic_core import core_schema as cs

from tangle_ray.errors import ConfigError, clip, shorten

VOLATILE = {"identity": False}  # field metadata: a setting that does not make a run another run

MAX_FILE_BYTES = 1 << 20  # a run, search, space or architecture file
MAX_VALUE_CHARS = 1 << 16  # one key=value override
MAX_DEPTH = 32  # nesting of mappings and lists
MAX_NODES = 100_000  # scalars and collections, aliases expanded
MAX_ALIASES = 1_000
MAX_STRING = 4096  # characters of a string setting (a path is at most PATH_MAX)
INT64 = (-(1 << 63), (1 << 63) - 1)
MAX_PARAMS = 10**11  # parameters of the largest architecture of a space
MAX_LAYERS = 1024  # the deepest choice of a space
MAX_VALUES = 256  # values of one choice


# ===================================================================== bounded readers


def read_text(path: str | Path, what: str, limit: int = MAX_FILE_BYTES) -> str:
    """The UTF-8 text of a regular file of at most ``limit`` bytes, or a ConfigError naming it."""
    p, name = Path(path), _path_text(path)
    if "\x00" in str(path):
        raise ConfigError(f"{what} {name}: cannot read it (a path may not contain NUL)")
    if not is_file(p):  # also refuses FIFOs and devices (/dev/zero, /dev/stdin) that would hang a reader
        problem = "not a regular file" if _exists(p) else "no such file, or its name is too long"
        raise ConfigError(f"{what} {name}: cannot read it ({problem})")
    try:
        with open(p, "rb") as f:
            data = f.read(limit + 1)
    except OSError as e:
        raise ConfigError(f"{what} {name}: cannot read it ({e.strerror or e})") from None
    if len(data) > limit:
        raise ConfigError(f"{what} {name} is larger than {limit:,} bytes; a config file is far smaller")
    try:
        return data.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{what} {name}: not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start})") from None


def is_file(path: str | Path) -> bool:
    """``Path(path).is_file()``, False instead of an error for names too long or with NUL."""
    try:
        return Path(path).is_file()
    except (OSError, ValueError):
        return False


def _exists(path: Path) -> bool:
    try:
        return path.exists()
    except (OSError, ValueError):
        return False


def _path_text(path: str | Path) -> str:
    """A path as messages show it: as it is, unless it is long or holds control characters."""
    text = str(path)
    return text if len(text) <= 300 and text.isprintable() else shorten(text, 300)


def parse_yaml(text: str, source: str) -> Any:
    """``yaml.safe_load(text)`` within the bounds above; every problem is a ConfigError naming ``source``."""
    try:
        _check_bounds(text, source)
        return yaml.load(text, Loader=yaml.SafeLoader)
    except ConfigError:
        raise
    except yaml.YAMLError as e:
        raise ConfigError(f"{source}: not valid YAML: {clip(str(e), 400)}") from None
    except (ValueError, TypeError, OverflowError, RecursionError) as e:  # e.g. 2024-13-45, an int of 5000 digits
        raise ConfigError(f"{source}: a value cannot be read ({type(e).__name__}: {clip(str(e), 200)})") from None


def read_yaml(path: str | Path, what: str) -> Any:
    """The data of a YAML file (run, search, space file), bounded; errors name the file."""
    return parse_yaml(read_text(path, what), str(path))


def read_json(path: str | Path, what: str, limit: int = MAX_FILE_BYTES, plain: bool = True) -> Any:
    """The data of a JSON file of at most ``limit`` bytes; every problem a ConfigError naming it. ``plain``:
    checked as plain data (no NaN or Infinity, bounded nesting), for what a person can hand over (architecture,
    config.json, meta.json); files tangle_ray writes for itself (checkpoint states, manifests, searcher states)
    are read with ``plain=False``, since a diverged loss is recorded as it was."""
    text = read_text(path, what, limit)
    try:
        data = json.loads(text, parse_constant=_no_constant) if plain else json.loads(text)
    except (ValueError, RecursionError) as e:
        raise ConfigError(f"{what} {_path_text(path)}: not valid JSON ({clip(str(e), 200)})") from None
    return check_plain(data, f"{what} {_path_text(path)}") if plain else data


def _no_constant(name: str) -> None:
    raise ValueError(f"{name} is not a number JSON allows")


def _check_bounds(text: str, source: str) -> None:
    """Walk the YAML events once: nesting depth, aliases (no alias inside its own anchor), the number of nodes
    with every alias expanded, and no key twice in a mapping. Billion-laughs files stop here, in linear time."""
    sizes: dict[str, int] = {}  # anchor -> expanded nodes
    stack: list[list] = []  # open collections: [anchor, expanded nodes, keys seen (mappings) or None, at a key]
    expanded = aliases = 0
    for event in yaml.parse(text, Loader=yaml.SafeLoader):
        if isinstance(event, yaml.CollectionStartEvent):
            expanded += 1
            stack.append([event.anchor, 1, set() if isinstance(event, yaml.MappingStartEvent) else None, True])
            if len(stack) > MAX_DEPTH:
                raise ConfigError(f"{source}: nested deeper than {MAX_DEPTH} levels")
            continue
        if isinstance(event, yaml.CollectionEndEvent):
            anchor, n, _, _ = stack.pop()
            if anchor is not None:
                sizes[anchor] = n
        elif isinstance(event, yaml.AliasEvent):
            aliases += 1
            if event.anchor not in sizes:
                raise ConfigError(f"{source}: alias *{shorten(event.anchor)} refers to an anchor that is not "
                                  "complete (undefined, or the alias is inside it)")
            n = sizes[event.anchor]
            expanded += n
        elif isinstance(event, yaml.ScalarEvent):
            n = 1
            expanded += 1
            if event.anchor is not None:
                sizes[event.anchor] = 1
        else:
            continue
        if aliases > MAX_ALIASES or expanded > MAX_NODES:
            raise ConfigError(f"{source}: holds more than {MAX_NODES:,} values once its {aliases} aliases are "
                              f"expanded (at most {MAX_ALIASES} aliases); a config file is far smaller")
        if stack:  # the node is complete: count it in its parent; a mapping alternates keys and values
            parent = stack[-1]
            parent[1] += n
            if parent[2] is not None:
                if parent[3] and isinstance(event, yaml.ScalarEvent) and event.value != "<<":
                    if event.value in parent[2]:
                        raise ConfigError(f"{source}: key {shorten(event.value)} appears twice in one mapping "
                                          f"(line {event.start_mark.line + 1})")
                    parent[2].add(event.value)
                parent[3] = not parent[3]


def check_plain(value: Any, where: str, depth: int = 0) -> Any:
    """``value`` if it is plain JSON data: null, booleans, 64-bit integers, finite numbers, strings without NUL,
    lists and mappings with string keys, nested at most ``MAX_DEPTH`` deep."""
    if depth > MAX_DEPTH:
        raise ConfigError(f"{where}: nested deeper than {MAX_DEPTH} levels")
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{where} = {shorten(value)}: must be a finite number")
    if isinstance(value, str) and "\x00" in value:
        raise ConfigError(f"{where} = {shorten(value)}: must not contain NUL")
    if isinstance(value, int) and not isinstance(value, bool) and not INT64[0] <= value <= INT64[1]:
        raise ConfigError(f"{where} = {shorten(value)}: outside the 64-bit integer range")
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, list):
        for i, v in enumerate(value):
            check_plain(v, f"{where}[{i}]", depth + 1)
        return value
    if isinstance(value, dict):
        for k, v in value.items():
            if not isinstance(k, str):
                raise ConfigError(f"{where}: key {shorten(k)} must be a string")
            check_plain(v, f"{where}.{k}", depth + 1)
        return value
    raise ConfigError(f"{where} = {shorten(value)}: a {type(value).__name__} is not plain data "
                      "(allowed: numbers, strings, booleans, null, lists, mappings)")


# ===================================================================== configs


def to_dict(config: Any) -> dict[str, Any]:
    """A config as plain JSON-able data (tuples become lists)."""
    return json.loads(json.dumps(dataclasses.asdict(config)))


def settings_table(cls: type, prefix: str = "") -> list[tuple[str, Any]]:
    """Every setting of a config dataclass as (dotted name, default), nested configs flattened; ``MISSING``
    defaults show as 'required'."""
    rows = []
    hints = get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            rows += settings_table(hints[f.name], f"{prefix}{f.name}.")
            continue
        default = (f.default if f.default is not dataclasses.MISSING
                   else f.default_factory() if f.default_factory is not dataclasses.MISSING else "required")
        rows.append((prefix + f.name, default))
    return rows


def identity(config: Any) -> dict[str, Any]:
    """The settings that make a run what it is, as JSON-able data: every field not marked ``VOLATILE``,
    nested configs by their own identity. A rerun with an equal identity resumes the run."""
    out = {}
    for f in dataclasses.fields(config):
        if f.metadata.get("identity", True):
            value = getattr(config, f.name)
            out[f.name] = identity(value) if dataclasses.is_dataclass(value) else json.loads(json.dumps(value))
    return out


class Source(str):
    """The name a config's errors start with (its file, or e.g. "run config"), which also knows the settings that
    command-line overrides set: an error in one of those names the override instead (``of``)."""

    overrides: dict[str, str]

    def __new__(cls, name: str, overrides: dict[str, str] | None = None) -> Source:
        self = super().__new__(cls, name)
        self.overrides = dict(overrides or {})
        return self

    def of(self, dotted: str) -> str:
        """Where setting ``dotted`` came from: ``override key=value`` when an override set it (or a group above
        it), else the file."""
        parts = dotted.split(".")
        for n in range(len(parts), 0, -1):
            item = self.overrides.get(".".join(parts[:n]))
            if item is not None:
                return f"override {item if len(item) <= 120 and item.isprintable() else shorten(item, 120)}"
        return str(self)


def source_of(source: str, dotted: str) -> str:
    """``source.of(dotted)`` for a ``Source``; any other source name as it is."""
    return source.of(dotted) if isinstance(source, Source) else source


def read_settings(path: str | Path | None, overrides: list[str] | None, kind: str) -> tuple[dict[str, Any], str]:
    """The mapping of a YAML ``kind`` file (or an empty one) with dotted ``key=value`` overrides applied,
    and the source name to put in error messages (a ``Source``: errors in a setting an override set name the
    override)."""
    raw: Any = {}
    name = f"{kind} config"
    set_by: dict[str, str] = {}
    if path is not None:
        name = str(path)
        raw = read_yaml(path, f"{kind} file")
        if raw is None:
            raw = {}
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: a {kind} file must be a mapping of settings, got {type(raw).__name__}")
    for item in overrides or []:
        if not isinstance(item, str) or len(item) > MAX_VALUE_CHARS:
            raise ConfigError(f"override {shorten(item)}: expected a key=value string of at most "
                              f"{MAX_VALUE_CHARS:,} characters")
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {shorten(item)}: expected key=value, e.g. optimizer.lr=1e-3")
        set_dotted(raw, key.strip(), parse_yaml(value, f"override {shorten(item)}"), item)
        dotted = key.strip()
        set_by = {k: v for k, v in set_by.items() if not k.startswith(dotted + ".")}  # a group replaces its keys
        set_by[dotted] = item
    return raw, Source(name, set_by)


def set_dotted(raw: dict[str, Any], dotted: str, value: Any, what: str = "") -> None:
    *parents, last = dotted.split(".")
    if not all(p.strip() for p in (*parents, last)):
        raise ConfigError(f"override {shorten(what or dotted)}: {shorten(dotted)} has an empty part; "
                          "write group.setting, e.g. optimizer.lr")
    node = raw
    for p in parents:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {shorten(what or dotted)}: {p!r} is not a group of settings")
    node[last] = value


def build(cls: type, raw: Any, source: str, generic: str, prefix: str = ""):
    """Dataclass ``cls`` (nested dataclasses too) from the mapping ``raw``, validated by pydantic against its
    annotations (``_validator``); the first problem is one ConfigError naming where (the file, or the override
    that set it), the dotted key (``prefix`` first), the value and what is allowed.

    Checks in ``__post_init__`` name the config ``generic`` (e.g. "run config"); that name is replaced by
    ``source`` (the file, or the override) in the error.
    """
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: {prefix.rstrip('.') or 'config'} must be a mapping, got {shorten(raw)}")
    try:
        return _validator(cls).validate_python(raw)
    except pydantic_core.ValidationError as e:
        errors = e.errors(include_url=False)
    raise ConfigError(_message(cls, errors, source, generic, prefix)) from None


@functools.cache
def _validator(cls: type) -> pydantic_core.SchemaValidator:
    """pydantic's validator of dataclass ``cls`` (it builds the nested dataclasses and runs every
    ``__post_init__``) with ``_SCALARS`` for its scalars, lists and mappings strict (no set for a list, no
    string for a tuple), a list accepted for a tuple, and unknown keys refused."""

    def tighten(schema: Any) -> Any:
        if isinstance(schema, list):
            return [tighten(s) for s in schema]
        if not isinstance(schema, dict) or schema.get("type") in _SCALARS:
            return _SCALARS.get(schema.get("type"), schema) if isinstance(schema, dict) else schema
        out = {k: tighten(v) if k in _NESTED else v for k, v in schema.items()}
        if out["type"] in ("list", "dict", "tuple"):
            out["strict"] = True
        if out["type"] == "dataclass-args":
            out["extra_behavior"] = "forbid"
        return cs.no_info_before_validator_function(_listed, out) if out["type"] == "tuple" else out

    return pydantic_core.SchemaValidator(tighten(pydantic.TypeAdapter(cls).core_schema))


def _number(value: Any) -> Any:
    """A number written as text as that number (YAML 1.1 reads 1e-3, without a dot, as a string); an int beyond
    the floats is not finite."""
    if isinstance(value, str):
        try:
            return float(value.strip())
        except ValueError:
            return value
    if isinstance(value, int) and not isinstance(value, bool) and not -1e308 < value < 1e308:
        raise pydantic_core.PydanticCustomError("finite_number", "Input should be a finite number")
    return value


def _integral(value: Any) -> Any:
    value = _number(value)
    return int(value) if isinstance(value, float) and value.is_integer() else value  # 3.0 is 3, not 3.5


def _listed(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value  # YAML writes a tuple as a list


def _plain(value: Any) -> Any:
    try:
        return check_plain(value, "")
    except ConfigError as e:  # "[0] = nan: must be a finite number": relative to the value's own key
        raise pydantic_core.PydanticCustomError("plain_data", "{detail}", {"detail": str(e)}) from None


_SCALARS = {  # strict: no "yes" or 1 for true, no number for a string, no boolean for a number
    "bool": cs.bool_schema(strict=True),
    "int": cs.no_info_before_validator_function(_integral, cs.int_schema(strict=True, ge=INT64[0], le=INT64[1])),
    "float": cs.no_info_before_validator_function(_number, cs.float_schema(strict=True, allow_inf_nan=False)),
    "str": cs.str_schema(strict=True, max_length=MAX_STRING, pattern=r"^[^\x00]*$"),
    "any": cs.no_info_after_validator_function(_plain, cs.any_schema()),  # in mappings and lists: plain data
}
_NESTED = ("schema", "definitions", "fields", "items_schema", "keys_schema", "values_schema")
_TEXT = f"must be a string of at most {MAX_STRING} characters without NUL"
_INT64 = "is outside the 64-bit integer range"
_ALLOWED = {  # pydantic's error type -> what the setting allows
    "bool_type": "must be true or false", "int_type": "must be an integer", "float_type": "must be a number",
    "greater_than_equal": _INT64, "less_than_equal": _INT64,
    "finite_number": "must be a finite number (not NaN or infinite)", "string_type": "must be a string",
    "string_too_long": _TEXT, "string_pattern_mismatch": _TEXT, "dict_type": "must be a mapping",
    "dataclass_type": "must be a mapping", "list_type": "must be a list",
}


def _message(cls: type, errors: list[dict[str, Any]], source: str, generic: str, prefix: str) -> str:
    """pydantic's ``errors`` as one line: keys that are no strings, unknown or missing keys (all of them), else
    the first error."""

    def dotted(loc: tuple) -> str:
        return prefix + "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc).lstrip(".")

    if bad := [e["input"] for e in errors if e["type"] == "invalid_key"]:
        return f"{source}: setting names must be strings, got {shorten(bad)}"
    if unknown := [e["loc"] for e in errors if e["type"] == "unexpected_keyword_argument"]:
        group = unknown[0][:-1]
        names = sorted(dotted(loc) for loc in unknown if loc[:-1] == group)
        origins = {source_of(source, n) for n in names}
        allowed = [dotted((*group, f.name)) for f in dataclasses.fields(_type_at(cls, group))]
        return (f"{origins.pop() if len(origins) == 1 else source}: unknown setting(s) {shorten(names, 200)}; "
                f"allowed: {allowed}")
    if missing := [dotted(e["loc"]) for e in errors if e["type"] == "missing" and isinstance(e["loc"][-1], str)]:
        return f"{source}: missing setting(s) {missing}"
    kind, loc, value = errors[0]["type"], errors[0]["loc"], errors[0].get("input")
    ctx = errors[0].get("ctx", {})
    if kind in ("value_error", "assertion_error"):  # raised by __post_init__ of the dataclass at ``loc``
        return _renamed(ctx["error"], _type_at(cls, loc), source, generic, dotted(loc) + "." if loc else prefix)
    if loc and loc[-1] == "[key]":
        return f"{source_of(source, dotted(loc[:-2]))}: {dotted(loc[:-2])}: key {shorten(value)} must be a string"
    loc = loc[:-1] if kind == "missing" else loc  # an item missing from a tuple: the tuple is wrong
    name, where = dotted(loc), source_of(source, dotted(tuple(p for p in loc if isinstance(p, str))))
    if kind == "plain_data":
        return f"{where}: {name}{ctx['detail']}"
    if value is None:
        return f"{where}: {name} must not be empty"
    if kind in ("tuple_type", "too_long", "missing"):
        value, n = list(value) if isinstance(value, tuple) else value, len(get_args(_type_at(cls, loc)))
        return f"{where}: {name} = {shorten(value)} must be a list of {n} numbers"
    return f"{where}: {name} = {shorten(value)} {_ALLOWED.get(kind, errors[0]['msg'])}"


def _renamed(error: BaseException, cls: type, source: str, generic: str, prefix: str) -> str:
    """A ConfigError of ``cls.__post_init__`` with ``generic`` replaced by ``source``, or by the override that set
    the setting it names first; any other exception is raised as it is."""
    if not isinstance(error, ConfigError):
        raise error
    text = str(error)
    if text.startswith(f"{generic}: "):  # "run config: zero_stage = 7 ...": the setting named first
        first = text[len(generic) + 2:].split(" ", 1)[0].split("[", 1)[0].strip(",:;")
        if first in {f.name for f in dataclasses.fields(cls)} or "." in first:  # a dotted name is named in full
            return text.replace(generic, source_of(source, first if "." in first else prefix + first), 1)
    return text.replace(generic, source, 1)


def _type_at(cls: Any, loc: tuple) -> Any:
    """The annotation of the setting at pydantic's error location ``loc`` under dataclass ``cls``, Optional
    unwrapped."""
    typ = cls
    for part in (*loc, None):
        if get_origin(typ) in (Union, UnionType):
            typ = next(t for t in get_args(typ) if t is not type(None))
        if part is not None:
            typ = get_type_hints(typ).get(part, Any) if dataclasses.is_dataclass(typ) else Any
    return typ


def check_range(value: float, where: str, lo: float | None = None, hi: float | None = None,
                lo_open: bool = False, hi_open: bool = False) -> None:
    """ConfigError unless ``lo <= value <= hi`` (``<`` on an open side), naming the interval allowed."""
    ok = (lo is None or (value > lo if lo_open else value >= lo)) and (
        hi is None or (value < hi if hi_open else value <= hi))
    if not ok:
        left = "(" if lo_open or lo is None else "["
        right = ")" if hi_open or hi is None else "]"
        interval = f"{left}{'-inf' if lo is None else lo}, {'inf' if hi is None else hi}{right}"
        raise ConfigError(f"{where} = {shorten(value)} must be in {interval}")


def int_at_least(lo: int):
    """An argparse ``type``: an integer of at least ``lo`` (``--seed -1``, ``--stories -5`` are usage errors)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{shorten(text)} is not an integer") from None
        if not lo <= value <= INT64[1]:
            raise argparse.ArgumentTypeError(f"{value} must be an integer of at least {lo}")
        return value

    parse.__name__ = f"integer >= {lo}"
    return parse


# ===================================================================== spaces


def check_space_bounds(space: Any) -> None:
    """Before the family checks a space: every choice a finite positive number, at most ``MAX_VALUES`` values
    a choice and ``MAX_LAYERS`` layers (so that counting parameters cannot take forever)."""
    for d in space.dims.values():
        where = f"{space.source}: {'per_layer' if d.per_layer else 'choices'}.{d.name}"
        if len(d.values) > MAX_VALUES:
            raise ConfigError(f"{where} has {len(d.values)} values; at most {MAX_VALUES} are allowed")
        for v in d.values:
            if isinstance(v, float) and not math.isfinite(v):
                raise ConfigError(f"{where}: value {shorten(v)} must be a finite number")
    depth = space.max_layers  # the deepest choice, or the deepest choices of all stages together
    if depth > MAX_LAYERS:
        raise ConfigError(f"{space.source}: choices.{'+'.join(space.depth_dims)} = {shorten(depth)} layers; "
                          f"at most {MAX_LAYERS} are allowed")
    for key, value in space.fixed.items():
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{space.source}: fixed.{key} = {shorten(value)} must be a finite number")
        if isinstance(value, int) and not isinstance(value, bool) and not INT64[0] <= value <= INT64[1]:
            raise ConfigError(f"{space.source}: fixed.{key} = {shorten(value)} is outside the 64-bit range")


def check_space_size(space: Any, max_params: int = MAX_PARAMS) -> None:
    """After the family checks a space: its largest architecture has at most ``max_params`` parameters."""
    params = space.param_count(space.largest())
    if params > max_params:
        raise ConfigError(f"{space.source}: the largest architecture has {params:.3g} parameters; at most "
                          f"{max_params:.0e} are allowed (check the choices and fixed settings for a typo)")
