"""Search spaces: loading and validating space files, and everything done with architectures.

An architecture is a plain dict (and the same JSON on disk): global choices as scalars,
per-layer choices as lists over the maximum number of layers, for example
``{"n_layer": 6, "n_embd": 576, "n_head": [8, 6, 12, 8, 6, 8, 12], "mlp_ratio": [4, 3, 2, 4, 4, 3, 2]}``.
Entries of layers beyond ``n_layer`` are carried along but have no effect.
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import torch
import yaml

from tangle_ray.errors import ConfigError

Arch = dict[str, Any]
Choice = Union[int, float]

SPACES_DIR = Path(__file__).resolve().parent.parent / "spaces"
DEPTH = "n_layer"
_MODELS = ("gpt",)
_TOP_KEYS = {"name", "description", "model", "fixed", "choices", "per_layer"}
_GPT_FIXED = {"vocab_size": int, "padded_vocab_size": int, "block_size": int, "bias": bool, "dropout": float}
_GPT_DIMS = {"n_layer": False, "n_embd": False, "n_head": True, "mlp_ratio": True}


@dataclass(frozen=True)
class Dim:
    """One architectural choice: its name, the allowed values and whether it is chosen per layer."""

    name: str
    values: tuple[Choice, ...]
    per_layer: bool = False

    def index(self, value: Choice) -> int:
        return self.values.index(value)


@dataclass
class SearchSpace:
    """A validated search space: fixed settings of the model family plus the architectural choices."""

    name: str
    model: str
    fixed: dict[str, Any]
    dims: dict[str, Dim]
    description: str = ""
    source: str = field(default="<dict>", repr=False)

    # ----------------------------------------------------------------- shape of the space
    @property
    def max_layers(self) -> int:
        return int(max(self.dims[DEPTH].values))

    @property
    def global_dims(self) -> list[Dim]:
        return [d for d in self.dims.values() if not d.per_layer]

    @property
    def layer_dims(self) -> list[Dim]:
        return [d for d in self.dims.values() if d.per_layer]

    def num_architectures(self) -> int:
        """Distinct architectures, counting only the choices of layers that are active."""
        others = math.prod(len(d.values) for d in self.global_dims if d.name != DEPTH)
        per_layer = math.prod(len(d.values) for d in self.layer_dims)
        return sum(others * per_layer ** int(n) for n in self.dims[DEPTH].values)

    # ----------------------------------------------------------------- architectures
    def largest(self) -> Arch:
        return self._constant(max)

    def smallest(self) -> Arch:
        return self._constant(min)

    def _constant(self, pick) -> Arch:
        arch: Arch = {}
        for d in self.dims.values():
            v = pick(d.values)
            arch[d.name] = [v] * self.max_layers if d.per_layer else v
        return arch

    def validate(self, arch: Arch, source: str = "architecture") -> Arch:
        """Return ``arch`` if it belongs to this space, else raise a ConfigError naming the problem."""
        if not isinstance(arch, dict):
            raise ConfigError(f"{source}: expected a dict of choices, got {type(arch).__name__}")
        unknown = sorted(set(arch) - set(self.dims))
        missing = sorted(set(self.dims) - set(arch))
        if unknown or missing:
            raise ConfigError(
                f"{source}: keys {sorted(arch)} do not match space {self.name!r}"
                + (f"; unknown: {unknown}" if unknown else "")
                + (f"; missing: {missing}" if missing else "")
                + f"; allowed keys: {list(self.dims)}"
            )
        for d in self.dims.values():
            value = arch[d.name]
            if d.per_layer:
                if not isinstance(value, (list, tuple)) or len(value) != self.max_layers:
                    raise ConfigError(
                        f"{source}: {d.name!r} must be a list of {self.max_layers} values "
                        f"(one per layer up to the maximum depth), got {value!r}"
                    )
                for i, v in enumerate(value):
                    if v not in d.values:
                        raise ConfigError(
                            f"{source}: {d.name}[{i}] = {v!r} is not allowed; choose from {list(d.values)}"
                        )
            elif value not in d.values:
                raise ConfigError(f"{source}: {d.name} = {value!r} is not allowed; choose from {list(d.values)}")
        return arch

    def key(self, arch: Arch) -> tuple:
        """A hashable identity of ``arch`` that ignores inactive layers (two archs that compute alike)."""
        depth = int(arch[DEPTH])
        return tuple(
            tuple(arch[d.name][:depth]) if d.per_layer else arch[d.name] for d in self.dims.values()
        )

    def sample(self, rng: random.Random) -> Arch:
        """Each choice uniformly and independently (the SPOS path distribution)."""
        arch: Arch = {}
        for d in self.dims.values():
            if d.per_layer:
                arch[d.name] = [rng.choice(d.values) for _ in range(self.max_layers)]
            else:
                arch[d.name] = rng.choice(d.values)
        return arch

    def mutate(self, arch: Arch, rng: random.Random, p_layer: float = 0.2, p_global: float = 0.4) -> Arch:
        """Resample each per-layer choice with ``p_layer`` and each global choice with ``p_global``.

        Layers that become active when the depth grows get fresh random choices.
        """
        child = {k: list(v) if isinstance(v, list) else v for k, v in arch.items()}
        old_depth = int(arch[DEPTH])
        for d in self.global_dims:
            if rng.random() < p_global:
                child[d.name] = rng.choice(d.values)
        new_depth = int(child[DEPTH])
        for d in self.layer_dims:
            for i in range(self.max_layers):
                grown = old_depth <= i < new_depth
                if grown or rng.random() < p_layer:
                    child[d.name][i] = rng.choice(d.values)
        return child

    def crossover(self, a: Arch, b: Arch, rng: random.Random) -> Arch:
        """Uniform crossover: every choice (global and per layer) from either parent with equal odds."""
        child: Arch = {}
        for d in self.dims.values():
            if d.per_layer:
                child[d.name] = [x if rng.random() < 0.5 else y for x, y in zip(a[d.name], b[d.name])]
            else:
                child[d.name] = a[d.name] if rng.random() < 0.5 else b[d.name]
        return child

    # ----------------------------------------------------------------- architecture weights
    def arch_shapes(self) -> dict[str, tuple[int, ...]]:
        """Shape of the architecture parameters / mixing weights of each choice."""
        return {
            d.name: (self.max_layers, len(d.values)) if d.per_layer else (len(d.values),)
            for d in self.dims.values()
        }

    def one_hot(self, arch: Arch, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
        """Mixing weights that select exactly ``arch``."""
        self.validate(arch)
        out = {}
        for d in self.dims.values():
            values = arch[d.name] if d.per_layer else [arch[d.name]]
            w = torch.zeros(len(values), len(d.values), dtype=dtype)
            w[torch.arange(len(values)), torch.tensor([d.index(v) for v in values])] = 1.0
            out[d.name] = w if d.per_layer else w[0]
        return out

    def arch_from_weights(self, weights: dict[str, torch.Tensor]) -> Arch:
        """The argmax architecture of mixing weights or architecture parameters."""
        arch: Arch = {}
        for d in self.dims.values():
            idx = weights[d.name].detach().argmax(dim=-1).tolist()
            arch[d.name] = [d.values[i] for i in idx] if d.per_layer else d.values[idx]
        return arch

    # ----------------------------------------------------------------- model family
    def param_count(self, arch: Arch) -> int:
        return _family(self).param_count(self, self.validate(arch))

    def flops(self, arch: Arch, seq_len: int | None = None) -> int:
        """Forward FLOPs (2 per multiply-add) for one sequence of ``seq_len`` tokens."""
        return _family(self).flops(self, self.validate(arch), seq_len or self.fixed["block_size"])

    def build_supernet(self, **overrides: Any):
        """The weight-entangled supernet of this space (``overrides`` replace fixed settings, e.g. dropout)."""
        from tangle_ray.supernet import Supernet

        return Supernet(self, _family(self).build_net(self, **overrides))


# ===================================================================== loading


def read_arch(path: str | Path) -> Arch:
    """An architecture from a JSON file (arch.json, best_arch.json); validate it against a space after."""
    try:
        arch = json.loads(Path(path).read_text())
    except OSError as e:
        raise ConfigError(f"architecture file {path}: cannot read it ({e.strerror or e})") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"architecture file {path}: not valid JSON ({e})") from None
    if not isinstance(arch, dict):
        raise ConfigError(f"architecture file {path}: expected a JSON object of choices, got {type(arch).__name__}")
    return arch


def available_spaces() -> list[str]:
    return sorted(p.stem for p in SPACES_DIR.glob("*.yaml"))


def load_space(name_or_path: str | Path) -> SearchSpace:
    """Load a space by name (a file in ``spaces/``) or by path, and validate it."""
    path = Path(name_or_path)
    if not path.suffix:
        path = SPACES_DIR / f"{name_or_path}.yaml"
    if not path.is_file():
        raise ConfigError(
            f"space {str(name_or_path)!r}: no such file {path}; known spaces: {available_spaces()}"
        )
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    return space_from_dict(raw, source=str(path))


def space_from_dict(raw: Any, source: str = "<dict>") -> SearchSpace:
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: a space file must be a mapping with keys {sorted(_TOP_KEYS)}")
    unknown = sorted(set(raw) - _TOP_KEYS)
    if unknown:
        raise ConfigError(f"{source}: unknown key(s) {unknown}; allowed: {sorted(_TOP_KEYS)}")
    for key in ("name", "model", "fixed", "choices"):
        if key not in raw:
            raise ConfigError(f"{source}: missing key {key!r}")
    model = raw["model"]
    if model not in _MODELS:
        raise ConfigError(f"{source}: model = {model!r} is not known; allowed: {list(_MODELS)}")
    fixed = _check_fixed(raw["fixed"], source)
    dims = {}
    for section, per_layer in (("choices", False), ("per_layer", True)):
        entries = raw.get(section) or {}
        if not isinstance(entries, dict):
            raise ConfigError(f"{source}: {section!r} must map choice names to lists of values")
        for name, values in entries.items():
            dims[name] = _check_dim(name, values, per_layer, source, section)
    _check_dims_of_gpt(dims, fixed, source)
    return SearchSpace(
        name=str(raw["name"]), model=model, fixed=fixed, dims=dims,
        description=str(raw.get("description", "")), source=source,
    )


def space_to_dict(space: SearchSpace) -> dict[str, Any]:
    """The space as the mapping of a space file (``space_from_dict`` reads it back)."""
    return {
        "name": space.name,
        "description": space.description,
        "model": space.model,
        "fixed": dict(space.fixed),
        "choices": {d.name: list(d.values) for d in space.global_dims},
        "per_layer": {d.name: list(d.values) for d in space.layer_dims},
    }


def _check_fixed(fixed: Any, source: str) -> dict[str, Any]:
    if not isinstance(fixed, dict):
        raise ConfigError(f"{source}: 'fixed' must be a mapping with keys {list(_GPT_FIXED)}")
    unknown = sorted(set(fixed) - set(_GPT_FIXED))
    missing = sorted(set(_GPT_FIXED) - set(fixed))
    if unknown or missing:
        raise ConfigError(
            f"{source}: fixed settings {sorted(fixed)} do not match {list(_GPT_FIXED)}"
            + (f"; unknown: {unknown}" if unknown else "") + (f"; missing: {missing}" if missing else "")
        )
    out = {}
    for key, typ in _GPT_FIXED.items():
        value = fixed[key]
        ok = isinstance(value, typ) and not (typ is int and isinstance(value, bool))
        if typ is float and isinstance(value, int) and not isinstance(value, bool):
            value, ok = float(value), True
        if not ok:
            raise ConfigError(f"{source}: fixed.{key} = {value!r} must be of type {typ.__name__}")
        out[key] = value
    if out["padded_vocab_size"] < out["vocab_size"]:
        raise ConfigError(
            f"{source}: fixed.padded_vocab_size = {out['padded_vocab_size']} must be >= "
            f"vocab_size = {out['vocab_size']}"
        )
    for key in ("vocab_size", "block_size"):
        if out[key] < 1:
            raise ConfigError(f"{source}: fixed.{key} = {out[key]} must be positive")
    if not 0.0 <= out["dropout"] < 1.0:
        raise ConfigError(f"{source}: fixed.dropout = {out['dropout']} must be in [0, 1)")
    return out


def _check_dim(name: str, values: Any, per_layer: bool, source: str, section: str) -> Dim:
    where = f"{source}: {section}.{name}"
    if not isinstance(values, list) or not values:
        raise ConfigError(f"{where} = {values!r}: expected a non-empty list of numbers")
    for v in values:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or v <= 0:
            raise ConfigError(f"{where}: value {v!r} must be a positive number")
    if len(set(values)) != len(values):
        raise ConfigError(f"{where} = {values}: values must be distinct")
    return Dim(name, tuple(sorted(values)), per_layer)


def _check_dims_of_gpt(dims: dict[str, Dim], fixed: dict[str, Any], source: str) -> None:
    for name, per_layer in _GPT_DIMS.items():
        where = "per_layer" if per_layer else "choices"
        if name not in dims:
            raise ConfigError(f"{source}: missing choice {where}.{name} (a gpt space needs {list(_GPT_DIMS)})")
        if dims[name].per_layer != per_layer:
            raise ConfigError(f"{source}: {name!r} belongs under {where!r}")
    unknown = sorted(set(dims) - set(_GPT_DIMS))
    if unknown:
        raise ConfigError(f"{source}: unknown choice(s) {unknown}; a gpt space has {list(_GPT_DIMS)}")
    for name in ("n_layer", "n_embd", "n_head"):
        bad = [v for v in dims[name].values if not isinstance(v, int)]
        if bad:
            raise ConfigError(f"{source}: {name} values {bad} must be integers")
    max_embd = max(dims["n_embd"].values)
    for h in dims["n_head"].values:
        for e in dims["n_embd"].values:
            if e % h:
                raise ConfigError(
                    f"{source}: per_layer.n_head value {h} does not divide choices.n_embd value {e}; "
                    f"every head count must divide every embedding dim"
                )
        if max_embd % h:
            raise ConfigError(f"{source}: per_layer.n_head value {h} does not divide the largest n_embd")
    for r in dims["mlp_ratio"].values:
        for e in dims["n_embd"].values:
            if abs(r * e - round(r * e)) > 1e-9:
                raise ConfigError(
                    f"{source}: per_layer.mlp_ratio value {r} times n_embd {e} is not an integer hidden width"
                )


def _family(space: SearchSpace):
    from tangle_ray.models import gpt  # the only family so far; imported lazily to keep space.py light

    return gpt
