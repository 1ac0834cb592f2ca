"""The typed configuration of a two-stage search, read from a YAML search file plus overrides.

A search file is nested like a run file: ``data:``, ``eval:``, ``random:``/``evolution:``, ``constraints:``,
``resources:`` and ``run:`` sections. Settings marked ``VOLATILE`` (where results go, resources) may change
between a search and its resume; the evolution lag they imply may not.

The defaults reproduce the TangleNAS language-model search: evolution with a population of 50 over
50 generations (use 20 for AutoFormer-like spaces), top-10 parents, 25 mutations (per-layer probability
0.2, global 0.4) and 25 crossovers per generation, random fill-up; random search draws 5000 architectures.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tangle_ray.configs import INT64, VOLATILE, build, check_range, identity, read_settings
from tangle_ray.errors import ConfigError, shorten
from tangle_ray.names import check_name
from tangle_ray.space import Arch, SearchSpace
from tangle_ray.storage import cache_path, check_uri, is_uri, join

ALGORITHMS = ("random", "evolution")


@dataclass(frozen=True)
class Constraints:
    """Bounds on the parameter count and on forward FLOPs of one sample (``SearchSpace.flops``: 2 per
    multiply-add; a paper's "FLOPs" limit is in multiply-adds (MACs): double it here)."""

    min_params: int | None = None
    max_params: int | None = None
    min_flops: int | None = None
    max_flops: int | None = None

    def __post_init__(self) -> None:
        for what in ("params", "flops"):
            lo, hi = getattr(self, f"min_{what}"), getattr(self, f"max_{what}")
            for bound, value in (("min", lo), ("max", hi)):
                if value is not None:
                    check_range(value, f"search config: constraints.{bound}_{what}", 0)
            if lo is not None and hi is not None and lo > hi:
                raise ConfigError(f"search config: constraints.min_{what} = {lo} exceeds max_{what} = {hi}")

    def admits(self, space: SearchSpace, arch: Arch) -> bool:
        return _within(space.param_count(arch), self.min_params, self.max_params) and _within(
            space.flops(arch), self.min_flops, self.max_flops
        )


@dataclass(frozen=True)
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


@dataclass(frozen=True)
class SearchData:
    dir: str  # the prepared data the supernet was trained on (see `tangle-ray data prepare`)


@dataclass(frozen=True)
class EvalConfig:
    """How every architecture is scored: a fixed set of ``samples`` of ``split`` (windows of text, images)."""

    split: str = "valid"  # the architecture split
    samples: int = 64
    seed: int = 0
    # exact sums: the batch size changes a score at float32 round-off only (kernels differ with the row count)
    batch_size: int = field(default=16, metadata=VOLATILE)


@dataclass(frozen=True)
class RandomConfig:
    num_trials: int = 5000


@dataclass(frozen=True)
class ResourcesConfig:
    max_concurrent_trials: int = 2
    cpus_per_trial: float = 1.0
    gpus_per_trial: float = 0.0


@dataclass(frozen=True)
class SearchRunConfig:
    storage_path: str = "runs/tune"
    name: str = "search"  # the output folder is storage_path/name; a rerun with the same name resumes


@dataclass(frozen=True)
class SearchConfig:
    supernet: str  # a supernet folder written by `tangle-ray export` (or save_supernet)
    data: SearchData
    space: str | None = None  # when given, the checkpoint's space must equal this one
    eval: EvalConfig = field(default_factory=EvalConfig)
    algorithm: str = "evolution"
    seed: int = 0
    random: RandomConfig = field(default_factory=RandomConfig)
    evolution: EvolutionConfig = field(default_factory=EvolutionConfig)
    constraints: Constraints = field(default_factory=Constraints)
    resources: ResourcesConfig = field(default_factory=ResourcesConfig, metadata=VOLATILE)
    run: SearchRunConfig = field(default_factory=SearchRunConfig, metadata=VOLATILE)
    verbose: int = field(default=0, metadata=VOLATILE)  # Tune's own console output (0: one line per trial)

    def __post_init__(self) -> None:
        if self.algorithm not in ALGORITHMS:
            raise ConfigError(
                f"search config: algorithm = {shorten(self.algorithm)} is not known; allowed: {list(ALGORITHMS)}"
            )
        for name, value in (("eval.samples", self.eval.samples), ("eval.batch_size", self.eval.batch_size),
                            ("random.num_trials", self.random.num_trials),
                            ("resources.max_concurrent_trials", self.resources.max_concurrent_trials)):
            if value < 1:
                raise ConfigError(f"search config: {name} = {value} must be at least 1")
        r = self.resources
        if r.cpus_per_trial < 0 or r.gpus_per_trial < 0 or r.cpus_per_trial + r.gpus_per_trial == 0:
            raise ConfigError(
                f"search config: resources.cpus_per_trial = {r.cpus_per_trial}, "
                f"resources.gpus_per_trial = {r.gpus_per_trial}: must be >= 0 and not both 0"
            )
        check_name(self.run.name, "search config: run.name")
        for name, value in (("supernet", self.supernet), ("data.dir", self.data.dir),
                            ("run.storage_path", self.run.storage_path)):
            if is_uri(value):
                check_uri(value, f"search config: {name}")
        for name, value in (("supernet", self.supernet), ("data.dir", self.data.dir),
                            ("run.storage_path", self.run.storage_path), ("eval.split", self.eval.split)):
            if not value.strip():
                raise ConfigError(f"search config: {name} must not be empty")
        check_range(self.seed, "search config: seed", 0, INT64[1])
        check_range(self.eval.seed, "search config: eval.seed", 0, INT64[1])
        check_range(self.verbose, "search config: verbose (Tune's levels)", 0, 3)
        lag = self.evolution_lag
        if self.algorithm == "evolution" and lag >= self.evolution.population:
            raise ConfigError(
                f"search config: evolution lag {lag} (resources.max_concurrent_trials - 1 unless evolution.lag "
                f"is set) must be below evolution.population = {self.evolution.population}"
            )

    @property
    def evolution_lag(self) -> int:
        lag = self.evolution.lag
        return self.resources.max_concurrent_trials - 1 if lag is None else lag

    @property
    def total_trials(self) -> int:
        e = self.evolution
        return self.random.num_trials if self.algorithm == "random" else e.population * e.generations

    def run_dir(self) -> Path:
        """The search folder: under ``run.storage_path``, or the local mirror of a folder on object storage."""
        remote = self.remote_dir()
        return cache_path(remote) if remote else Path(self.run.storage_path).resolve() / self.run.name

    def remote_dir(self) -> str | None:
        """The search folder's URI where ``run.storage_path`` is on object storage, else None."""
        return join(self.run.storage_path, self.run.name) if is_uri(self.run.storage_path) else None

    def identity(self) -> dict[str, Any]:
        """What a resumed search must share with the search it resumes (not where results go, nor resources)."""
        d = identity(self)
        if self.algorithm == "random":
            d.pop("evolution")
        else:
            d.pop("random")
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
