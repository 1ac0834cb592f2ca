"""RandomSearcher and EvolutionSearcher driven directly (no Tune): distinctness, constraints, evolution,
timing-independence and save/restore."""

import random

import pytest

from tangle_ray.errors import ConfigError
from tangle_ray.evaluate import evaluate_arch
from tangle_ray.models import load_space, space_from_dict
from tangle_ray.space import space_to_dict
from tangle_ray.tasks import get_task
from tangle_ray.tune.config import Constraints, EvolutionConfig
from tangle_ray.tune.searchers import EvolutionSearcher, RandomSearcher, check_constraints

FINISHED = "FINISHED"


@pytest.fixture(scope="module")
def space():
    return load_space("gpt-tinystories")


def drive(searcher, objective, concurrency=1, order_seed=None, stop_after=None):
    """Run ``searcher`` like Tune: up to ``concurrency`` trials in flight, finishing first-in-first-out or,
    with ``order_seed``, in random order. Returns the results by index (the live trials at ``stop_after``)."""
    rng, live, done, n = random.Random(order_seed), {}, 0, 0
    while True:
        while len(live) < concurrency:
            config = searcher.suggest(f"t{n}")
            if config is None or config == FINISHED:
                break
            live[f"t{n}"], n = config, n + 1
        if not live:
            assert config == FINISHED
            return {i: searcher.results[i] for i in range(len(searcher.archs))}
        tid = rng.choice(sorted(live)) if order_seed is not None else min(live, key=lambda t: int(t[1:]))
        searcher.on_trial_complete(tid, {"loss": objective(live.pop(tid)["arch"])})
        done += 1
        if done == stop_after:
            return live


def distance_to(target, space):
    """A synthetic objective with a known best (0 at ``target``)."""

    def loss(arch):
        d = abs(arch["n_layer"] - target["n_layer"]) + (arch["n_embd"] != target["n_embd"])
        for name in ("n_head", "mlp_ratio"):
            d += sum(a != b for a, b in zip(arch[name][: arch["n_layer"]], target[name], strict=False))
        return float(d)

    return loss


def test_random_search_gives_n_distinct_valid_archs_inside_constraints(space):
    bounds = Constraints(min_params=40_000_000, max_params=60_000_000, max_flops=30_000_000_000)
    rs = RandomSearcher(space, 40, bounds, seed=3)
    results = drive(rs, lambda a: 0.0, concurrency=3)
    assert len(results) == 40 and rs.suggest("extra") == FINISHED
    assert len({space.key(a) for a in rs.archs}) == 40
    for a in rs.archs:
        space.validate(a)
        assert bounds.admits(space, a) and 40e6 <= space.param_count(a) <= 60e6
    assert RandomSearcher(space, 40, bounds, seed=3).suggest("x")["arch"] == rs.archs[0]
    assert RandomSearcher(space, 40, bounds, seed=4).suggest("x")["arch"] != rs.archs[0]


def test_evolution_finds_a_known_best_it_did_not_start_with(space):
    target = {"n_layer": 6, "n_embd": 576, "n_head": [6, 8, 12, 8, 6, 12], "mlp_ratio": [4, 3, 2, 2, 3, 4]}
    es = EvolutionSearcher(space, EvolutionConfig(population=50, generations=20), seed=0)
    results = drive(es, distance_to(target, space))
    assert len(results) == 1000 and len({space.key(a) for a in es.archs}) == 1000
    first = min(results[i] for i in range(50))
    best = min(results.values())
    assert best < first and best <= 1.0
    assert sum(results[i] for i in range(100, 150)) < sum(results[i] for i in range(50))


def test_evolution_improves_on_the_real_supernet(supernet, eval_samples):
    es = EvolutionSearcher(
        supernet.space,
        EvolutionConfig(population=10, generations=5, parents=3, mutations=5, crossovers=3),
        seed=0,
    )
    results = drive(es, lambda a: evaluate_arch(supernet, a, get_task("lm"), eval_samples)["loss"])
    gen = [[results[i] for i in range(g * 10, g * 10 + 10)] for g in range(5)]
    assert min(results.values()) < min(gen[0])
    assert sum(gen[-1]) < sum(gen[0])


