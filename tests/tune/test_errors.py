"""run_search rejects bad input with a ConfigError before Tune (or Ray) starts."""

import json

import pytest
import ray

from tangle_ray.errors import TangleRayError
from tangle_ray.tune.tuner import run_search


def test_input_errors_before_tune_starts(make_config, tmp_path):
    ray_was_up = ray.is_initialized()
    cases = [
        ({"supernet": str(tmp_path / "nope")}, "missing"),
        ({"space": "gpt-nano"}, "differs from space = 'gpt-nano'"),
        ({"constraints": {"max_params": 10}}, "admit no architecture"),
        ({"eval": {"split": "nope"}}, "nope"),
        ({"algorithm": "bayes"}, r"allowed: \['random', 'evolution'\]"),
    ]
    for overrides, words in cases:
        with pytest.raises(TangleRayError, match=words):
            run_search(make_config(**overrides))
    config = make_config()
    config.run_dir().mkdir(parents=True)
    (config.run_dir() / "search.json").write_text(json.dumps({"identity": {"seed": 7}}))
    with pytest.raises(TangleRayError, match="other settings"):
        run_search(config)
    assert ray.is_initialized() == ray_was_up  # all raised before Tune started
