"""Files a person reads after a training run: arch.json, CSVs, trajectory and any-time PNGs, summary.md."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any

from tangle_ray.report.plots import metric_axis, plot_anytime, plot_choice_trajectory
from tangle_ray.space import Arch, SearchSpace
from tangle_ray.train.history import RunHistory


def write_run_report(run_dir: Path, plan, history: RunHistory, arch: Arch | None, export_dir: Path | None,
                     test_scores: dict[str, Any] | None = None,
                     against_random: dict[str, Any] | None = None, timeline: dict[str, float] | None = None) -> Path:
    """Every file of a finished run's report; ``plan`` is the run's ``train.config.RunPlan``; ``timeline``:
    where ``fit()``'s wall time went (``RunHistory.timeline``)."""
    space, objective = plan.space, plan.task.objective
    run_dir.mkdir(parents=True, exist_ok=True)
    if arch is not None:
        (run_dir / "arch.json").write_text(json.dumps(space.active(arch), indent=2) + "\n")
    _write_csv(run_dir / "metrics.csv", history.metrics)
    _write_csv(run_dir / "anytime.csv", [{k: v for k, v in r.items() if k != "arch"} for r in history.anytime])
    plots = []
    if history.alphas:
        _write_csv(run_dir / "alphas.csv", list(_alpha_rows(history.alphas, space)))
        plots += plot_alpha_trajectories(history.alphas, space, run_dir, arch)
    if history.anytime:
        key = f"valid_{objective.key}"
        steps, values = zip(*[(r["step"], r[key]) for r in history.anytime])
        ylabel, scale = metric_axis(objective.key, f"validation {objective.label}", plan.task.unit.removesuffix("s"))
        method = plan.config.method_class
        plots.append(plot_anytime(steps, values, run_dir / "anytime.png", f"validation {objective.label} of "
                                  f"the {method.followed}", ylabel=ylabel, scale=scale,
                                  changes=arch_changes(history.anytime, space),
                                  change_label=f"{method.followed} changed"))
    summary = _summary(plan, history, arch, export_dir, plots, test_scores, against_random, timeline or {})
    (run_dir / "summary.md").write_text(summary)
    return run_dir / "summary.md"


SET_UP = {"mirror_s": "data mirror", "imports_s": "imports", "data_s": "data", "model_s": "model",
          "deepspeed_s": "DeepSpeed", "restore_s": "restore"}


def timeline_text(timeline: dict[str, float]) -> str:
    """``RunHistory.timeline`` in one line."""
    parts = ", ".join(f"{label} {timeline[k]:.1f}" for k, label in SET_UP.items() if k in timeline)
    set_up = sum(timeline.get(k, 0.0) for k in SET_UP)
    return (f"fit() {timeline['fit_s']:.1f} s = Ray Train starting the workers {timeline['start_s']:.1f} s (in their "
            f"processes {timeline['process_s']:.1f}) + set-up "
            f"{set_up:.1f} s ({parts}) + training loop {timeline['loop_s']:.1f} s + last evaluation, checkpoint and "
            f"stop {timeline['end_s']:.1f} s")


def confidence(alphas: dict[str, Any], space: SearchSpace,
               active: int | list[int]) -> list[tuple[str, float, float]]:
    """For every active choice: its name, the probability of the chosen value and its margin over the
    runner-up (softmax of the final architecture parameters). ``active``: the layers the chosen architecture
    runs (``space.active_layers``), or its depth (the first layers)."""
    layers = list(range(active)) if isinstance(active, int) else list(active)
    rows = []
    for d in space.dims.values():
        probs = [(i, alphas[d.name][i]) for i in layers] if d.per_layer else [(0, alphas[d.name])]
        for layer, p in probs:
            top = sorted(p, reverse=True)
            rows.append((f"{d.name}[{layer}]" if d.per_layer else d.name, top[0], top[0] - top[1]))
    return rows


def _alpha_rows(alphas: list[dict[str, Any]], space: SearchSpace):
    for record in alphas:
        for d in space.dims.values():
            rows = record[d.name] if d.per_layer else [record[d.name]]
            for layer, probs in enumerate(rows):
                for value, p in zip(d.values, probs):
                    yield {"step": record["step"], "choice": d.name, "layer": layer if d.per_layer else "",
                           "value": value, "probability": p}


