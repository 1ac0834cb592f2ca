"""Ray Tune searchers over a space's architectures: random search and asynchronous evolution.

Both suggest ``{"arch": arch, "index": i}``, where ``i`` numbers the proposals 0, 1, 2, ... They never
propose an architecture twice (identity: ``space.key``) nor one outside the constraints. All randomness
comes from the seed and counts (random search: one stream; evolution: one stream per generation), never
from timing, and ``save``/``restore`` keep the whole state, so a resumed campaign proposes what an
uninterrupted one would have.

Evolution's concurrency policy. Generation ``g`` is ``population`` new architectures with consecutive
indices ``[s_g, s_g + population)``; generation 0 is random. Generation ``g >= 1`` is bred, all at once,
when its first architecture is requested, from the top-``parents`` architectures among indices
``< s_g - lag`` (ties broken by index), after waiting only until all of those are evaluated. Architectures
still running then (the last ``lag``) only count from the next generation on. With ``lag =
max_concurrent_trials - 1`` (the default) and trials finishing roughly in order, no worker idles at a
generation boundary; a straggler older than ``lag`` makes the searcher wait for it, never guess. The
parents therefore depend on the seed, the lag and the losses, not on which trial finished first, and
every run with the same seed and lag evaluates the same architectures; with ``lag = 0`` (one trial at a
time) this is the classic generational evolution of SPOS and AutoFormer.
"""

from __future__ import annotations

import json
import logging
import math
import random
from pathlib import Path
from typing import Any

from ray.tune.search import Searcher

from tangle_ray.configs import read_json
from tangle_ray.errors import ConfigError, TangleRayError, clip
from tangle_ray.space import Arch, SearchSpace
from tangle_ray.tune.config import Constraints, EvolutionConfig, SearchConfig

log = logging.getLogger(__name__)

MAX_TRIES = 10_000  # rejection-sampling cap for one new architecture inside the constraints
STATE_FORMAT = "tangle_ray.searcher/1"
MAX_STATE_BYTES = 1 << 30


def sample_within(
    space: SearchSpace, constraints: Constraints, rng: random.Random, seen: set[tuple], tries: int = MAX_TRIES
) -> Arch | None:
    """A uniformly sampled architecture inside ``constraints`` whose key is not in ``seen``, or None."""
    for _ in range(tries):
        arch = space.sample(rng)
        if space.key(arch) not in seen and constraints.admits(space, arch):
            return arch
    return None


def check_constraints(space: SearchSpace, constraints: Constraints, seed: int = 0) -> None:
    """ConfigError unless some architecture of ``space`` satisfies ``constraints`` and sampling finds one."""
    small, large = space.smallest(), space.largest()
    ranges = {
        "params": (space.param_count(small), space.param_count(large)),
        "flops": (space.flops(small), space.flops(large)),
    }
    for what, (lo, hi) in ranges.items():
        c_lo, c_hi = getattr(constraints, f"min_{what}"), getattr(constraints, f"max_{what}")
        if (c_hi is not None and c_hi < lo) or (c_lo is not None and c_lo > hi):
            raise ConfigError(
                f"search config: constraints [{c_lo}, {c_hi}] on {what} admit no architecture of space "
                f"{space.name!r}, whose {what} range from {lo} to {hi}"
            )
    if sample_within(space, constraints, random.Random(seed), set()) is None:
        raise ConfigError(
            f"search config: none of {MAX_TRIES} random architectures of space {space.name!r} satisfies "
            f"{constraints} (params range {ranges['params']}, FLOPs {ranges['flops']}): widen the bounds"
        )


