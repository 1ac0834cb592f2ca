"""Search spaces as data: the choices of a space, and everything done with architectures.

A space file (``spaces/*.yaml``) names its model family (``model:``), the family's fixed settings and the
choices; ``tangle_ray.models.load_space`` reads it, checks it against the family's schema and returns a
``SearchSpace``. This module knows no family: the family object is handed to the space, which asks it for
parameter counts and FLOPs.

An architecture is a plain dict (and the same JSON on disk): global choices as scalars, per-layer choices as
lists over the maximum number of layers, for example
``{"n_layer": 6, "n_embd": 576, "n_head": [8, 6, 12, 8, 6, 8, 12], "mlp_ratio": [4, 3, 2, 4, 4, 3, 2]}``.
Entries of layers beyond the depth are carried along but have no effect.

Depth is one choice (``depth_dims`` of one name: the first ``depth`` layers are active) or one choice per stage
(MobileNetV3: the layers form consecutive stages, stage ``s`` holds as many as its depth choice's largest value,
and its first ``arch[depth_dims[s]]`` are active); ``active_layers`` says which, and everything below counts,
keys, mutates and prints the active layers only.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import torch

from tangle_ray.configs import read_json
from tangle_ray.errors import ConfigError, shorten

Arch = dict[str, Any]
Choice = Union[int, float]


@dataclass(frozen=True)
class Dim:
    """One architectural choice: its name, the allowed values and whether it is chosen per layer."""

    name: str
    values: tuple[Choice, ...]
    per_layer: bool = False

    def index(self, value: Choice) -> int:
        return self.values.index(value)

    def allows(self, value: Any) -> bool:
        """``value`` is one of the values, and an integer where every value is (``2.0`` is not ``2`` here)."""
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value not in self.values:
            return False
        return isinstance(value, int) or not all(isinstance(v, int) for v in self.values)


@dataclass
class SearchSpace:
    """A validated search space: fixed settings of the model family plus the architectural choices."""

    name: str
    model: str  # the family's name
    fixed: dict[str, Any]
    dims: dict[str, Dim]
    depth_dims: tuple[str, ...]  # the choices that set the number of layers: one, or one per stage
    family: Any = field(default=None, repr=False, compare=False)  # a tangle_ray.models ModelFamily
    description: str = ""
    source: str = field(default="<dict>", repr=False)

    # ----------------------------------------------------------------- shape of the space
    @property
    def depth_dim(self) -> str:
        """The depth choice of a space without stages (GPT, ViT)."""
        if len(self.depth_dims) != 1:
            raise AttributeError(f"space {self.name!r} has a depth per stage ({list(self.depth_dims)}), not one "
                                 "depth_dim: use active_layers")
        return self.depth_dims[0]

    @property
    def stages(self) -> list[range]:
        """The layers of each depth choice: consecutive runs of as many layers as its largest value."""
        out, start = [], 0
        for name in self.depth_dims:
            n = int(max(self.dims[name].values))
            out.append(range(start, start + n))
            start += n
        return out

    @property
    def max_layers(self) -> int:
        return sum(len(s) for s in self.stages)

    def active_layers(self, arch: Arch) -> list[int]:
        """Indices of the layers ``arch`` runs: the first ``arch[d]`` of the stage of each depth choice ``d``."""
        return [i for s, name in zip(self.stages, self.depth_dims) for i in s[: int(arch[name])]]

    @property
    def global_dims(self) -> list[Dim]:
        return [d for d in self.dims.values() if not d.per_layer]

    @property
    def layer_dims(self) -> list[Dim]:
        return [d for d in self.dims.values() if d.per_layer]

    def num_architectures(self) -> int:
        """Distinct architectures, counting only the choices of layers that are active."""
        others = math.prod(len(d.values) for d in self.global_dims if d.name not in self.depth_dims)
        per_layer = math.prod(len(d.values) for d in self.layer_dims)
        return others * math.prod(sum(per_layer ** int(n) for n in self.dims[name].values)
                                  for name in self.depth_dims)

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
        """``arch`` with every per-layer list as long as the deepest choice, if it belongs to this space;
        else a ConfigError naming the problem. Lists may stop after the active layers (as ``active`` writes
        them): the inactive rest is filled with the smallest choice, which computes nothing. With a depth per
        stage a list holds a value for every layer or for the active layers only (then in their order)."""
        if not isinstance(arch, dict):
            raise ConfigError(f"{source}: expected a dict of choices, got {type(arch).__name__}")
        unknown = sorted(map(str, set(arch) - set(self.dims)))
        missing = sorted(set(self.dims) - set(arch))
        if unknown or missing:
            raise ConfigError(
                f"{source}: keys {shorten(sorted(map(str, arch)))} do not match space {self.name!r}"
                + (f"; unknown: {shorten(unknown)}" if unknown else "")
                + (f"; missing: {missing}" if missing else "")
                + f"; allowed keys: {list(self.dims)}"
            )
        depths = {n: arch[n] if self.dims[n].allows(arch[n]) else max(self.dims[n].values) for n in self.depth_dims}
        active = self.active_layers(depths)
        depth, staged = len(active), len(self.depth_dims) > 1
        full = dict(arch)
        for d in self.dims.values():
            value = arch[d.name]
            if d.per_layer:
                if not isinstance(value, (list, tuple)) or not depth <= len(value) <= self.max_layers or (
                        staged and len(value) not in (depth, self.max_layers)):
                    per = f"layer ({self.max_layers}) or per active layer" if staged else "layer"
                    raise ConfigError(
                        f"{source}: {d.name!r} must be a list of one value per {per} ({depth} active, at most "
                        f"{self.max_layers}), got {shorten(value)}"
                    )
                if staged and len(value) < self.max_layers:  # the active layers' values, in their places
                    placed = [min(d.values)] * self.max_layers
                    for i, v in zip(active, value):
                        placed[i] = v
                    value = placed
                full[d.name] = value = list(value) + [min(d.values)] * (self.max_layers - len(value))
                for i, v in enumerate(value):
                    if not d.allows(v):
                        raise ConfigError(
                            f"{source}: {d.name}[{i}] = {shorten(v)} is not allowed; choose from {list(d.values)}"
                        )
            elif not d.allows(value):
                raise ConfigError(f"{source}: {d.name} = {shorten(value)} is not allowed; choose from {list(d.values)}")
        return full

    def key(self, arch: Arch) -> tuple:
        """A hashable identity of ``arch`` that ignores inactive layers (two archs that compute alike)."""
        active = self.active_layers(arch)
        return tuple(
            tuple(arch[d.name][i] for i in active) if d.per_layer else arch[d.name] for d in self.dims.values()
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
        old = set(self.active_layers(arch))
        for d in self.global_dims:
            if rng.random() < p_global:
                child[d.name] = rng.choice(d.values)
        new = set(self.active_layers(child))
        for d in self.layer_dims:
            for i in range(self.max_layers):
                grown = i in new and i not in old
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

    def describe(self, arch: Arch) -> str:
        """A compact one-line architecture: global choices, then the per-layer choices of active layers."""
        active = self.active_layers(arch)
        return " ".join(
            f"{k}={','.join(str(arch[k][i]) for i in active)}" if self.dims[k].per_layer else f"{k}={arch[k]}"
            for k in self.dims
        )

    def active(self, arch: Arch) -> Arch:
        """``arch`` without the entries of inactive layers (for files a person reads; ``validate`` reads it back)."""
        active = self.active_layers(arch)
        return {k: [arch[k][i] for i in active] if d.per_layer else arch[k] for k, d in self.dims.items()}

    # ----------------------------------------------------------------- asked of the model family
    def param_count(self, arch: Arch) -> int:
        return self.family.param_count(self, self.validate(arch))

    def flops(self, arch: Arch) -> int:
        """Forward FLOPs (2 per multiply-add) of one sample: a sequence of the full context, or one image."""
        return self.family.flops(self, self.validate(arch))

    def superposed_flops(self, samples: int, backward: bool = False) -> int:
        """FLOPs of one superposed pass of the supernet over ``samples`` samples (every choice at once), forward
        (and ``backward``)."""
        return self.family.superposed_flops(self, samples, backward)

    def build_supernet(self, **overrides: Any):
        """The weight-entangled ``Supernet`` of this space (``overrides`` replace fixed settings, e.g. dropout)."""
        return self.family.build_supernet(self, **overrides)


# ===================================================================== files


def read_arch(path: str | Path) -> Arch:
    """An architecture from a JSON file (arch.json, best_arch.json), read within bounds (size, depth, no NaN);
    validate it against a space after."""
    arch = read_json(path, "architecture file")
    if not isinstance(arch, dict):
        raise ConfigError(f"architecture file {shorten(str(path))}: expected a JSON object of choices, "
                          f"got {type(arch).__name__}")
    return arch


def parse_dims(raw: dict[str, Any], source: str) -> dict[str, Dim]:
    """The ``choices`` (global) and ``per_layer`` sections of a space file as dimensions."""
    dims = {}
    for section, per_layer in (("choices", False), ("per_layer", True)):
        entries = raw.get(section) or {}
        if not isinstance(entries, dict):
            raise ConfigError(f"{source}: {section!r} must map choice names to lists of values")
        for name, values in entries.items():
            dims[name] = _check_dim(name, values, per_layer, source, section)
    return dims


def space_to_dict(space: SearchSpace) -> dict[str, Any]:
    """The space as the mapping of a space file (``tangle_ray.models.space_from_dict`` reads it back)."""
    return {
        "name": space.name,
        "description": space.description,
        "model": space.model,
        "fixed": dict(space.fixed),
        "choices": {d.name: list(d.values) for d in space.global_dims},
        "per_layer": {d.name: list(d.values) for d in space.layer_dims},
    }


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