def plot_alpha_trajectories(alphas: list[dict[str, Any]], space: SearchSpace, out_dir: Path,
                            arch: Arch | None = None) -> list[Path]:
    """One PNG per choice: softmax(alpha) of each option over the steps, one panel per layer; with the chosen
    ``arch``, the layers beyond its depth are marked."""
    steps = [r["step"] for r in alphas]
    depth = space.active_layers(arch) if arch is not None else None  # a depth per stage too
    paths = []
    for d in space.dims.values():
        panels = range(space.max_layers) if d.per_layer else [None]
        probs = [[r[d.name][p] if d.per_layer else r[d.name] for r in alphas] for p in panels]
        paths.append(plot_choice_trajectory(steps, probs, d.values, d.name, out_dir / f"alphas_{d.name}.png",
                                            active_layers=depth if d.per_layer else None))
    return paths


def arch_changes(anytime: list[dict[str, Any]], space: SearchSpace) -> list[int]:
    """The steps of the any-time curve whose architecture (its active layers) differs from the previous point's."""
    keys = [json.dumps(space.active(r["arch"]), sort_keys=True) for r in anytime]
    return [r["step"] for r, before, now in zip(anytime[1:], keys, keys[1:]) if now != before]


def _write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    if not rows:
        return
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def _summary(plan, history, arch, export_dir, plots: list[Path], test_scores: dict[str, Any] | None,
             against_random: dict[str, Any] | None, timeline: dict[str, float]) -> str:
    cfg, space, task = plan.config, plan.space, plan.task
    method = cfg.method_class
    unit, last = task.unit, history.metrics[-1] if history.metrics else {}
    per_sample = task.units_per_sample(space.fixed)
    lines = [
        f"# Run `{cfg.run.name}`", "",
        f"- space: `{space.name}`, method: {method.describe(cfg)}",
        f"- steps: {last.get('step', 0)} of {cfg.steps}, global batch {cfg.global_batch_size} x "
        f"{per_sample} {unit}, {cfg.scaling.num_workers} worker(s), ZeRO stage {cfg.zero_stage}",
        f"- final training loss ({method.loss_note()}): "
        f"{last.get('train_loss', float('nan')):.4f}"
        + (f"; architecture-split loss (superposed): {last['arch_loss']:.4f}" if "arch_loss" in last else ""),
        f"- throughput: {last.get(f'{unit}_per_s', 0):,.0f} {unit}/s",
        *([f"- wall time: {timeline_text(timeline)}"] if timeline else []), "",
    ]
    if arch is None:
        lines += ["## Next step", "", "SPOS trains the supernet and chooses no architecture. Search it with "
                  "inherited weights on Ray Tune: `tangle-ray tune recipes/tune/<search>.yaml "
                  f"supernet={export_dir / 'supernet' if export_dir else 'RUN/export/supernet'}`.", ""]
    else:
        lines += ["## Chosen architecture" if method.chooses_arch else "## Architecture", "",
                  "```json", json.dumps(space.active(arch)), "```", "",
                  f"{space.param_count(arch) / 1e6:.2f}M parameters, "
                  f"{space.flops(arch) / 1e9:.3g} GFLOPs per sample of {per_sample} {unit} (forward, 2 per "
                  f"multiply-add) = {space.flops(arch) / 2e9:.3g} GMACs (what the papers' tables call FLOPs).", ""]
    if history.alphas:
        lines += _confidence_lines(history, space, arch)
    if against_random:
        lines += _random_lines(against_random, task)
    if test_scores:
        lines += ["## Test split", "", f"The trained model on {test_scores['samples']:,} held-out test samples: "
                  f"{_metrics_text(test_scores, task)} (`test_scores.json`).", ""]
    if history.anytime:
        key = f"valid_{task.objective.key}"
        changes = len(arch_changes(history.anytime, space))
        lines += ["## Any-time performance", "", method.anytime_note(cfg, task.objective.label, changes), "",
                  f"| step | {task.objective.label} | architecture |", "|---:|---:|---|"]
        lines += [f"| {r['step']} | {metric_text(task.objective, r[key])} | `{space.describe(r['arch'])}` |"
                  for r in history.anytime]
        lines.append("")
    if plots:
        lines += ["## Plots", ""] + [f"![{p.stem}]({p.name})" for p in plots] + [""]
    if export_dir:
        lines += ["## Export", "", method.export_note(export_dir), ""]
    return "\n".join(lines)


