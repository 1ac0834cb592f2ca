"""Search config: YAML + overrides, validation messages, recipes."""

from pathlib import Path

import pytest

from tangle_ray.errors import ConfigError
from tangle_ray.models import load_space
from tangle_ray.tune.config import load_search_config, search_config_from_dict

RECIPES = Path(__file__).resolve().parents[2] / "recipes" / "tune"
BASE = {"supernet": "sn", "data": {"dir": "data"}}


def test_defaults_are_the_paper_search():
    c = search_config_from_dict(BASE)
    e = c.evolution
    assert (c.algorithm, c.eval.split, c.random.num_trials) == ("evolution", "valid", 5000)
    assert (e.population, e.generations, e.parents, e.mutations, e.crossovers) == (50, 50, 10, 25, 25)
    assert (e.p_layer, e.p_global) == (0.2, 0.4)
    assert c.total_trials == 2500 and c.evolution_lag == c.resources.max_concurrent_trials - 1


def test_yaml_and_dotted_overrides(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text(
        "supernet: a\ndata: {dir: b}\nconstraints:\n  max_params: 30e6\n"
        "evolution:\n  population: 8\n  mutations: 4\n  crossovers: 4\n"
    )
    c = load_search_config(path, ["evolution.generations=3", "resources.gpus_per_trial=0.25", "algorithm=random"])
    assert c.constraints.max_params == 30_000_000 and isinstance(c.constraints.max_params, int)
    assert (c.evolution.population, c.evolution.generations, c.resources.gpus_per_trial) == (8, 3, 0.25)
    assert c.total_trials == c.random.num_trials


@pytest.mark.parametrize(
    "raw, words",
    [
        ({"algorithm": "bayes"}, ["algorithm", "'bayes'", "random", "evolution"]),
        ({"searcher": "random"}, ["unknown setting", "searcher", "allowed"]),
        ({"evolution": {"population": 0}}, ["evolution.population", "at least 1"]),
        ({"evolution": {"mutations": 40, "crossovers": 20}}, ["mutations", "population"]),
        ({"evolution": {"p_layer": 1.5}}, ["p_layer", "[0, 1]"]),
        (
            {"evolution": {"population": 4, "mutations": 2, "crossovers": 2},
             "resources": {"max_concurrent_trials": 8}},
            ["lag", "population"],
        ),
        ({"constraints": {"min_params": 10, "max_params": 5}}, ["min_params", "max_params"]),
        ({"random": {"num_trials": "many"}}, ["random.num_trials", "'many'", "must be an integer"]),
        ({"resources": {"cpus_per_trial": 0}}, ["cpus_per_trial", "gpus_per_trial"]),
    ],
)
def test_bad_settings_name_source_option_value_and_allowed(raw, words):
    with pytest.raises(ConfigError) as e:
        search_config_from_dict({**BASE, **raw}, "bad.yaml")
    for w in ["bad.yaml", *words]:
        assert w in str(e.value)


def test_missing_required_setting():
    with pytest.raises(ConfigError, match="missing setting.*data"):
        search_config_from_dict({"supernet": "x"})


def test_nested_type_errors_name_the_file_the_dotted_key_the_value_and_the_type(tmp_path):
    """pydantic validates the nested dataclasses; its errors still come out as one line of our own."""
    path = tmp_path / "s.yaml"
    path.write_text("supernet: a\ndata: {dir: b}\nresources: {cpus_per_trial: lots}\n")
    cases = [
        ([], f"{path}: resources.cpus_per_trial = 'lots' must be a number"),
        (["resources.cpus_per_trial=1", "evolution.lag=2.5"],
         "override evolution.lag=2.5: evolution.lag = 2.5 must be an integer"),
        (["resources.cpus_per_trial=1", "run={name: [x]}"],
         "override run={name: [x]}: run.name = ['x'] must be a string"),
        (["resources.cpus_per_trial=1", "evolution.population=0"],  # a __post_init__ check of a nested dataclass
         "override evolution.population=0: evolution.population = 0 must be at least 1"),
    ]
    for overrides, message in cases:
        with pytest.raises(ConfigError) as e:
            load_search_config(path, overrides)
        assert str(e.value) == message and "pydantic" not in str(e.value)
        assert e.value.__cause__ is None and e.value.__suppress_context__


def _conc(n: int, **resources) -> dict:
    return {"resources": {"max_concurrent_trials": n, **resources}}


def test_identity_ignores_where_and_how_fast_but_not_what():
    a = search_config_from_dict({**BASE, **_conc(3)})
    same = search_config_from_dict({**BASE, **_conc(3, cpus_per_trial=2), "run": {"name": "x"},
                                    "eval": {"batch_size": 3}})
    assert a.identity() == same.identity()
    assert a.identity() != search_config_from_dict({**BASE, **_conc(2)}).identity()  # lag 2 vs 1
    assert a.identity() == search_config_from_dict({**BASE, **_conc(5), "evolution": {"lag": 2}}).identity()
    assert a.identity() != search_config_from_dict({**BASE, **_conc(3), "seed": 1}).identity()
    assert a.identity() != search_config_from_dict({**BASE, **_conc(3), "eval": {"samples": 9}}).identity()
    rs = {**BASE, "algorithm": "random"}
    other_evolution = {"evolution": {"population": 7, "mutations": 1, "crossovers": 1}}
    assert (search_config_from_dict({**rs, **_conc(1)}).identity()
            == search_config_from_dict({**rs, **_conc(4), **other_evolution}).identity())


@pytest.mark.parametrize("recipe", sorted(RECIPES.glob("*.yaml")), ids=lambda p: p.stem)
def test_recipes_load(recipe):
    c = load_search_config(recipe)
    assert c.space is None or load_space(c.space)
