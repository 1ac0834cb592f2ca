"""Run, search, space and architecture files, mutated: each is refused with a ConfigError or is valid."""

from __future__ import annotations

import itertools
import json
import math

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from tangle_ray.configs import INT64, MAX_LAYERS, MAX_PARAMS, to_dict
from tangle_ray.methods import METHODS
from tangle_ray.models import load_space
from tangle_ray.names import check_name
from tangle_ray.space import read_arch
from tangle_ray.train.config import DS_OWNED, PLACEMENT_STRATEGIES, PRECISIONS, load_config
from tangle_ray.tune.config import load_search_config

from .conftest import FUZZ, file_bytes, is_finite_data, mutated, outcome, plausible, values

_n = itertools.count()
RUN = yaml.safe_load("""
space: gpt-nano
method: tanglenas
mixer: drnas
data: {dir: runs/tokens, valid_fraction: 0.2}
steps: 20
global_batch_size: 16
micro_batch_size: 8
optimizer: {lr: 3.0e-3, min_lr: 3.0e-4, betas: [0.9, 0.99], warmup_steps: 2, grad_clip: 1.0}
arch_optimizer: {lr: 3.0e-2, betas: [0.5, 0.999], grad_clip: 5.0}
zero_stage: 2
scaling: {num_workers: 2, placement_strategy: PACK, resources_per_worker: {CPU: 1}}
run: {storage_path: runs, name: fuzz}
deepspeed: {zero_optimization: {overlap_comm: true}}
checkpoint_every: 5
seed: 3
dropout: 0.0
max_failures: 1
""")
SEARCH = yaml.safe_load("""
supernet: runs/RUN/export/supernet
data: {dir: runs/tokens}
space: gpt-nano
eval: {split: valid, samples: 16, batch_size: 8, seed: 0}
algorithm: evolution
seed: 0
evolution: {population: 8, generations: 3, parents: 3, mutations: 4, crossovers: 3, p_layer: 0.2, lag: 1}
constraints: {min_params: 1000, max_params: 100000000}
resources: {max_concurrent_trials: 2, cpus_per_trial: 1, gpus_per_trial: 0}
run: {storage_path: runs/tune, name: fuzz}
""")
SPACE = yaml.safe_load(open(load_space("gpt-nano").source).read())
ARCH = {"n_layer": 3, "n_embd": 48, "n_head": [2, 4, 8, 2], "mlp_ratio": [2, 3, 4, 2]}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz-files")


def _write(folder, data: bytes, suffix: str):
    path = folder / f"f{next(_n)}{suffix}"
    path.write_bytes(data)
    return path


def _numbers_ok(data) -> None:
    assert is_finite_data(data), f"accepted NaN, infinity or NUL: {data}"
    for v in _walk(data):
        if isinstance(v, int) and not isinstance(v, bool):
            assert INT64[0] <= v <= INT64[1], f"accepted {v}"


def _walk(x):
    if isinstance(x, dict):
        for v in x.values():
            yield from _walk(v)
    elif isinstance(x, (list, tuple)):
        for v in x:
            yield from _walk(v)
    else:
        yield x


def assert_valid_run(cfg) -> None:
    """What an accepted run config must be (stated independently of the validation code)."""
    _numbers_ok(to_dict(cfg))
    json.dumps(cfg.identity(), allow_nan=False)
    o, a = cfg.optimizer, cfg.arch_optimizer
    assert o.lr > 0 and 0 <= o.min_lr <= o.lr and a.lr > 0
    assert all(0 <= b < 1 for b in (*o.betas, *a.betas))
    assert min(o.weight_decay, a.weight_decay, o.grad_clip, o.warmup_steps) >= 0 and a.grad_clip > 0
    assert cfg.seed >= 0 and cfg.max_failures >= -1
    for name in ("steps", "global_batch_size", "micro_batch_size", "log_every", "checkpoint_every", "eval_every",
                 "eval_samples"):
        assert getattr(cfg, name) >= 1, name
    assert cfg.scaling.num_workers >= 1
    assert cfg.global_batch_size % (cfg.scaling.num_workers * cfg.micro_batch_size) == 0
    assert cfg.dropout is None or 0 <= cfg.dropout < 1
    assert cfg.method in METHODS and cfg.precision in PRECISIONS and cfg.zero_stage in (0, 1, 2, 3)
    assert cfg.scaling.placement_strategy in PLACEMENT_STRATEGIES
    assert all(v >= 0 for v in (cfg.scaling.resources_per_worker or {}).values())
    check_name(cfg.run_name(), "run name")
    assert not set(DS_OWNED) & set(cfg.deepspeed)
    assert cfg.deepspeed.get("zero_optimization", {}).get("stage", cfg.zero_stage) == cfg.zero_stage
    assert cfg.inject_failure_at_step is None or cfg.inject_failure_at_step >= 0