def _confidence_lines(history: RunHistory, space: SearchSpace, arch: Arch) -> list[str]:
    first, final = history.metrics[0], history.alphas[-1]
    rows = confidence(final, space, space.active_layers(arch))
    entropy, start = history.metrics[-1].get("arch_entropy"), history.metrics[0].get("arch_entropy")
    h_max = sum(math.log(len(d.values)) * (space.max_layers if d.per_layer else 1) for d in space.dims.values())
    h_max /= sum(space.max_layers if d.per_layer else 1 for d in space.dims.values())
    weakest = min(rows, key=lambda r: r[2])
    lines = ["## How sure the search is", ""]
    if entropy is not None and start is not None:
        lines.append(f"Mean entropy of the architecture weights: {start:.3f} at step {first['step']} -> "
                     f"{entropy:.3f} now (uniform: {h_max:.3f}). The weakest choice is `{weakest[0]}` with a margin "
                     f"of {weakest[2]:.3f} over its runner-up.")
    lines += ["", "| choice | probability | margin over runner-up |", "|---|---:|---:|"]
    lines += [f"| `{name}` | {p:.3f} | {m:.3f} |" for name, p, m in rows]
    return lines + [""]


def _random_lines(result: dict[str, Any], task) -> list[str]:
    objective = next(m for m in task.metrics if m.key == result["metric"])
    randoms = sorted(result["random"], key=lambda v: objective.sign * v)
    k = len(randoms)
    return ["## Against random architectures", "",
            f"With the supernet's inherited weights, on {result['samples']:,} held-out test samples, the chosen "
            f"architecture scores {objective.label} {metric_text(objective, result['chosen'])} and beats "
            f"{result['beaten']} of {k} random architectures of the space (theirs: best "
            f"{metric_text(objective, randoms[0])}, median {metric_text(objective, randoms[k // 2])}, worst "
            f"{metric_text(objective, randoms[-1])}; `against_random.json`).", "", *_median_lines(result, objective)]


def against_random_verdict(result: dict[str, Any]) -> str:
    """One sentence: how the chosen architecture compares with the random architectures' median, the
    interval of the difference, and what it allows."""
    d = result.get("against_median")
    if d is None:
        return "too few evaluation batches for an interval: no verdict against random architectures"
    says = {"better": "better than", "worse": "worse than", "indistinguishable": "indistinguishable from"}
    if _percent(result["metric"]):  # an accuracy: the difference in percentage points, as the plots show it
        estimate, low, high = (f"{100 * d[k]:+.1f}" for k in ("estimate", "low", "high"))
        estimate += " percentage points"
    else:
        estimate, low, high = (f"{d[k]:+.4f}" for k in ("estimate", "low", "high"))
    text = (f"{says[d['verdict']]} the random architectures' median {result['metric']}: difference "
            f"{estimate} (positive = better), {d['level']:.0%} interval [{low}, {high}] ({d['test']})")
    return text + ("; the interval covers zero" if d["verdict"] == "indistinguishable" else "")


def _percent(key: str, label: str = "") -> bool:
    """Whether a metric is an accuracy, which a person reads in percent (as the plots' ``metric_axis`` shows it)."""
    return metric_axis(key, label)[1] == 100.0


def metric_text(metric, value: float) -> str:
    """A metric's value as the reports print it: an accuracy in percent with one decimal (``90.2%``), as the plots
    show it; any other metric (a loss, a perplexity) in its own format, unchanged."""
    return f"{100 * value:.1f}%" if _percent(metric.key, metric.label) else f"{value:{metric.fmt}}"


def _metrics_text(scores: dict[str, Any], task) -> str:
    """The task's metrics of ``scores``, e.g. ``top-1 accuracy 90.2%, top-5 accuracy 99.4%, loss 0.3120``."""
    return ", ".join(f"{m.label} {metric_text(m, scores[m.key])}" for m in task.metrics if m.key in scores)


def scores_line(scores: dict[str, Any], task) -> str:
    """A trained model's test-split scores in one line (what ``tangle-ray retrain`` prints once at its end)."""
    return f"{_metrics_text(scores, task)} on {scores['samples']:,} held-out test samples"


def _median_lines(result: dict[str, Any], objective) -> list[str]:
    return [f"The chosen architecture is {against_random_verdict(result)}.", ""]
