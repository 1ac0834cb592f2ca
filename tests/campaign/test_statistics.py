"""A campaign's statistics: summaries, paired comparisons (interval, verdict, p-values), ranks, Welch from summaries."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats as sps

from tangle_ray.campaign.statistics import compare, per_sample_paired, ranks, summarize, welch_from_summary

DIRECTIONS = {"loss": "min", "top1": "max", "params": "min"}
KEYS = ["metric", "stage", "method", "baseline", "n", "mean_diff", "ci_low", "ci_high", "welch_p", "paired_p",
        "paired_test", "verdict"]


def _rows(values: dict[str, list[float]], metric: str = "loss", stage: str = "retrain") -> list[dict]:
    return [{"method": m, "seed": s, "stage": stage, "arch_id": f"{m}-{s}", "metric": metric, "value": float(v)}
            for m, vs in values.items() for s, v in enumerate(vs)]


def _one(comparisons: list[dict], baseline: str) -> dict:
    (c,) = [c for c in comparisons if c["baseline"] == baseline]
    return c


def test_summaries_match_numpy():
    rng = np.random.default_rng(11)
    rows = []
    for stage in ("finetune", "retrain"):
        for metric in ("loss", "top1", "wall_s"):
            rows += _rows({m: rng.normal(2, 0.5, 5) for m in ("tanglenas", "spos-random")}, metric, stage)
    rows += _rows({"spos-evolution": [3.0]}, "loss", "retrain")
    got = {(s["method"], s["stage"], s["metric"]): s for s in summarize(rows)}
    assert list(got) == sorted(got)
    for key, s in got.items():
        v = np.array([r["value"] for r in rows if (r["method"], r["stage"], r["metric"]) == key])
        std = v.std(ddof=1) if len(v) > 1 else 0.0
        assert s["n"] == len(v) and s["mean"] == pytest.approx(v.mean())
        assert s["std"] == pytest.approx(std) and s["sem"] == pytest.approx(std / np.sqrt(len(v)))
    assert got[("spos-evolution", "retrain", "loss")]["std"] == 0.0


@pytest.mark.parametrize("n", [4, 8])
def test_a_planted_difference_is_better_with_an_interval_off_zero(n):
    rng = np.random.default_rng(n)
    base = rng.normal(2.0, 0.05, n)
    loss = _rows({"tanglenas": base - 0.5 + rng.normal(0, 0.01, n), "spos-random": base})
    top1 = _rows({"tanglenas": base + 0.5 + rng.normal(0, 0.01, n), "spos-random": base}, "top1")
    for rows, sign in ((loss, -1), (top1, 1)):
        (c,) = compare(rows, DIRECTIONS, "tanglenas")
        assert list(c) == KEYS and c["n"] == n and c["method"] == "tanglenas" and c["baseline"] == "spos-random"
        assert sign * c["mean_diff"] == pytest.approx(0.5, abs=0.05)
        assert c["ci_low"] <= c["mean_diff"] <= c["ci_high"] and not c["ci_low"] <= 0 <= c["ci_high"]
        assert c["verdict"] == "better" and c["welch_p"] < 0.05 and c["paired_p"] < 0.05
    (worse,) = compare(_rows({"tanglenas": base + 0.5, "spos-random": base}), DIRECTIONS, "tanglenas")
    assert worse["verdict"] == "worse" and worse["ci_low"] > 0


def test_pure_noise_never_says_better_where_the_interval_covers_zero():
    rng = np.random.default_rng(3)
    covered = 0
    for _ in range(40):
        rows = _rows({m: rng.normal(1.4, 0.01, 5) for m in ("tanglenas", "spos-random", "spos-evolution")})
        for c in compare(rows, DIRECTIONS, "tanglenas"):
            if c["ci_low"] <= 0 <= c["ci_high"]:
                covered += 1
                assert c["verdict"] == "indistinguishable"
            assert 0 <= c["welch_p"] <= 1 and 0 <= c["paired_p"] <= 1
    assert covered > 40


@pytest.mark.parametrize("n", [1, 2, 5, 6, 9])
def test_degenerate_samples_give_defined_p_values(n):
    same = np.random.default_rng(n).normal(1.0, 0.1, n)
    (c,) = compare(_rows({"tanglenas": same, "spos-random": same}), DIRECTIONS, "tanglenas")
    assert c["welch_p"] == 1.0 and c["paired_p"] == 1.0 and c["mean_diff"] == 0.0
    assert c["verdict"] == "indistinguishable"
    (shifted,) = compare(_rows({"tanglenas": same - 0.25, "spos-random": same}), DIRECTIONS, "tanglenas")
    assert all(not math.isnan(shifted[k]) for k in ("welch_p", "paired_p", "mean_diff"))
    if n == 1:  # one seed: no interval, no evidence
        assert math.isnan(shifted["ci_low"]) and shifted["paired_p"] == 1.0 == shifted["welch_p"]
        assert shifted["verdict"] == "indistinguishable"
    elif n < 6:  # a constant non-zero difference: the paired t-test's convention
        assert shifted["paired_p"] == 0.0 and shifted["verdict"] == "better"
    else:  # Wilcoxon stays defined: every sign the same
        assert shifted["paired_p"] == pytest.approx(2 / 2**n)
    constant = compare(_rows({"tanglenas": [1.0] * n, "spos-random": [2.0] * n}), DIRECTIONS, "tanglenas")[0]
    assert constant["welch_p"] == (0.0 if n > 1 else 1.0)


@pytest.mark.parametrize("n, test", [(3, "paired t"), (5, "paired t"), (6, "wilcoxon"), (10, "wilcoxon")])
def test_the_paired_test_is_t_below_six_seeds_and_wilcoxon_from_six(n, test):
    rng = np.random.default_rng(100 + n)
    a, b = rng.normal(1.0, 0.1, n), rng.normal(1.05, 0.1, n)
    (c,) = compare(_rows({"tanglenas": a, "spos-random": b}), DIRECTIONS, "tanglenas")
    expected = sps.ttest_rel(a, b).pvalue if test == "paired t" else sps.wilcoxon(a - b).pvalue
    assert c["paired_test"] == test and c["paired_p"] == pytest.approx(expected)
    assert c["welch_p"] == pytest.approx(sps.ttest_ind(a, b, equal_var=False).pvalue)


def test_seeds_are_paired_metrics_without_a_direction_are_not_compared_and_the_order_of_rows_does_not_matter():
    rng = np.random.default_rng(5)
    rows = _rows({"tanglenas": rng.normal(1, 0.1, 5), "spos-random": rng.normal(1, 0.1, 3)})
    rows += _rows({"tanglenas": [1.0, 2.0], "spos-random": [1.0, 2.0]}, "inference_s")
    rows += _rows({"spos-evolution": rng.normal(1, 0.1, 4)}, stage="finetune")  # no reference at that stage
    (c,) = compare(rows, DIRECTIONS, "tanglenas")
    assert c["n"] == 3 and c["metric"] == "loss"
    assert compare(rows, DIRECTIONS, "tanglenas") == compare(list(reversed(rows)), DIRECTIONS, "tanglenas")
    with pytest.raises(ValueError, match="two values"):
        compare(rows + rows[:1], DIRECTIONS, "tanglenas")


def test_ranks_put_the_best_first_and_share_ties():
    rows = _rows({"tanglenas": [1.0, 2.0], "spos-random": [1.0, 1.5], "spos-evolution": [3.0, 1.0]})
    got = {(r["seed"], r["method"]): r["rank"] for r in ranks(rows, DIRECTIONS, "retrain", "loss")}
    assert got == {(0, "tanglenas"): 1.5, (0, "spos-random"): 1.5, (0, "spos-evolution"): 3.0,
                   (1, "tanglenas"): 3.0, (1, "spos-random"): 2.0, (1, "spos-evolution"): 1.0}
    accuracy = _rows({"tanglenas": [0.9], "spos-random": [0.8]}, "top1")
    assert [r["rank"] for r in ranks(accuracy, DIRECTIONS, "retrain", "top1")] == [2.0, 1.0]  # sorted by method


@pytest.mark.parametrize("n", [3, 4, 5])
def test_the_papers_table_8_p_value_is_not_a_welch_test_over_seeds(n):
    """Table 8: test loss 1.412 ± 0.011 (TangleNAS) vs 1.414 ± 0.013 (SPOS+ES), reported p = 0.0064."""
    p = welch_from_summary(1.412, 0.011, n, 1.414, 0.013, n)
    assert 0.7 < p < 0.9 and p > 0.0064 * 100
    assert welch_from_summary(1.0, 0.0, 3, 1.0, 0.0, 3) == 1.0 and welch_from_summary(1.0, 0.0, 3, 2.0, 0.0, 3) == 0.0


def test_a_per_sample_paired_test_over_evaluation_samples():
    rng = np.random.default_rng(8)
    shared = rng.gamma(2.0, 1.0, 500)  # per-sample difficulty shared by both architectures
    a, b = shared + rng.normal(0, 0.05, 500) - 0.02, shared + rng.normal(0, 0.05, 500)
    got = per_sample_paired(a, b, higher_is_better=False)
    assert got["test"] == "paired t over 500 evaluation samples" and got["n"] == 500
    assert got["ci_low"] < got["mean_diff"] < got["ci_high"] < 0 and got["verdict"] == "better"
    assert got["p"] == pytest.approx(sps.ttest_rel(a, b).pvalue) and got["p"] < 0.05
    assert per_sample_paired(a, b, higher_is_better=True)["verdict"] == "worse"
    assert per_sample_paired(a, a, higher_is_better=False)["p"] == 1.0
    with pytest.raises(ValueError, match="equal-length"):
        per_sample_paired(a, b[:-1], higher_is_better=False)


def test_two_seeds_whose_bootstrap_excludes_zero_are_not_called_better_without_the_paired_test():
    rng = np.random.default_rng(5)
    gap = rng.uniform(0.5, 1.5)
    # differences 1x and 3x the gap: both resampled means are negative, but a paired t over 2 seeds gives p ~ 0.3
    values = {"tanglenas": [1.0 - gap, 2.0 - 3 * gap], "spos-random": [1.0, 2.0]}
    c = _one(compare(_rows(values), DIRECTIONS, "tanglenas"), "spos-random")
    assert c["ci_high"] < 0 and c["paired_p"] > 0.05 and c["verdict"] == "indistinguishable"
