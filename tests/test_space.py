import random

import pytest
import yaml

from tangle_ray import ConfigError, available_spaces, load_space
from tangle_ray.models import space_from_dict
from tangle_ray.space import space_to_dict


@pytest.mark.parametrize("name", available_spaces())
def test_every_space_file_loads_and_builds(name):
    space = load_space(name)
    assert space_from_dict(space_to_dict(space)).dims == space.dims
    assert space.param_count(space.smallest()) < space.param_count(space.largest())
    if space.param_count(space.largest()) < 5e6:
        supernet = space.build_supernet()
        assert sum(p.numel() for p in supernet.weight_parameters()) == space.param_count(space.largest())


def test_tinystories_space_matches_the_paper():
    space = load_space("gpt-tinystories")
    assert 1.5e7 < space.num_architectures() < 1.7e7
    assert 24e6 < space.param_count(space.smallest()) < 26e6
    assert 87e6 < space.param_count(space.largest()) < 89e6
    assert space.fixed["block_size"] == 224 and space.fixed["padded_vocab_size"] == 50304


def test_num_architectures_counts_active_layers_only():
    space = load_space("gpt-micro")
    seen = {space.key(space.sample(random.Random(i))) for i in range(20000)}
    assert len(seen) <= space.num_architectures() == 3 * (9 + 81 + 729)


def _raw(**changes):
    raw = space_to_dict(load_space("gpt-micro"))
    for key, value in changes.items():
        section, _, name = key.partition(".")
        if name:
            raw[section][name] = value
        else:
            raw[section] = value
    return raw


@pytest.mark.parametrize(
    "changes, words",
    [
        ({"per_layer.n_head": [3]}, ["n_head", "3", "divide"]),
        ({"choices.n_embd": []}, ["n_embd", "non-empty"]),
        ({"colour": "red"}, ["unknown", "colour"]),
        ({"fixed.block_size": "long"}, ["block_size", "'long'", "int"]),
        ({"choices.n_layer": [1, "two"]}, ["n_layer", "'two'", "positive number"]),
        ({"model": "rnn"}, ["model", "rnn", "gpt"]),
        ({"per_layer.depth": [1]}, ["unknown", "depth"]),
    ],
)
def test_malformed_space_is_refused_with_a_clear_error(tmp_path, changes, words):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(_raw(**changes)))
    with pytest.raises(ConfigError) as err:
        load_space(path)
    for word in [str(path), *words]:
        assert word in str(err.value)


def test_unknown_space_name_lists_known_ones():
    with pytest.raises(ConfigError, match="gpt-nano"):
        load_space("no-such-space")


def test_validate_names_the_bad_choice():
    space = load_space("gpt-tinystories")
    arch = space.largest()
    arch["n_head"][3] = 5
    with pytest.raises(ConfigError, match=r"n_head\[3\] = 5 .*\[6, 8, 12\]"):
        space.validate(arch)
    with pytest.raises(ConfigError, match="missing"):
        space.validate({"n_layer": 5})


def test_mutation_and_crossover_stay_in_the_space():
    space = load_space("gpt-tinystories")
    rng = random.Random(0)
    for _ in range(200):
        a, b = space.sample(rng), space.sample(rng)
        space.validate(space.mutate(a, rng))
        child = space.crossover(a, b, rng)
        space.validate(child)
        for d in space.dims.values():
            pairs = zip(child[d.name], a[d.name], b[d.name]) if d.per_layer else [(child[d.name], a[d.name], b[d.name])]
            assert all(c in (x, y) for c, x, y in pairs)


def test_mutation_grows_depth_with_fresh_layers():
    space = load_space("gpt-tinystories")
    rng = random.Random(1)
    parent = space.smallest()
    grown = [c for c in (space.mutate(parent, rng, p_layer=0.0, p_global=1.0) for _ in range(200))
             if c["n_layer"] > parent["n_layer"]]
    assert grown
    assert any(c["n_head"][5] != 6 for c in grown if c["n_layer"] >= 6)
    assert all(c["n_head"][:5] == parent["n_head"][:5] for c in grown)


def test_one_hot_and_argmax_are_inverse():
    space = load_space("gpt-tinystories")
    arch = space.sample(random.Random(3))
    assert space.arch_from_weights(space.one_hot(arch)) == arch


def test_flops_grow_with_context_and_size():
    space = load_space("gpt-tinystories")
    assert space.flops(space.largest()) > space.flops(space.smallest())
    short = load_space("gpt-tinystories")
    short.fixed["block_size"] = 112
    assert space.flops(space.largest()) > 2 * short.flops(short.largest())


def test_supernet_folder_of_another_space_shape_is_refused(tmp_path):
    from tangle_ray import TangleRayError as Err
    from tangle_ray.folders import load_supernet, save_supernet

    space = load_space("gpt-micro")
    save_supernet(space.build_supernet(), tmp_path / "sn")
    raw = space_to_dict(space)
    raw["per_layer"]["mlp_ratio"] = [1, 2]
    with pytest.raises(Err, match=r"differs from space = .gpt-micro. in \[.per_layer.\]"):
        load_supernet(tmp_path / "sn", space_from_dict(raw))
    raw = space_to_dict(space)
    raw["fixed"]["dropout"] = 0.3  # dropout does not change the weights
    assert load_supernet(tmp_path / "sn", space_from_dict(raw)) is not None


def test_read_arch_names_the_file_and_the_problem(tmp_path):
    from tangle_ray.space import read_arch

    with pytest.raises(ConfigError, match="missing.json: cannot read"):
        read_arch(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{n_layer: 2")
    with pytest.raises(ConfigError, match="bad.json: not valid JSON"):
        read_arch(bad)
    bad.write_text("[2, 3]")
    with pytest.raises(ConfigError, match="expected a JSON object"):
        read_arch(bad)
