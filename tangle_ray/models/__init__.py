"""Model families: one module each, registered on import; loading space files and exported models.

Adding a family is one new module in this package: subclass ``ModelFamily``, decorate it with ``register``
and put its space files in ``spaces/``. Every module here is imported when the package is, so its family is
known to ``load_space`` and ``load_model`` without any other edit.
"""

from __future__ import annotations

import importlib
import pkgutil
from pathlib import Path
from typing import Any

from torch import nn

from tangle_ray.configs import check_space_bounds, check_space_size, is_file, read_yaml
from tangle_ray.errors import ConfigError, shorten
from tangle_ray.models.registry import (
    FAMILIES,
    REQUIRED,
    ModelFamily,
    Setting,
    check_model_folder,
    get_family,
    register,
)
from tangle_ray.names import check_name
from tangle_ray.space import SearchSpace, parse_dims

__all__ = [
    "FAMILIES", "ModelFamily", "Setting", "available_spaces", "check_model_folder", "get_family", "load_model",
    "load_space", "register", "space_from_dict", "spaces_dir",
]

for _module in pkgutil.iter_modules(__path__):
    if _module.name != "registry":
        importlib.import_module(f"{__name__}.{_module.name}")

_TOP_KEYS = {"name", "description", "model", "fixed", "choices", "per_layer"}


def spaces_dir() -> Path:
    """The folder of the space files shipped with tangle_ray (the repository's ``spaces/``, linked into the
    package as ``tangle_ray/spaces`` so that a wheel carries it)."""
    return Path(__file__).resolve().parent.parent / "spaces"


def available_spaces() -> list[str]:
    return sorted(p.stem for p in spaces_dir().glob("*.yaml"))


def load_space(name_or_path: str | Path) -> SearchSpace:
    """Load a space by name (a file in ``spaces/``) or by path, and check it against its family."""
    path = Path(name_or_path)
    if not path.suffix:
        path = spaces_dir() / f"{check_name(str(name_or_path), 'space')}.yaml"
    if not is_file(path):
        raise ConfigError(f"space {shorten(str(name_or_path))}: no such file; known spaces: {available_spaces()}")
    return space_from_dict(read_yaml(path, "space file"), source=str(path))


def space_from_dict(raw: Any, source: str = "<dict>") -> SearchSpace:
    """A space from the mapping of a space file, checked against the schema of the family it names."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: a space file must be a mapping with keys {sorted(_TOP_KEYS)}")
    unknown = sorted(set(raw) - _TOP_KEYS)
    if unknown:
        raise ConfigError(f"{source}: unknown key(s) {unknown}; allowed: {sorted(_TOP_KEYS)}")
    for key in ("name", "model", "fixed", "choices"):
        if key not in raw:
            raise ConfigError(f"{source}: missing key {key!r}")
    family = get_family(raw["model"], source)
    dims = parse_dims(raw, source)
    fixed = _check_fixed(family, raw["fixed"], source)
    schema, depth_dims = _space_dims(family, fixed, source)
    _check_dims(family, schema, depth_dims, dims, source)
    space = SearchSpace(
        name=str(raw["name"]), model=family.name, fixed=fixed, dims=dims, depth_dims=depth_dims, family=family,
        description=str(raw.get("description", "")), source=source,
    )
    check_space_bounds(space)
    family.check(space)
    check_space_size(space)
    return space


def load_model(folder: str | Path) -> nn.Module:
    """The standalone model in an exported model folder, of whichever family its ``config.json`` names."""
    path = Path(folder)
    config = check_model_folder(path)
    return get_family(config.get("model"), f"model folder {path}: config.json").load_model(path)


def _space_dims(family: ModelFamily, fixed: dict[str, Any], source: str) -> tuple[dict[str, bool], tuple[str, ...]]:
    """The choices of a ``family`` space with these (checked) fixed settings, name -> chosen per layer, and its
    depth choices: the family's ``dims`` and ``depth_dim``, or, for a family whose number of stages is a fixed
    setting (one depth choice per stage), what its ``stage_dims(fixed, source)`` says."""
    stage_dims = getattr(family, "stage_dims", None)
    if stage_dims is not None:
        return stage_dims(fixed, source)
    return family.dims, (family.depth_dim,)


def _check_fixed(family: ModelFamily, fixed: Any, source: str) -> dict[str, Any]:
    schema = family.fixed
    if not isinstance(fixed, dict):
        raise ConfigError(f"{source}: 'fixed' must be a mapping with keys {list(schema)}")
    unknown = sorted(set(fixed) - set(schema))
    missing = sorted(k for k, s in schema.items() if k not in fixed and s.default is REQUIRED)
    if unknown or missing:
        raise ConfigError(
            f"{source}: fixed settings {sorted(fixed)} do not match a {family.name} space ({list(schema)})"
            + (f"; unknown: {unknown}" if unknown else "") + (f"; missing: {missing}" if missing else "")
        )
    out = {}
    for key, setting in schema.items():
        value, typ = fixed.get(key, setting.default), setting.type
        ok = isinstance(value, typ) and not (typ is int and isinstance(value, bool))
        if typ is float and isinstance(value, int) and not isinstance(value, bool):
            value, ok = float(value), True
        if not ok:
            raise ConfigError(f"{source}: fixed.{key} = {shorten(value)} must be of type {typ.__name__}")
        out[key] = value
    return out


def _check_dims(family: ModelFamily, schema: dict[str, bool], depth_dims: tuple[str, ...], dims: dict,
                source: str) -> None:
    for name, per_layer in schema.items():
        where = "per_layer" if per_layer else "choices"
        if name not in dims:
            raise ConfigError(
                f"{source}: missing choice {where}.{name} (a {family.name} space needs {list(schema)})"
            )
        if dims[name].per_layer != per_layer:
            raise ConfigError(f"{source}: {name!r} belongs under {where!r}")
    unknown = sorted(set(dims) - set(schema))
    if unknown:
        raise ConfigError(f"{source}: unknown choice(s) {unknown}; a {family.name} space has {list(schema)}")
    for name in dict.fromkeys((*family.integer_dims, *depth_dims)):  # depths count layers
        bad = [v for v in dims[name].values if not isinstance(v, int)]
        if bad:
            raise ConfigError(f"{source}: {name} values {bad} must be integers")
