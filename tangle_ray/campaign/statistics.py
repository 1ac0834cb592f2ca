"""A campaign's statistics over seeds: summaries, paired comparisons against a reference method, ranks.

Rows are long-form dicts with ``method``, ``seed``, ``stage``, ``arch_id``, ``metric`` and ``value``.
``directions`` maps a metric to ``"min"`` or ``"max"``; a metric absent from it is summarised, never compared.

p-values are always numbers in [0, 1], never NaN. Where a t-test is undefined the convention is:

- fewer than 2 paired seeds: p = 1.0 (no evidence either way);
- identical samples (all differences zero, or two constant samples with the same value): p = 1.0;
- zero-variance non-zero differences (or two constant samples with different values): p = 0.0.

The Wilcoxon signed-rank test stays defined for constant non-zero differences (p = 2 / 2**n, exact), so
only its all-zero case takes the convention (p = 1.0).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
from scipy import stats as sps

from tangle_ray.stats import Difference

Row = Mapping[str, Any]
WILCOXON_FROM = 6  # paired seeds from which the paired test is Wilcoxon's signed-rank test instead of paired t
_TOL = 1e-12  # relative spread under which values count as identical


def summarize(rows: Iterable[Row]) -> list[dict[str, Any]]:
    """n, mean, std (ddof=1; 0.0 for n == 1) and sem per (method, stage, metric), sorted by that key."""
    groups: dict[tuple[str, str, str], list[float]] = defaultdict(list)
    for r in rows:
        groups[(r["method"], r["stage"], r["metric"])].append(float(r["value"]))
    out = []
    for (method, stage, metric), values in sorted(groups.items()):
        v = np.asarray(values)
        std = float(v.std(ddof=1)) if len(v) > 1 else 0.0
        out.append({"method": method, "stage": stage, "metric": metric, "n": len(v), "mean": float(v.mean()),
                    "std": std, "sem": std / np.sqrt(len(v))})
    return out


def _by_seed(rows: Iterable[Row]) -> dict[tuple[str, str, str], dict[int, float]]:
    """(method, stage, metric) -> {seed: value}; a second value for the same seed is an error."""
    table: dict[tuple[str, str, str], dict[int, float]] = defaultdict(dict)
    for r in rows:
        values = table[(r["method"], r["stage"], r["metric"])]
        seed = int(r["seed"])
        if seed in values:
            raise ValueError(f"two values of {r['metric']} for {r['method']}, seed {seed}, stage {r['stage']}")
        values[seed] = float(r["value"])
    return table


def _constant(x: np.ndarray) -> bool:
    return bool(np.ptp(x) <= _TOL * np.abs(x).max())


def _degenerate_p(difference: float, scale: float) -> float:
    """The convention where a t-test is undefined: 1.0 for no difference, 0.0 for a certain one."""
    return 1.0 if abs(difference) <= _TOL * scale else 0.0


def _welch_p(a: np.ndarray, b: np.ndarray) -> float:
    """Two-tailed Welch t-test p over the samples ``a`` and ``b``."""
    if min(len(a), len(b)) < 2:
        return 1.0
    if _constant(a) and _constant(b):
        return _degenerate_p(a.mean() - b.mean(), max(np.abs(a).max(), np.abs(b).max()))
    return float(sps.ttest_ind(a, b, equal_var=False).pvalue)


def _paired_t_p(a: np.ndarray, b: np.ndarray) -> float:
    """Two-tailed paired t-test p of ``a`` against ``b``."""
    d = a - b
    if len(d) < 2:
        return 1.0
    if _constant(d):
        return _degenerate_p(d.mean(), np.abs(d).max())
    return float(sps.ttest_rel(a, b).pvalue)


def _paired_p(a: np.ndarray, b: np.ndarray) -> tuple[float, str]:
    """Two-tailed paired p and the test's name: paired t below ``WILCOXON_FROM`` pairs, else Wilcoxon."""
    d = a - b
    if len(d) < WILCOXON_FROM:
        return _paired_t_p(a, b), "paired t"
    return (float(sps.wilcoxon(d).pvalue) if np.any(d) else 1.0), "wilcoxon"


