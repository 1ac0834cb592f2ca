"""A campaign's results on disk: CSV tables, any-time and score-vs-parameters plots, and ``report.md``."""

from __future__ import annotations

import csv
import io
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from tangle_ray.report.plots import new_axes, save
from tangle_ray.stages import write_atomic

RESULT_COLUMNS = ("method", "seed", "stage", "arch_id", "metric", "value")
COMPARISON_COLUMNS = ("metric", "stage", "method", "baseline", "n", "mean_diff", "ci_low", "ci_high", "welch_p",
                      "paired_p", "paired_test", "verdict")
FIGSIZE = (6.4, 4.0)
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")
# the paper-style table's column order; other metrics follow, sorted
METRIC_ORDER = ("loss", "perplexity", "top1", "top5", "params", "macs", "flops", "inference_s", "device_hours",
                "wall_s")


def _csv(rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def write_tables(out_dir: str | Path, rows: Sequence[Mapping[str, Any]],
                 comparisons: Sequence[Mapping[str, Any]]) -> None:
    """``results.csv`` (sorted long-form rows) and ``comparisons.csv`` (sorted by metric, stage, method, baseline)."""
    out = Path(out_dir)
    results = sorted(rows, key=lambda r: tuple(r[c] for c in RESULT_COLUMNS))
    ordered = sorted(comparisons, key=lambda c: (c["metric"], c["stage"], c["method"], c["baseline"]))
    write_atomic(out / "results.csv", _csv(results, RESULT_COLUMNS))
    write_atomic(out / "comparisons.csv", _csv(ordered, COMPARISON_COLUMNS))


def _colours(methods: Sequence[str]) -> dict[str, str]:
    """A stable colour per method (the sorted methods take tab10's colours in turn)."""
    return {m: f"C{i % 10}" for i, m in enumerate(sorted(methods))}


def _mean_band(seeds: Sequence[Sequence[tuple[float, float]]]) -> tuple[np.ndarray, ...]:
    """x grid, mean, min and max over the seeds' curves, linearly interpolated from the latest start on; a
    curve that ended holds its last score (a method keeps the architecture it has, once its stages are done)."""
    curves = [np.asarray(sorted(s), np.float64).reshape(-1, 2) for s in seeds]
    lo, hi = max(c[0, 0] for c in curves), max(c[-1, 0] for c in curves)
    x = np.unique(np.concatenate([c[:, 0] for c in curves]))
    x = x[(x >= lo) & (x <= hi)]
    y = np.stack([np.interp(x, c[:, 0], c[:, 1]) for c in curves])
    return x, y.mean(0), y.min(0), y.max(0)


def anytime_figure(curves: Mapping[str, Sequence[Sequence[tuple[float, float]]]], x_label: str, y_label: str,
                   title: str = "Any-time performance") -> Figure:
    """One line per method (mean over seeds) with the min-max over seeds shaded."""
    fig, ax = new_axes(f"{title} (mean over seeds, min-max shaded)", x_label, y_label, FIGSIZE)
    colours = _colours(list(curves))
    for method in sorted(curves):
        seeds = [s for s in curves[method] if len(s)]
        if not seeds:
            continue
        x, mean, low, high = _mean_band(seeds)
        ax.plot(x, mean, color=colours[method], label=f"{method} ({len(seeds)} seeds)")
        ax.fill_between(x, low, high, color=colours[method], alpha=0.2, linewidth=0)
    ax.legend()
    return fig


def plot_anytime(path: str | Path, curves: Mapping[str, Sequence[Sequence[tuple[float, float]]]], x_label: str,
                 y_label: str, title: str = "Any-time performance") -> Path:
    """``curves``: method -> per-seed (x, score) points; written as a PNG (see ``anytime_figure``)."""
    return save(anytime_figure(curves, x_label, y_label, title), path)


def pareto_front(params: Sequence[float], scores: Sequence[float], higher_is_better: bool) -> list[tuple[float, float]]:
    """The points no other point beats on both fewer parameters and a better score, by increasing parameters."""
    sign = -1.0 if higher_is_better else 1.0
    front: list[tuple[float, float]] = []
    for p, s in sorted(zip(params, scores), key=lambda ps: (ps[0], sign * ps[1])):
        if not front or sign * s < sign * front[-1][1]:
            front.append((p, s))
    return front


def score_vs_params_figure(points: Sequence[Mapping[str, Any]], y_label: str, higher_is_better: bool = False,
                           title: str = "Score against parameters") -> Figure:
    """Each seed's architecture as a point (a marker and colour per method) and the Pareto front of all."""
    fig, ax = new_axes(f"{title} (one point per seed)", "parameters (M)", y_label, FIGSIZE)
    methods = sorted({p["method"] for p in points})
    colours = _colours(methods)
    for i, method in enumerate(methods):
        mine = [p for p in points if p["method"] == method]
        ax.scatter([p["params"] / 1e6 for p in mine], [p["score"] for p in mine], color=colours[method],
                   marker=MARKERS[i % len(MARKERS)], label=method, zorder=3)
    front = pareto_front([p["params"] / 1e6 for p in points], [p["score"] for p in points], higher_is_better)
    if front:
        fx, fy = zip(*front)
        ax.step(fx, fy, where="post", color="0.4", linestyle="--", label="Pareto front (all points)", zorder=2)
    ax.legend()
    return fig


def plot_score_vs_params(path: str | Path, points: Sequence[Mapping[str, Any]], y_label: str,
                         higher_is_better: bool = False, title: str = "Score against parameters") -> Path:
    """``points``: dicts with method, seed, params and score; written as a PNG (see ``score_vs_params_figure``)."""
    return save(score_vs_params_figure(points, y_label, higher_is_better, title), path)


def _num(x: float | None, digits: int = 4) -> str:
    """A number for a Markdown cell ("n/a" for a missing or NaN value)."""
    if x is None or not np.isfinite(x):
        return "n/a"
    return f"{x:.{digits}g}"


def _mean_std(mean: float, std: float) -> str:
    """``mean ± std`` with the mean to the decimal place of the standard deviation's second significant digit."""
    if not (np.isfinite(std) and std > 0):
        return f"{_num(mean)} ± 0"
    decimals = max(0, 1 - int(np.floor(np.log10(std))))
    return f"{mean:.{decimals}f} ± {std:.{decimals}f}"


def _table(header: Sequence[str], body: Sequence[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(row) + " |" for row in body]


def _summary_table(summary: Sequence[Mapping[str, Any]]) -> list[str]:
    """Per method and stage, mean ± std over seeds of each metric (the paper's layout)."""
    present = {s["metric"] for s in summary}
    metrics = [m for m in METRIC_ORDER if m in present] + sorted(present - set(METRIC_ORDER))
    cells = {(s["method"], s["stage"], s["metric"]): s for s in summary}
    body = []
    for method, stage in sorted({(s["method"], s["stage"]) for s in summary}):
        got = [cells.get((method, stage, m)) for m in metrics]
        seeds = max(c["n"] for c in got if c)
        body.append([method, stage, str(seeds)] +
                    [_mean_std(c["mean"], c["std"]) if c else "–" for c in got])
    return _table(["method", "stage", "seeds", *metrics], body)


def _comparison_table(comparisons: Sequence[Mapping[str, Any]], level: float) -> list[str]:
    body = [[c["metric"], c["stage"], f"{c['method']} − {c['baseline']}", str(c["n"]), _num(c["mean_diff"]),
             f"[{_num(c['ci_low'])}, {_num(c['ci_high'])}]", _num(c["welch_p"], 3),
             f"{_num(c['paired_p'], 3)} ({c['paired_test']})", c["verdict"]] for c in comparisons]
    header = ["metric", "stage", "difference", "seeds", "mean difference", f"{level:.0%} CI", "Welch p",
              "paired p (test)", "verdict"]
    return _table(header, body)


def _stage_table(stages: Sequence[Mapping[str, Any]]) -> list[str]:
    body = [[str(s["name"]), str(s.get("status", "")), _num(s.get("wall_s"), 5), _num(s.get("device_hours"), 3)]
            for s in stages]
    return _table(["stage", "status", "wall time (s)", "device-hours"], body)


def _overlap(wall_s: float, stage_wall_s: float) -> str:
    ratio = f"{stage_wall_s / wall_s:.2f}" if wall_s > 0 else "n/a"
    return (f"The campaign took {wall_s:.1f} s of wall time; its stages took {stage_wall_s:.1f} s in all, "
            f"an overlap of {ratio}x (1.00x: one stage at a time).")


def _link(path: str | Path, out_dir: Path) -> str:
    """``path`` relative to the report's folder, with forward slashes."""
    p = Path(path)
    return Path(os.path.relpath(p, out_dir)).as_posix() if p.is_absolute() else p.as_posix()


def _rank_lines(ranks: Sequence[Mapping[str, Any]]) -> list[str]:
    if not ranks:
        return []
    seeds = sorted({r["seed"] for r in ranks})
    methods = sorted({r["method"] for r in ranks})
    rank = {(r["method"], r["seed"]): r["rank"] for r in ranks}
    r0 = ranks[0]
    body = [[m, *(f"{rank[(m, s)]:g}" if (m, s) in rank else "–" for s in seeds)] for m in methods]
    return [f"Rank of each method per seed by test {r0['metric']} after {r0['stage']} (1 = best):", "",
            *_table(["method", *(f"seed {s}" for s in seeds)], body), ""]


def _per_sample_lines(rows: Sequence[Mapping[str, Any]], level: float) -> list[str]:
    if not rows:
        return []
    body = [[str(r["seed"]), f"{r['method']} − {r['baseline']}", str(r["n"]), _num(r["mean_diff"]),
             f"[{_num(r['ci_low'])}, {_num(r['ci_high'])}]", _num(r["p"]), r["verdict"]] for r in rows]
    return ["### Per-sample paired tests (architectures, not methods)", "",
            "Within one seed, the two retrained architectures' losses on the same test samples, paired sample by "
            "sample (paired t-test, two-tailed; bootstrap interval over the samples). This says whether two fixed "
            "architectures differ on this test set, which is what a p-value as small as the paper's Table 8 "
            "needs; it says nothing about how a method does across seeds (the table above does).", "",
            *_table(["seed", "difference", "samples", "mean difference", f"{level:.0%} CI", "paired t p",
                     "verdict"], body), ""]


def write_report(out_dir: str | Path, title: str, summary: Sequence[Mapping[str, Any]],
                 comparisons: Sequence[Mapping[str, Any]], stages: Sequence[Mapping[str, Any]],
                 plots: Mapping[str, str | Path], wall_s: float, stage_wall_s: float | None = None,
                 level: float = 0.95, per_sample: Sequence[Mapping[str, Any]] = (),
                 ranks: Sequence[Mapping[str, Any]] = ()) -> Path:
    """``report.md`` in ``out_dir``: summary, comparisons, stages and overlap, plots (``caption -> path``).

    ``summary`` comes from ``statistics.summarize``, ``comparisons`` from ``statistics.compare``; ``stages``
    are dicts with name, status, wall_s and device_hours; ``stage_wall_s`` defaults to the sum of their wall_s;
    ``per_sample``: per seed, two retrained architectures paired over the same test samples; ``ranks``: each
    method's rank per seed.
    """
    out = Path(out_dir)
    if stage_wall_s is None:
        stage_wall_s = float(sum(s.get("wall_s") or 0.0 for s in stages))
    lines = [f"# {title}", "", "## Results (mean ± std over seeds)", "", *_summary_table(summary), "",
             "## Comparisons", "",
             f"Differences are reference − baseline in each metric's units, over the seeds both methods have, with "
             f"a {level:.0%} percentile bootstrap interval over those seeds. No method is called better (or worse) "
             f"where the interval covers zero, nor where the paired test's p is {1 - level:.2g} or more (with a few "
             f"seeds a bootstrap interval is too narrow to decide alone): the verdict there is 'indistinguishable'. "
             f"Welch's test treats the seeds as independent samples; the paired test is a paired t-test below 6 "
             f"seeds and Wilcoxon's signed-rank test from 6. Where a t-test is undefined, identical samples give "
             f"p = 1 and a constant non-zero difference p = 0.", "",
             *_comparison_table(comparisons, level), "", *_rank_lines(ranks), *_per_sample_lines(per_sample, level),
             "## Stages", "", *_stage_table(stages), "", _overlap(wall_s, stage_wall_s), ""]
    if plots:
        lines += ["## Plots", ""]
        for caption, path in plots.items():
            lines += [f"![{caption}]({_link(path, out)})", ""]
    target = out / "report.md"
    write_atomic(target, "\n".join(lines))
    return target
