"""The typed configuration of an architecture search, read from a YAML search file plus overrides.

The defaults reproduce the TangleNAS language-model search: evolution with a population of 50 over
50 generations (use 20 for AutoFormer-like spaces), top-10 parents, 25 mutations (per-layer probability
0.2, global 0.4) and 25 crossovers per generation, random fill-up; random search draws 5000 architectures.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tangle_ray.configs import build, read_settings, to_dict
from tangle_ray.errors import ConfigError
from tangle_ray.space import Arch, SearchSpace

ALGORITHMS = ("random", "evolution")


@dataclass
class Constraints:
    """Bounds on the parameter count and on forward FLOPs (one sequence of ``block_size`` tokens)."""

    min_params: int | None = None
    max_params: int | None = None
    min_flops: int | None = None
    max_flops: int | None = None

    def __post_init__(self) -> None:
        for what in ("params", "flops"):
            lo, hi = getattr(self, f"min_{what}"), getattr(self, f"max_{what}")
            if lo is not None and hi is not None and lo > hi:
                raise ConfigError(f"search config: constraints.min_{what} = {lo} exceeds max_{what} = {hi}")

    def admits(self, space: SearchSpace, arch: Arch) -> bool:
        return _within(space.param_count(arch), self.min_params, self.max_params) and _within(
            space.flops(arch), self.min_flops, self.max_flops
        )


@dataclass
class EvolutionConfig:
    population: int = 50  # architectures evaluated per generation
    generations: int = 50
    parents: int = 10  # top-k of the evaluated set that breed the next generation
    mutations: int = 25
    crossovers: int = 25
    p_layer: float = 0.2  # per-layer choice mutation probability
    p_global: float = 0.4  # global choice mutation probability
    lag: int | None = None  # parents ignore the last `lag` architectures; None: max_concurrent_trials - 1

    def __post_init__(self) -> None:
        for name in ("population", "generations", "parents"):
            if getattr(self, name) < 1:
                raise ConfigError(
                    f"search config: evolution.{name} = {getattr(self, name)} must be at least 1"
                )
        if self.mutations < 0 or self.crossovers < 0 or self.mutations + self.crossovers > self.population:
            raise ConfigError(
                f"search config: evolution.mutations = {self.mutations} and crossovers = {self.crossovers} "
                f"must be >= 0 and sum to at most population = {self.population}"
            )
        for name in ("p_layer", "p_global"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ConfigError(
                    f"search config: evolution.{name} = {getattr(self, name)} must be in [0, 1]"
                )
        if self.lag is not None and not 0 <= self.lag < self.population:
            raise ConfigError(f"search config: evolution.lag = {self.lag} must be in [0, population)")


@dataclass
class SearchConfig:
    supernet: str  # a supernet folder written by `tangle-ray export` (or save_supernet)
    data_dir: str  # prepared token files (see tangle_ray.data.prepare)
    split: str = "valid"  # the architecture split
    space: str | None = None  # when given, the checkpoint's space must equal this one
    eval_windows: int = 64  # fixed windows of block_size tokens scoring every architecture
    eval_seed: int = 0
    eval_batch_size: int = 16
    algorithm: str = "evolution"
    seed: int = 0
    num_trials: int = 5000  # random search
    evolution: EvolutionConfig = field(default_factory=EvolutionConfig)
    constraints: Constraints = field(default_factory=Constraints)
    max_concurrent_trials: int = 2
    cpus_per_trial: float = 1.0
    gpus_per_trial: float = 0.0
    storage_path: str = "runs/search"
    name: str = "search"  # the output folder is storage_path/name; a rerun with the same name resumes
    verbose: int = 1  # Tune's console output: 0 silent, 1 status updates, 2 every trial

    def __post_init__(self) -> None:
        if self.algorithm not in ALGORITHMS:
            raise ConfigError(
                f"search config: algorithm = {self.algorithm!r} is not known; allowed: {list(ALGORITHMS)}"
            )
        for name in ("eval_windows", "eval_batch_size", "num_trials", "max_concurrent_trials"):
            if getattr(self, name) < 1:
                raise ConfigError(f"search config: {name} = {getattr(self, name)} must be at least 1")
        if (
            self.cpus_per_trial < 0
            or self.gpus_per_trial < 0
            or self.cpus_per_trial + self.gpus_per_trial == 0
        ):
            raise ConfigError(
                f"search config: cpus_per_trial = {self.cpus_per_trial}, "
                f"gpus_per_trial = {self.gpus_per_trial}: must be >= 0 and not both 0"
            )
        if not self.name or "/" in self.name:
            raise ConfigError(f"search config: name = {self.name!r} must be a non-empty folder name")
        lag = self.evolution_lag
        if self.algorithm == "evolution" and lag >= self.evolution.population:
            raise ConfigError(
                f"search config: evolution lag {lag} (max_concurrent_trials - 1 unless evolution.lag is set) "
                f"must be below evolution.population = {self.evolution.population}"
            )

    @property
    def evolution_lag(self) -> int:
        lag = self.evolution.lag
        return self.max_concurrent_trials - 1 if lag is None else lag

    @property
    def total_trials(self) -> int:
        e = self.evolution
        return self.num_trials if self.algorithm == "random" else e.population * e.generations

    def run_dir(self) -> Path:
        return Path(self.storage_path).resolve() / self.name

    def identity(self) -> dict[str, Any]:
        """What a resumed run must share with the run it resumes (not where results go, nor resources)."""
        d = to_dict(self)
        for volatile in (
            "storage_path",
            "name",
            "cpus_per_trial",
            "gpus_per_trial",
            "max_concurrent_trials",
            "verbose",
        ):
            d.pop(volatile)
        if self.algorithm == "random":
            d.pop("evolution")
        else:
            d.pop("num_trials")
            d["evolution"]["lag"] = self.evolution_lag  # decides the parents; concurrency itself does not
        return d


# ===================================================================== reading


def search_config_from_dict(raw: Any, source: str = "search config") -> SearchConfig:
    return build(SearchConfig, raw, source, "search config")


def load_search_config(path: str | Path | None = None, overrides: list[str] | None = None) -> SearchConfig:
    """A search file (YAML) with dotted ``key=value`` overrides (e.g. ``evolution.population=10``) on top."""
    return search_config_from_dict(*read_settings(path, overrides, "search"))


def _within(value: int, lo: int | None, hi: int | None) -> bool:
    return (lo is None or value >= lo) and (hi is None or value <= hi)