class ArchSearcher(Searcher):
    """Bookkeeping shared by both searchers: proposals and results by index, and state save/restore."""

    def __init__(
        self,
        space: SearchSpace,
        constraints: Constraints | None = None,
        seed: int = 0,
        metric: str = "loss",
        mode: str = "min",
    ):
        super().__init__(metric=metric, mode=mode)
        self.space, self.constraints, self.seed = space, constraints or Constraints(), seed
        self.archs: list[Arch] = []  # every proposal so far, by index
        self.results: dict[int, float] = {}  # index -> metric (inf-like for errored trials)
        self.suggested = 0
        self.finished = False  # True once it has proposed all it will
        self._seen: set[tuple] = set()
        self._trials: dict[str, int] = {}

    def set_search_properties(self, metric: str | None, mode: str | None, config: dict, **spec) -> bool:
        self._metric, self._mode = self._metric or metric, self._mode or mode
        return True

    def suggest(self, trial_id: str) -> dict | str | None:
        if self.suggested == len(self.archs):
            more = self._propose()
            if more is None:
                return None
            if not more:
                self.finished = True
                return Searcher.FINISHED
        i = self.suggested
        self.suggested += 1
        self._trials[trial_id] = i
        return {"arch": self.archs[i], "index": i}

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        i = self._trials.get(trial_id)
        if i is None:
            return
        value = None if error or not result else result.get(self.metric)
        worst = math.inf if self.mode == "min" else -math.inf
        try:
            value = float(value)
        except (TypeError, ValueError):
            value = worst
        self.results[i] = worst if math.isnan(value) else value  # a diverged architecture ranks last

    def ranked(self, indices) -> list[int]:
        """``indices`` best first (ties: lower index first)."""
        sign = 1.0 if self.mode == "min" else -1.0
        return sorted(indices, key=lambda i: (sign * self.results[i], i))

    def save(self, checkpoint_path: str) -> None:
        """The whole search state as JSON (Tune calls this; the name it gives ends in .pkl regardless)."""
        state = {
            "format": STATE_FORMAT, "kind": type(self).__name__, "metric": self._metric, "mode": self._mode,
            "archs": self.archs, "results": [[i, _encode(v)] for i, v in sorted(self.results.items())],
            "suggested": self.suggested, "finished": self.finished, "trials": self._trials, **self._state(),
        }
        Path(checkpoint_path).write_text(json.dumps(state, allow_nan=False) + "\n")

    def restore(self, checkpoint_path: str) -> None:
        state = read_searcher_state(checkpoint_path)
        if state["kind"] != type(self).__name__:
            raise ConfigError(f"searcher state {checkpoint_path} belongs to a {state['kind']}, not a "
                              f"{type(self).__name__}; the search's algorithm differs")
        try:
            archs = [self.space.validate(a, f"searcher state {checkpoint_path}: arch") for a in state["archs"]]
            results = {int(i): _decode(v) for i, v in state["results"]}
            trials = {str(t): int(i) for t, i in state["trials"].items()}
            indices = (*results, *trials.values())
            if not 0 <= state["suggested"] <= len(archs) or any(not 0 <= i < len(archs) for i in indices):
                raise ValueError("indices outside the proposals")
            self._load_state(state)
        except TangleRayError:
            raise
        except (KeyError, TypeError, ValueError) as e:
            raise ConfigError(f"searcher state {checkpoint_path} is malformed ({clip(str(e), 200)})") from None
        self._metric, self._mode = state["metric"], state["mode"]
        self.archs, self.results, self._trials = archs, results, trials
        self.suggested, self.finished = state["suggested"], bool(state["finished"])
        self._seen = {self.space.key(a) for a in archs}

    def _state(self) -> dict[str, Any]:
        """What a subclass adds to the saved state (plain JSON data)."""
        return {}

    def _load_state(self, state: dict[str, Any]) -> None:
        """Take back what ``_state`` saved (ValueError/KeyError/TypeError when malformed)."""

    def _add(self, arch: Arch | None) -> bool:
        """Append ``arch`` as a proposal if it is new and inside the constraints."""
        if (
            arch is None
            or self.space.key(arch) in self._seen
            or not self.constraints.admits(self.space, arch)
        ):
            return False
        self._seen.add(self.space.key(arch))
        self.archs.append(arch)
        return True

    def _propose(self) -> bool | None:
        """Append new proposals: True if some were added, False when done, None to wait for results."""
        raise NotImplementedError


class RandomSearcher(ArchSearcher):
    """``num_trials`` distinct architectures inside the constraints, choices uniform (``space.sample``)."""

    def __init__(
        self,
        space: SearchSpace,
        num_trials: int,
        constraints: Constraints | None = None,
        seed: int = 0,
        metric: str = "loss",
        mode: str = "min",
    ):
        super().__init__(space, constraints, seed, metric, mode)
        self.num_trials = num_trials
        self._rng = random.Random(seed)

    def _state(self) -> dict[str, Any]:
        version, internal, gauss = self._rng.getstate()
        return {"rng": [version, list(internal), gauss]}

    def _load_state(self, state: dict[str, Any]) -> None:
        version, internal, gauss = state["rng"]
        if not (isinstance(internal, list) and all(isinstance(x, int) and 0 <= x < 2**32 for x in internal)):
            raise ValueError("rng state must be a list of 32-bit integers")
        self._rng.setstate((version, tuple(internal), gauss))

    def _propose(self) -> bool:
        if len(self.archs) >= self.num_trials:
            return False
        if self._add(sample_within(self.space, self.constraints, self._rng, self._seen)):
            return True
        log.warning(
            "random search: no new architecture inside the constraints in %d samples; stopping after %d",
            MAX_TRIES,
            len(self.archs),
        )
        return False


