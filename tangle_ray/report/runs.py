"""Files a person reads after a training run: arch.json, CSVs, trajectory and any-time PNGs, summary.md."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

from tangle_ray.report.plots import plot_anytime, plot_choice_trajectory
from tangle_ray.space import SearchSpace


def write_run_report(run_dir: Path, plan, history: dict[str, list], arch: dict[str, Any],
                     export_dir: Path | None, test_scores: dict[str, Any] | None = None) -> Path:
    """Every file of a finished run's report; ``plan`` is the run's ``train.config.RunPlan``."""
    space = plan.space
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "arch.json").write_text(json.dumps(arch, indent=2) + "\n")
    _write_csv(run_dir / "metrics.csv", history["metrics"])
    _write_csv(run_dir / "anytime.csv", [{k: v for k, v in r.items() if k != "arch"} for r in history["anytime"]])
    plots = []
    if history["alphas"]:
        _write_csv(run_dir / "alphas.csv", list(_alpha_rows(history["alphas"], space)))
        plots += plot_alpha_trajectories(history["alphas"], space, run_dir)
    if history["anytime"]:
        steps, losses = zip(*[(r["step"], r["valid_loss"]) for r in history["anytime"]])
        plots.append(plot_anytime(steps, losses, run_dir / "anytime.png"))
    summary = _summary(plan, history, arch, export_dir, plots, test_scores)
    (run_dir / "summary.md").write_text(summary)
    return run_dir / "summary.md"


def _alpha_rows(alphas: list[dict[str, Any]], space: SearchSpace):
    for record in alphas:
        for d in space.dims.values():
            rows = record[d.name] if d.per_layer else [record[d.name]]
            for layer, probs in enumerate(rows):
                for value, p in zip(d.values, probs):
                    yield {"step": record["step"], "choice": d.name, "layer": layer if d.per_layer else "",
                           "value": value, "probability": p}


def plot_alpha_trajectories(alphas: list[dict[str, Any]], space: SearchSpace, out_dir: Path) -> list[Path]:
    """One PNG per choice: softmax(alpha) of each option over the steps, one panel per layer."""
    steps = [r["step"] for r in alphas]
    paths = []
    for d in space.dims.values():
        panels = range(space.max_layers) if d.per_layer else [None]
        probs = [[r[d.name][p] if d.per_layer else r[d.name] for r in alphas] for p in panels]
        paths.append(plot_choice_trajectory(steps, probs, d.values, d.name, out_dir / f"alphas_{d.name}.png"))
    return paths


def _write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    if not rows:
        return
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def _summary(plan, history, arch, export_dir, plots: list[Path], test_scores: dict[str, Any] | None) -> str:
    cfg, space, unit = plan.config, plan.space, plan.task.unit
    last = history["metrics"][-1] if history["metrics"] else {}
    per_sample = plan.task.units_per_sample(space.fixed)
    lines = [
        f"# Run `{cfg.run.name}`", "",
        f"- space: `{space.name}`, method: `{cfg.method}`" + (f" (mixer `{cfg.mixer}`)" if cfg.method == "tanglenas" else ""),
        f"- steps: {last.get('step', 0)} of {cfg.steps}, global batch {cfg.global_batch_size} x "
        f"{per_sample} {unit}, {cfg.scaling.num_workers} worker(s), ZeRO stage {cfg.zero_stage}",
        f"- final train loss: {last.get('train_loss', float('nan')):.4f}"
        + (f", architecture-split loss: {last['valid_loss']:.4f}" if "valid_loss" in last else ""),
        f"- throughput: {last.get(f'{unit}_per_s', 0):,.0f} {unit}/s", "",
        "## Chosen architecture", "", "```json", json.dumps(arch), "```", "",
        f"{space.param_count(arch) / 1e6:.2f}M parameters, "
        f"{space.flops(arch) / 1e9:.2f} GFLOPs per sample of {per_sample} {unit} (forward).", "",
    ]
    if test_scores:
        metrics = ", ".join(f"{m.label} {test_scores[m.key]:{m.fmt}}" for m in plan.task.metrics)
        lines += ["## Test split", "", f"The trained model on {test_scores['samples']:,} held-out test samples: "
                  f"{metrics} (`test_scores.json`).", ""]
    if history["anytime"]:
        lines += ["## Any-time performance", "", "| step | valid loss of argmax arch |", "|---:|---:|"]
        lines += [f"| {r['step']} | {r['valid_loss']:.4f} |" for r in history["anytime"]]
        lines.append("")
    if plots:
        lines += ["## Plots", ""] + [f"![{p.stem}]({p.name})" for p in plots] + [""]
    if export_dir:
        lines += ["## Export", "", f"Extracted model and consolidated supernet: `{export_dir}`", ""]
    return "\n".join(lines)
