"""A campaign's files: exact CSV columns that round-trip, labelled plots, and a deterministic report.md."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tangle_ray.campaign.report import (
    anytime_figure,
    pareto_front,
    plot_anytime,
    plot_score_vs_params,
    score_vs_params_figure,
    write_report,
    write_tables,
)
from tangle_ray.campaign.statistics import compare, summarize

METHODS = ("tanglenas", "spos-random", "spos-evolution")
SAMPLES = Path("/tmp/campaign_plots")  # sample renders for a person to look at
PNG = b"\x89PNG\r\n\x1a\n"


def _rows(seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    rows = []
    for shift, method in enumerate(METHODS):
        for s in rng.permutation(4):
            for metric, value in (("loss", 1.4 + 0.02 * shift + rng.normal(0, 0.01)),
                                  ("params", float(rng.integers(4, 9) * 1_000_000))):
                rows.append({"method": method, "seed": int(s), "stage": "retrain", "arch_id": f"{method}-{s}",
                             "metric": metric, "value": value})
    return rows


def _curves(seed: int = 0) -> dict[str, list[list[tuple[float, float]]]]:
    rng = np.random.default_rng(seed)
    curves = {}
    for shift, method in enumerate(METHODS):
        curves[method] = []
        for _ in range(3):
            x = np.r_[0.0, np.sort(rng.uniform(0, 3600, 10)), 3600.0]
            y = np.minimum.accumulate(2.5 + 0.05 * shift - 0.8 * x / 3600 + rng.normal(0, 0.05, 12))
            curves[method].append(list(zip(x.tolist(), y.tolist())))
    return curves


def _points(seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    return [{"method": m, "seed": s, "params": float(rng.uniform(3e6, 9e6)), "score": float(rng.normal(1.4, 0.05))}
            for m in METHODS for s in range(4)]


def test_tables_have_exact_columns_sorted_rows_and_round_trip(tmp_path):
    rows = _rows()
    comparisons = compare(rows, {"loss": "min", "params": "min"}, "tanglenas")
    write_tables(tmp_path, rows, comparisons)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["comparisons.csv", "results.csv"]  # no temp files left
    results = pd.read_csv(tmp_path / "results.csv")
    assert list(results.columns) == ["method", "seed", "stage", "arch_id", "metric", "value"]
    expected = pd.DataFrame(rows).sort_values(list(results.columns)).reset_index(drop=True)
    pd.testing.assert_frame_equal(results, expected)
    table = pd.read_csv(tmp_path / "comparisons.csv")
    assert list(table.columns) == ["metric", "stage", "method", "baseline", "n", "mean_diff", "ci_low", "ci_high",
                                   "welch_p", "paired_p", "paired_test", "verdict"]
    assert table.to_dict("records") == comparisons  # compare's order is already the file's order
    before = (tmp_path / "results.csv").read_bytes()
    write_tables(tmp_path, list(reversed(rows)), comparisons)
    assert (tmp_path / "results.csv").read_bytes() == before


def _labels(fig) -> tuple[str, str, list[str]]:
    (ax,) = fig.axes
    return ax.get_xlabel(), ax.get_ylabel(), [t.get_text() for t in ax.get_legend().get_texts()]


def test_the_anytime_plot_is_labelled_with_a_line_and_band_per_method(tmp_path):
    curves = _curves()
    fig = anytime_figure(curves, "wall time (s)", "validation loss")
    x_label, y_label, legend = _labels(fig)
    assert (x_label, y_label) == ("wall time (s)", "validation loss") and fig.axes[0].get_title()
    assert legend == [f"{m} (3 seeds)" for m in sorted(METHODS)]
    assert tuple(fig.get_size_inches()) == (6.4, 4.0)
    (ax,) = fig.axes
    mean = ax.get_lines()[sorted(METHODS).index("tanglenas")].get_ydata()
    assert len(ax.collections) == 3 and np.all(np.diff(mean) <= 1e-12)  # a mean of best-so-far curves never rises
    for folder in (tmp_path, SAMPLES):
        path = plot_anytime(folder / "anytime_wall.png", curves, "wall time (s)", "validation loss")
        assert path.read_bytes()[:8] == PNG and path.stat().st_size > 1000


def test_the_anytime_band_starts_where_every_seed_has_a_score_and_ended_curves_hold_their_last():
    fig = anytime_figure({"a": [[(0.0, 1.0), (10.0, 0.0)], [(2.0, 2.0), (6.0, 2.0), (20.0, 0.0)]]}, "x", "y")
    line = fig.axes[0].get_lines()[0]
    assert list(line.get_xdata()) == [2.0, 6.0, 10.0, 20.0]
    assert list(line.get_ydata()) == pytest.approx([(0.8 + 2.0) / 2, (0.4 + 2.0) / 2, (0.0 + 2 - 2 * 4 / 14) / 2,
                                                    0.0])
    apart = anytime_figure({"a": [[(0.0, 1.0), (1.0, 1.0)], [(2.0, 3.0), (3.0, 3.0)]]}, "x", "y")
    assert list(apart.axes[0].get_lines()[0].get_ydata()) == [2.0, 2.0]


def test_the_score_vs_params_plot_has_a_marker_per_method_and_the_pareto_front(tmp_path):
    points = _points()
    fig = score_vs_params_figure(points, "test loss")
    x_label, y_label, legend = _labels(fig)
    assert (x_label, y_label) == ("parameters (M)", "test loss")
    assert legend == [*sorted(METHODS), "Pareto front (all points)"]
    markers = {c.get_paths()[0].vertices.tobytes() for c in fig.axes[0].collections}
    assert len(markers) == 3
    for folder in (tmp_path, SAMPLES):
        path = plot_score_vs_params(folder / "score_vs_params.png", points, "test loss")
        assert path.read_bytes()[:8] == PNG and path.stat().st_size > 1000


def test_the_pareto_front_follows_the_direction():
    params, scores = [1.0, 2.0, 2.0, 3.0, 4.0], [5.0, 4.0, 6.0, 4.5, 1.0]
    assert pareto_front(params, scores, higher_is_better=False) == [(1.0, 5.0), (2.0, 4.0), (4.0, 1.0)]
    assert pareto_front(params, scores, higher_is_better=True) == [(1.0, 5.0), (2.0, 6.0)]


def test_the_report_holds_the_tables_the_overlap_and_relative_plot_links(tmp_path):
    rows = _rows()
    comparisons = compare(rows, {"loss": "min", "params": "min"}, "tanglenas")
    stages = [{"name": "tanglenas/seed0", "status": "done", "wall_s": 120.0, "device_hours": 0.0333},
              {"name": "spos-random/seed0", "status": "failed", "wall_s": 60.0, "device_hours": 0.0167}]
    plots = {"any-time loss against wall time": tmp_path / "anytime_wall.png", "loss against parameters":
             "score_vs_params.png"}
    path = write_report(tmp_path, "Campaign", summarize(rows), comparisons, stages, plots, 100.0, 180.0)
    text = path.read_text()
    assert path == tmp_path / "report.md" and text.startswith("# Campaign\n")
    assert "| tanglenas | retrain | 4 |" in text and " ± " in text
    assert "| loss | retrain | tanglenas − spos-random | 4 |" in text and "95% CI" in text
    assert "covers zero" in text and "wilcoxon" not in text and "(paired t)" in text
    assert "| spos-random/seed0 | failed | 60 | 0.0167 |" in text
    assert "1.80x" in text
    assert "![any-time loss against wall time](anytime_wall.png)" in text
    assert "![loss against parameters](score_vs_params.png)" in text
    again = write_report(tmp_path, "Campaign", summarize(rows), comparisons, stages, plots, 100.0)  # sum: 180 s
    assert again.read_text() == text


def test_the_results_table_rounds_the_mean_to_the_deviation(tmp_path):
    summary = [{"method": "tanglenas", "stage": "retrain", "metric": "loss", "n": 3, "mean": 1.412, "std": 0.011},
               {"method": "spos-evolution", "stage": "retrain", "metric": "loss", "n": 3, "mean": 1.41,
                "std": 0.0093},
               {"method": "spos-evolution", "stage": "retrain", "metric": "params", "n": 3, "mean": 5.5e6,
                "std": 0.0}]
    text = write_report(tmp_path, "Table 8", summary, [], [], {}, 10.0).read_text()
    assert "| spos-evolution | retrain | 3 | 1.4100 ± 0.0093 | 5.5e+06 ± 0 |" in text
    assert "| tanglenas | retrain | 3 | 1.412 ± 0.011 | – |" in text
    assert "n/a" not in text.split("## Stages")[0] and "0.00x" in text
