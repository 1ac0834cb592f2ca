"""Typed configs from YAML files: dataclasses built from mappings, with errors that name the setting.

Shared by run files (``train/config.py``) and search files (``search/config.py``).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from types import UnionType
from typing import Any, Union, get_args, get_origin, get_type_hints

import yaml

from tangle_ray.errors import ConfigError


VOLATILE = {"identity": False}  # field metadata: a setting that does not make a run another run


def to_dict(config: Any) -> dict[str, Any]:
    """A config as plain JSON-able data (tuples become lists)."""
    return json.loads(json.dumps(dataclasses.asdict(config)))


def identity(config: Any) -> dict[str, Any]:
    """The settings that make a run what it is, as JSON-able data: every field not marked ``VOLATILE``,
    nested configs by their own identity. A rerun with an equal identity resumes the run."""
    out = {}
    for f in dataclasses.fields(config):
        if f.metadata.get("identity", True):
            value = getattr(config, f.name)
            out[f.name] = identity(value) if dataclasses.is_dataclass(value) else json.loads(json.dumps(value))
    return out


def read_settings(path: str | Path | None, overrides: list[str] | None, kind: str) -> tuple[dict[str, Any], str]:
    """The mapping of a YAML ``kind`` file (or an empty one) with dotted ``key=value`` overrides applied,
    and the source name to put in error messages."""
    raw: dict[str, Any] = {}
    source = f"{kind} config"
    if path is not None:
        source = str(path)
        if not Path(path).is_file():
            raise ConfigError(f"{kind} file {path} does not exist")
        try:
            raw = yaml.safe_load(Path(path).read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {e}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: a {kind} file must be a mapping of settings")
    for item in overrides or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {item!r}: expected key=value, e.g. optimizer.lr=1e-3")
        set_dotted(raw, key.strip(), yaml.safe_load(value), item)
    return raw, source


def set_dotted(raw: dict[str, Any], dotted: str, value: Any, what: str = "") -> None:
    *parents, last = dotted.split(".")
    node = raw
    for p in parents:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {what or dotted!r}: {p!r} is not a group of settings")
    node[last] = value


def build(cls: type, raw: Any, source: str, generic: str, prefix: str = ""):
    """``cls(**raw)`` with nested dataclasses built recursively and every scalar checked against its type.

    Checks in ``__post_init__`` name the config ``generic`` (e.g. "run config"); that name is replaced by
    ``source`` (the file) in the error.
    """
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: {prefix.rstrip('.') or 'config'} must be a mapping, got {raw!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        raise ConfigError(f"{source}: unknown setting(s) {[prefix + u for u in unknown]}; "
                          f"allowed: {[prefix + f for f in fields]}")
    missing = [n for n, f in fields.items()
               if n not in raw and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ConfigError(f"{source}: missing setting(s) {[prefix + m for m in missing]}")
    hints = get_type_hints(cls)
    kwargs = {}
    for name, value in raw.items():
        typ = hints[name]
        kwargs[name] = (build(typ, value, source, generic, f"{prefix}{name}.") if dataclasses.is_dataclass(typ)
                        else coerce(value, typ, f"{source}: {prefix}{name}"))
    try:
        return cls(**kwargs)
    except ConfigError as e:  # a check in __post_init__: name the file instead of the generic source
        raise ConfigError(str(e).replace(generic, source, 1)) from None


def coerce(value: Any, typ: Any, where: str) -> Any:
    """Check a scalar against its annotation: ints where ints, numbers (made float) where floats."""
    is_union = get_origin(typ) in (Union, UnionType)
    if value is None:
        if is_union and type(None) in get_args(typ):
            return None
        raise ConfigError(f"{where} must not be empty")
    base = next(t for t in get_args(typ) if t is not type(None)) if is_union else typ
    if base in (int, float) and isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
        try:
            value = float(value)
        except ValueError:
            raise ConfigError(f"{where} = {value!r} must be a number") from None
    if base is int and isinstance(value, float) and value.is_integer():
        value = int(value)
    if base is bool and not isinstance(value, bool):
        raise ConfigError(f"{where} = {value!r} must be true or false")
    if base is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise ConfigError(f"{where} = {value!r} must be an integer")
    if base is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where} = {value!r} must be a number")
        return float(value)
    if base is str and not isinstance(value, str):
        raise ConfigError(f"{where} = {value!r} must be a string")
    if get_origin(base) is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(get_args(base)):
            raise ConfigError(f"{where} = {value!r} must be a list of {len(get_args(base))} numbers")
        return tuple(float(v) for v in value)
    return value