def test_evolution_respects_constraints_and_never_repeats(space):
    bounds = Constraints(max_params=50_000_000)
    es = EvolutionSearcher(
        space,
        EvolutionConfig(population=20, generations=6, parents=4, mutations=10, crossovers=10),
        bounds,
        seed=1,
        lag=2,
    )
    drive(es, lambda a: -float(space.param_count(a)), concurrency=3)  # pushes against the bound
    assert len(es.archs) == 120 and len({space.key(a) for a in es.archs}) == 120
    assert all(space.param_count(a) <= 50_000_000 for a in es.archs)


def test_evolution_does_not_depend_on_which_trial_finishes_first(space):
    target = space.largest()
    objective = distance_to(target, space)
    params = EvolutionConfig(population=12, generations=4, parents=3, mutations=6, crossovers=4)
    runs = []
    for order_seed in (None, 1, 2):
        es = EvolutionSearcher(space, params, seed=5, lag=3)
        drive(es, objective, concurrency=4, order_seed=order_seed)
        runs.append([space.key(a) for a in es.archs])
    assert runs[0] == runs[1] == runs[2] and len(runs[0]) == 48


def test_evolution_waits_for_a_straggler_older_than_the_lag(space):
    es = EvolutionSearcher(
        space,
        EvolutionConfig(population=4, generations=2, parents=2, mutations=2, crossovers=2),
        seed=0,
        lag=1,
    )
    for i in range(4):
        assert es.suggest(f"t{i}")["index"] == i
    for i in (1, 2, 3):
        es.on_trial_complete(f"t{i}", {"loss": float(i)})
    assert es.suggest("t4") is None  # index 0 is older than the lag: generation 1 waits for it
    es.on_trial_complete("t0", {"loss": 5.0})
    assert es.suggest("t4")["index"] == 4 and es.parents_for(4) == [1, 2]


@pytest.mark.parametrize(
    "make",
    [
        lambda s: RandomSearcher(s, 30, seed=2),
        lambda s: EvolutionSearcher(
            s,
            EvolutionConfig(population=8, generations=4, parents=3, mutations=4, crossovers=3),
            seed=2,
            lag=2,
        ),
    ],
    ids=["random", "evolution"],
)
def test_save_restore_mid_campaign_gives_the_uninterrupted_result(space, tmp_path, make):
    objective = distance_to(space.largest(), space)
    reference = drive(make(space), objective, concurrency=3)
    first = make(space)
    live = drive(first, objective, concurrency=3, stop_after=13)  # three trials still in flight
    first.save(str(tmp_path / "state.pkl"))
    resumed = make(space)
    resumed.restore(str(tmp_path / "state.pkl"))
    for tid, config in live.items():  # Tune reruns the unfinished trials under their ids
        resumed.on_trial_complete(tid, {"loss": objective(config["arch"])})
    assert drive(resumed, objective, concurrency=3) == reference


def test_unsatisfiable_constraints_are_config_errors(space):
    with pytest.raises(ConfigError, match="admit no architecture.*params range"):
        check_constraints(space, Constraints(max_params=1000))
    with pytest.raises(ConfigError, match="flops"):
        check_constraints(space, Constraints(min_flops=10**15))
    deep = space_from_dict(
        {**space_to_dict(space), "choices": {"n_layer": [10, 11, 12], "n_embd": [384, 576]}}
    )
    only_smallest = Constraints(max_params=deep.param_count(deep.smallest()))  # 1 in 3**12 samples
    with pytest.raises(ConfigError, match="none of .* random architectures.*widen"):
        check_constraints(deep, only_smallest)
    check_constraints(space, Constraints(min_params=40_000_000, max_params=50_000_000))