def assert_valid_search(c) -> None:
    _numbers_ok(to_dict(c))
    json.dumps(c.identity(), allow_nan=False)
    check_name(c.run.name, "run.name")
    e, r = c.evolution, c.resources
    assert min(e.population, e.generations, e.parents, c.eval.samples, c.eval.batch_size, c.random.num_trials) >= 1
    assert 0 <= e.p_layer <= 1 and 0 <= e.p_global <= 1 and e.mutations + e.crossovers <= e.population
    assert min(e.mutations, e.crossovers) >= 0 and 0 <= c.evolution_lag < e.population or c.algorithm == "random"
    assert r.cpus_per_trial >= 0 and r.gpus_per_trial >= 0 and r.cpus_per_trial + r.gpus_per_trial > 0
    assert r.max_concurrent_trials >= 1 and c.seed >= 0 and c.eval.seed >= 0
    for what in ("params", "flops"):
        lo, hi = getattr(c.constraints, f"min_{what}"), getattr(c.constraints, f"max_{what}")
        assert (lo is None or lo >= 0) and (hi is None or hi >= 0) and (lo is None or hi is None or lo <= hi)


def assert_valid_space(space) -> None:
    for d in space.dims.values():
        assert d.values and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in d.values)
        assert all(math.isfinite(v) and v > 0 for v in d.values) and len(set(d.values)) == len(d.values)
    assert space.max_layers <= MAX_LAYERS
    _numbers_ok(space.fixed)
    assert 0 < space.param_count(space.largest()) <= MAX_PARAMS
    assert space.param_count(space.smallest()) > 0 and space.flops(space.largest()) > 0


@given(raw=mutated(RUN, ["gdas_schedule", "inject_failure_at_step", "init", "arch"]), data=st.data())
@FUZZ
def test_run_files(folder, raw, data):
    path = _write(folder, data.draw(file_bytes(raw)), ".yaml")
    kind, value = outcome(lambda: load_config(path))
    if kind == "ok":
        assert_valid_run(value)


@given(raw=mutated(SEARCH, ["random.num_trials", "verbose"]), data=st.data())
@FUZZ
def test_search_files(folder, raw, data):
    path = _write(folder, data.draw(file_bytes(raw)), ".yaml")
    kind, value = outcome(lambda: load_search_config(path))
    if kind == "ok":
        assert_valid_search(value)


@given(raw=mutated(SPACE), data=st.data())
@FUZZ
def test_space_files(folder, raw, data):
    path = _write(folder, data.draw(file_bytes(raw)), ".yaml")
    kind, value = outcome(lambda: load_space(path))
    if kind == "ok":
        assert_valid_space(value)


@given(key=st.sampled_from(["n_layer", "n_embd", "n_head", "mlp_ratio", "extra"]),
       value=st.one_of(st.sampled_from([2, 3, 4, 8, 32, 48, 64, 2.0, 3.0, 64.0, True]), plausible, values),
       layer=st.integers(0, 3), text=st.sampled_from(["as is"] * 5 + ["cut", "nan", "deep", "list", "big"]),
       data=st.data())
@FUZZ
def test_architecture_files(folder, key, value, layer, text, data):
    arch = json.loads(json.dumps(ARCH))
    if key in ("n_head", "mlp_ratio") and data.draw(st.booleans()):
        arch[key][layer] = value
    else:
        arch[key] = value
    body = json.dumps(arch)  # NaN and Infinity come out as the (non-JSON) tokens NaN, Infinity
    body = {"as is": body, "cut": body[: len(body) // 2], "nan": body.replace("48", "NaN"),
            "deep": "[" * 100_000 + "]" * 100_000, "list": "[1, 2]", "big": body.replace("48", "4" * 5000)}[text]
    path = _write(folder, body.encode(), ".json")
    space = load_space("gpt-nano")
    kind, value = outcome(lambda: space.validate(read_arch(path), str(path)))
    if kind == "ok":
        for d in space.dims.values():
            chosen = value[d.name] if d.per_layer else [value[d.name]]
            assert all(d.allows(v) for v in chosen), (d.name, chosen)
