"""Search config: YAML + overrides, validation messages, recipes."""

from pathlib import Path

import pytest

from tangle_ray.errors import ConfigError
from tangle_ray.tune.config import load_search_config, search_config_from_dict
from tangle_ray.space import load_space

RECIPES = Path(__file__).resolve().parents[2] / "recipes" / "tune"
BASE = {"supernet": "sn", "data_dir": "data"}


def test_defaults_are_the_paper_search():
    c = search_config_from_dict(BASE)
    e = c.evolution
    assert (c.algorithm, c.split, c.num_trials) == ("evolution", "valid", 5000)
    assert (e.population, e.generations, e.parents, e.mutations, e.crossovers) == (50, 50, 10, 25, 25)
    assert (e.p_layer, e.p_global) == (0.2, 0.4)
    assert c.total_trials == 2500 and c.evolution_lag == c.max_concurrent_trials - 1


def test_yaml_and_dotted_overrides(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text(
        "supernet: a\ndata_dir: b\nconstraints:\n  max_params: 30e6\n"
        "evolution:\n  population: 8\n  mutations: 4\n  crossovers: 4\n"
    )
    c = load_search_config(path, ["evolution.generations=3", "gpus_per_trial=0.25", "algorithm=random"])
    assert c.constraints.max_params == 30_000_000 and isinstance(c.constraints.max_params, int)
    assert (c.evolution.population, c.evolution.generations, c.gpus_per_trial) == (8, 3, 0.25)
    assert c.total_trials == c.num_trials


@pytest.mark.parametrize(
    "raw, words",
    [
        ({"algorithm": "bayes"}, ["algorithm", "'bayes'", "random", "evolution"]),
        ({"searcher": "random"}, ["unknown setting", "searcher", "allowed"]),
        ({"evolution": {"population": 0}}, ["evolution.population", "at least 1"]),
        ({"evolution": {"mutations": 40, "crossovers": 20}}, ["mutations", "population"]),
        ({"evolution": {"p_layer": 1.5}}, ["p_layer", "[0, 1]"]),
        (
            {"evolution": {"population": 4, "mutations": 2, "crossovers": 2}, "max_concurrent_trials": 8},
            ["lag", "population"],
        ),
        ({"constraints": {"min_params": 10, "max_params": 5}}, ["min_params", "max_params"]),
        ({"num_trials": "many"}, ["num_trials", "number"]),
        ({"cpus_per_trial": 0}, ["cpus_per_trial", "gpus_per_trial"]),
    ],
)
def test_bad_settings_name_source_option_value_and_allowed(raw, words):
    with pytest.raises(ConfigError) as e:
        search_config_from_dict({**BASE, **raw}, "bad.yaml")
    for w in ["bad.yaml", *words]:
        assert w in str(e.value)


def test_missing_required_setting():
    with pytest.raises(ConfigError, match="missing setting.*data_dir"):
        search_config_from_dict({"supernet": "x"})


def test_identity_ignores_where_and_how_fast_but_not_what():
    a = search_config_from_dict({**BASE, "max_concurrent_trials": 3})
    assert (
        a.identity()
        == search_config_from_dict(
            {**BASE, "max_concurrent_trials": 3, "name": "x", "cpus_per_trial": 2}
        ).identity()
    )
    assert (
        a.identity() != search_config_from_dict({**BASE, "max_concurrent_trials": 2}).identity()
    )  # lag 2 vs 1
    assert (
        a.identity()
        == search_config_from_dict({**BASE, "max_concurrent_trials": 5, "evolution": {"lag": 2}}).identity()
    )
    assert a.identity() != search_config_from_dict({**BASE, "max_concurrent_trials": 3, "seed": 1}).identity()
    rs = {**BASE, "algorithm": "random"}
    assert (
        search_config_from_dict({**rs, "max_concurrent_trials": 1}).identity()
        == search_config_from_dict(
            {
                **rs,
                "max_concurrent_trials": 4,
                "evolution": {"population": 7, "mutations": 1, "crossovers": 1},
            }
        ).identity()
    )


@pytest.mark.parametrize("recipe", sorted(RECIPES.glob("*.yaml")), ids=lambda p: p.stem)
def test_recipes_load(recipe):
    c = load_search_config(recipe)
    assert c.space is None or load_space(c.space)
