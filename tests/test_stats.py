"""The paired bootstrap against the median of other architectures: its interval and its verdict."""

import numpy as np
import pytest

from tangle_ray.stats import against_median


def test_a_clear_difference_is_better_and_a_tiny_one_is_indistinguishable():
    rng = np.random.default_rng(0)
    noise = rng.normal(0, 0.1, (9, 8))  # 8 evaluation batches; batch difficulty shared by all (paired)
    shared = rng.normal(2.0, 0.3, 8)
    losses = shared + noise
    clear = against_median(losses[0] - 0.5, losses[1:], higher_is_better=False)
    assert clear.verdict == "better" and 0 < clear.low <= clear.estimate <= clear.high
    tiny = against_median(np.median(losses[1:], axis=0) - 0.002, losses[1:], higher_is_better=False)
    assert tiny.verdict == "indistinguishable" and tiny.low < 0 < tiny.high
    worse = against_median(losses[0] + 0.5, losses[1:], higher_is_better=False)
    assert worse.verdict == "worse" and worse.high < 0
    accuracy = against_median(1 - losses[0] + 0.5, 1 - losses[1:], higher_is_better=True)
    assert accuracy.verdict == "better"
    assert clear == against_median(losses[0] - 0.5, losses[1:], higher_is_better=False)  # seeded
    assert clear.to_dict()["verdict"] == "better" and "bootstrap over 8" in clear.test
    with pytest.raises(ValueError, match="expected chosen"):
        against_median([1.0], [[1.0]], higher_is_better=True)
