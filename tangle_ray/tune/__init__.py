"""Stage two: search the architectures of a trained supernet on Ray Tune (random search or evolution).

Ray is imported only when a searcher or ``run_search`` is used, so evaluating stays light.
"""

from importlib import import_module

from tangle_ray.evaluate import evaluate_arch, evaluate_model, evaluate_on_split
from tangle_ray.tune.config import Constraints, EvolutionConfig, SearchConfig, load_search_config

_LAZY = {
    "run_search": "tuner",
    "SearchResult": "tuner",
    "SearchInterrupted": "tuner",
    "RandomSearcher": "searchers",
    "EvolutionSearcher": "searchers",
}

__all__ = [
    "Constraints",
    "EvolutionConfig",
    "EvolutionSearcher",
    "RandomSearcher",
    "SearchConfig",
    "SearchInterrupted",
    "SearchResult",
    "evaluate_arch",
    "evaluate_model",
    "evaluate_on_split",
    "load_search_config",
    "run_search",
]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(import_module(f"tangle_ray.tune.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