class EvolutionSearcher(ArchSearcher):
    """Evolutionary search (SPOS / AutoFormer style), asynchronous as described in the module docstring."""

    def __init__(
        self,
        space: SearchSpace,
        params: EvolutionConfig | None = None,
        constraints: Constraints | None = None,
        seed: int = 0,
        lag: int = 0,
        metric: str = "loss",
        mode: str = "min",
    ):
        super().__init__(space, constraints, seed, metric, mode)
        self.params = params or EvolutionConfig()
        if not 0 <= lag < self.params.population:
            raise ConfigError(f"evolution: lag = {lag} must be in [0, population = {self.params.population})")
        self.lag = lag
        self.generation_starts: list[int] = []

    def _state(self) -> dict[str, Any]:
        return {"generation_starts": self.generation_starts}

    def _load_state(self, state: dict[str, Any]) -> None:
        starts = state["generation_starts"]
        if not (isinstance(starts, list) and all(isinstance(x, int) and x >= 0 for x in starts)):
            raise ValueError("generation_starts must be a list of indices")
        self.generation_starts = list(starts)

    def parents_for(self, start: int) -> list[int] | None:
        """Indices of the parents of the generation starting at ``start``; None while some are unevaluated."""
        known = range(max(start - self.lag, 0))
        if any(i not in self.results for i in known):
            return None
        return self.ranked(known)[: self.params.parents]

    def _propose(self) -> bool | None:
        g, p, start = len(self.generation_starts), self.params, len(self.archs)
        if g >= p.generations:
            return False
        parents = [] if g == 0 else self.parents_for(start)
        if parents is None:
            return None
        rng = random.Random(f"{self.seed}/evolution/{g}")
        if parents:
            archs = [self.archs[i] for i in parents]
            for n, make in (
                (p.mutations, lambda: self.space.mutate(rng.choice(archs), rng, p.p_layer, p.p_global)),
                (p.crossovers, lambda: self.space.crossover(rng.choice(archs), rng.choice(archs), rng)),
            ):
                goal = len(self.archs) + n
                for _ in range(10 * n):
                    if len(self.archs) == goal:
                        break
                    self._add(make())
        while len(self.archs) < start + p.population:
            if not self._add(sample_within(self.space, self.constraints, rng, self._seen)):
                break
        if len(self.archs) == start:
            log.warning("evolution: no new architecture inside the constraints; stopping after %d", start)
            return False
        self.generation_starts.append(start)
        return True


def read_searcher_state(path: str | Path) -> dict[str, Any]:
    """A searcher state file written by ``ArchSearcher.save`` (JSON; nothing in it runs code)."""
    try:
        state = read_json(path, "state", MAX_STATE_BYTES, plain=False)
        if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
            raise ValueError(f"not a {STATE_FORMAT} file")
        for key, typ in (("kind", str), ("archs", list), ("results", list), ("suggested", int), ("trials", dict)):
            if not isinstance(state.get(key), typ):
                raise ValueError(f"{key} must be a {typ.__name__}")
    except (TangleRayError, ValueError) as e:
        raise ConfigError(f"searcher state {path} cannot be read ({clip(str(e), 200)}); it was not written by "
                          "this tangle_ray (older searches saved pickles): start the search under a new name") from None
    return state


def saved_searcher_state(run_dir: str | Path) -> dict | None:
    """The state Tune last saved of the searcher of the run in ``run_dir`` (None if it saved none)."""
    files = sorted(Path(run_dir).glob(Searcher.CKPT_FILE_TMPL.format("*")))
    return read_searcher_state(files[-1]) if files else None


def _encode(value: float) -> float | str:
    return value if math.isfinite(value) else ("inf" if value > 0 else "-inf")


def _decode(value: Any) -> float:
    if value in ("inf", "-inf"):
        return float(value)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"result {value!r} is not a number")
    return float(value)


def make_searcher(config: SearchConfig, space: SearchSpace, metric: str, mode: str) -> ArchSearcher:
    """The searcher of ``config``, optimising the trials' ``metric`` in ``mode`` ("min" or "max")."""
    if config.algorithm == "random":
        return RandomSearcher(space, config.random.num_trials, config.constraints, config.seed, metric, mode)
    return EvolutionSearcher(space, config.evolution, config.constraints, config.seed, config.evolution_lag,
                             metric, mode)
