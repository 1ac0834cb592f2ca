"""Statistics a reviewer expects: paired differences with bootstrap confidence intervals, and their verdict."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np


@dataclass(frozen=True)
class Difference:
    """``estimate`` = statistic(a) - statistic(b), oriented so that positive means ``a`` is better, with its
    ``level`` percentile bootstrap interval [low, high] over ``n`` resampled units (``test`` names it)."""

    estimate: float
    low: float
    high: float
    level: float
    n: int
    test: str

    @property
    def verdict(self) -> str:
        """'better', 'worse', or 'indistinguishable' where the interval covers zero."""
        if self.low > 0:
            return "better"
        if self.high < 0:
            return "worse"
        return "indistinguishable"

    def to_dict(self) -> dict[str, float | int | str]:
        return {**asdict(self), "verdict": self.verdict}


def against_median(chosen: Sequence[float], others: Sequence[Sequence[float]], higher_is_better: bool,
                   level: float = 0.95, resamples: int = 2000, seed: int = 0) -> Difference:
    """The chosen one's mean score over evaluation units (e.g. batches) minus the median of the others' means,
    with a paired bootstrap over the units (every resample draws the same units for all): ``chosen`` [n],
    ``others`` [k, n]."""
    a, b = np.asarray(chosen, np.float64), np.asarray(others, np.float64)
    if a.ndim != 1 or b.ndim != 2 or b.shape[1] != len(a) or len(a) < 2:
        raise ValueError(f"expected chosen [n >= 2] and others [k, n], got {a.shape} and {b.shape}")
    sign = 1.0 if higher_is_better else -1.0

    def statistic(idx: np.ndarray) -> float:
        return sign * (a[idx].mean() - np.median(b[:, idx].mean(-1)))

    n = len(a)
    draws = np.random.default_rng(seed).integers(0, n, (resamples, n))
    boot = np.array([statistic(d) for d in draws])
    low, high = np.quantile(boot, [(1 - level) / 2, (1 + level) / 2])
    return Difference(float(statistic(np.arange(n))), float(low), float(high), level, n,
                      f"paired percentile bootstrap over {n} evaluation batches, {resamples} resamples")