def _bootstrap(d: np.ndarray, level: float, resamples: int, seed: int) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of ``d`` (NaN below two values: no interval from one seed)."""
    if len(d) < 2:
        return float("nan"), float("nan")
    draws = np.random.default_rng(seed).integers(0, len(d), (resamples, len(d)))
    low, high = np.quantile(d[draws].mean(-1), [(1 - level) / 2, (1 + level) / 2])
    return float(low), float(high)


def _oriented(mean: float, low: float, high: float, direction: str, level: float, n: int, test: str) -> Difference:
    """A ``Difference`` in which positive means the reference is better ("min" metrics flip sign)."""
    if direction not in ("min", "max"):
        raise ValueError(f"direction must be 'min' or 'max', got {direction!r}")
    if direction == "max":
        return Difference(mean, low, high, level, n, test)
    return Difference(-mean, -high, -low, level, n, test)


def _compare_one(ref: dict[int, float], base: dict[int, float], direction: str, level: float, resamples: int,
                 seed: int) -> dict[str, Any]:
    seeds = sorted(ref.keys() & base.keys())
    a, b = np.array([ref[s] for s in seeds]), np.array([base[s] for s in seeds])
    d = a - b
    low, high = _bootstrap(d, level, resamples, seed)
    paired_p, paired_test = _paired_p(a, b)
    test = f"paired percentile bootstrap over {len(d)} seeds, {resamples} resamples"
    verdict = _oriented(float(d.mean()), low, high, direction, level, len(d), test).verdict
    if paired_p >= 1 - level:  # a bootstrap over a handful of seeds is too narrow to stand alone
        verdict = "indistinguishable"
    return {"n": len(d), "mean_diff": float(d.mean()), "ci_low": low, "ci_high": high, "welch_p": _welch_p(a, b),
            "paired_p": paired_p, "paired_test": paired_test, "verdict": verdict}


def compare(rows: Iterable[Row], directions: Mapping[str, str], reference: str, level: float = 0.95,
            resamples: int = 2000, seed: int = 0) -> list[dict[str, Any]]:
    """The reference against every other method, per stage and directed metric, over the seeds both have.

    ``mean_diff`` is the mean of (reference - baseline) in the metric's units, with its percentile bootstrap
    interval over the paired seeds (a fresh generator seeded by ``seed`` per comparison, so a comparison does
    not depend on the others); ``verdict`` says whether the reference is better: 'better' or 'worse' only where
    the interval excludes zero and the paired test's p is below ``1 - level`` (with 2 or 3 seeds a percentile
    bootstrap has only 3 or 10 distinct resamples and is far too narrow to decide alone). ``welch_p`` treats the paired
    seeds' values as two independent samples. Pairs without a common seed are left out. Sorted by metric,
    stage, baseline.
    """
    table = _by_seed(rows)
    out = []
    for (method, stage, metric), base in sorted(table.items(), key=lambda kv: (kv[0][2], kv[0][1], kv[0][0])):
        ref = table.get((reference, stage, metric))
        if method == reference or metric not in directions or not ref or not ref.keys() & base.keys():
            continue
        result = _compare_one(ref, base, directions[metric], level, resamples, seed)
        out.append({"metric": metric, "stage": stage, "method": reference, "baseline": method, **result})
    return out


def ranks(rows: Iterable[Row], directions: Mapping[str, str], stage: str, metric: str) -> list[dict[str, Any]]:
    """Per seed, each method's rank on ``metric`` at ``stage`` (1 = best, ties share their average rank)."""
    sign = {"min": 1.0, "max": -1.0}[directions[metric]]
    per_seed: dict[int, dict[str, float]] = defaultdict(dict)
    for (method, st, m), values in _by_seed(rows).items():
        if st == stage and m == metric:
            for s, v in values.items():
                per_seed[s][method] = v
    out = []
    for s, values in sorted(per_seed.items()):
        methods = sorted(values)
        for method, rank in zip(methods, sps.rankdata([sign * values[m] for m in methods])):
            out.append({"seed": s, "stage": stage, "metric": metric, "method": method, "value": values[method],
                        "rank": float(rank)})
    return out


def welch_from_summary(mean_a: float, sd_a: float, n_a: int, mean_b: float, sd_b: float, n_b: int) -> float:
    """Two-tailed Welch t-test p from two samples' means, standard deviations (ddof=1) and sizes."""
    if min(n_a, n_b) < 2:
        return 1.0
    if sd_a == 0 and sd_b == 0:
        return _degenerate_p(mean_a - mean_b, max(abs(mean_a), abs(mean_b)))
    return float(sps.ttest_ind_from_stats(mean_a, sd_a, n_a, mean_b, sd_b, n_b, equal_var=False).pvalue)


def per_sample_paired(a: Sequence[float], b: Sequence[float], higher_is_better: bool, level: float = 0.95,
                      resamples: int = 2000, seed: int = 0) -> dict[str, Any]:
    """Two architectures scored on the same evaluation samples (e.g. per-sample losses): the mean of a - b,
    its percentile bootstrap interval over the samples, the paired t p-value and the verdict for ``a``."""
    x, y = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if x.ndim != 1 or x.shape != y.shape or len(x) == 0:
        raise ValueError(f"expected two equal-length 1-D samples, got {x.shape} and {y.shape}")
    d = x - y
    low, high = _bootstrap(d, level, resamples, seed)
    test = f"paired t over {len(d)} evaluation samples"
    verdict = _oriented(float(d.mean()), low, high, "max" if higher_is_better else "min", level, len(d), test).verdict
    return {"mean_diff": float(d.mean()), "ci_low": low, "ci_high": high, "level": level,
            "p": _paired_t_p(x, y), "n": len(d), "test": test, "verdict": verdict}
