"""A search's results on disk: leaderboard (Markdown, CSV), best architecture, incumbent, Pareto front.

Columns follow the task's metrics (loss and perplexity for language models, top-1/top-5 accuracy and loss
for classifiers); the first metric ranks the trials, in its own direction.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tangle_ray.report.plots import metric_axis, plot_incumbent, plot_pareto
from tangle_ray.space import Arch, SearchSpace
from tangle_ray.tasks import Metric, Task


@dataclass(frozen=True)
class TrialRecord:
    """One evaluated architecture; ``index`` is its proposal number (0, 1, ...)."""

    index: int
    arch: Arch
    metrics: dict[str, float]
    params: int
    flops: int
    units: int  # tokens (or images) the score rests on
    finished_at: float | None = None  # when the trial reported (Unix time): the any-time curve of a search


def ranked(records: Sequence[TrialRecord], objective: Metric) -> list[TrialRecord]:
    """Best first by ``objective``; ties by proposal order."""
    return sorted(records, key=lambda r: (objective.sign * r.metrics[objective.key], r.index))


def pareto_front(records: Sequence[TrialRecord], objective: Metric) -> list[TrialRecord]:
    """Trials no other trial beats on both the objective and parameters, by increasing parameter count."""
    sign = objective.sign
    front: list[TrialRecord] = []
    for r in sorted(records, key=lambda r: (r.params, sign * r.metrics[objective.key], r.index)):
        if not front or sign * r.metrics[objective.key] < sign * front[-1].metrics[objective.key]:
            front.append(r)
    return front


def write_report(records: Sequence[TrialRecord], out_dir: str | Path, task: Task, space: SearchSpace,
                 split: str, top: int = 20) -> dict[str, Path]:
    """Write every result file into ``out_dir``; returns their paths by name."""
    if not records:
        raise ValueError("no trials to report")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    objective = task.objective
    board, front = ranked(records, objective), pareto_front(records, objective)
    label, scale = metric_axis(objective.key, objective.label, task.unit.removesuffix("s"))
    paths = {
        "leaderboard_csv": _write_csv(out / "leaderboard.csv", board, task, ranks=True),
        "leaderboard_md": _write_md(out / "leaderboard.md", board[:top], len(board), task, space, split),
        "pareto_csv": _write_csv(out / "pareto.csv", front, task, ranks=False),
        "best_arch": out / "best_arch.json",
    }
    paths["best_arch"].write_text(json.dumps(space.active(board[0].arch), indent=2) + "\n")
    values = [r.metrics[objective.key] for r in sorted(records, key=lambda r: r.index)]
    paths["incumbent_png"] = plot_incumbent(values, out / "incumbent.png", label, objective.mode,
                                            f"Incumbent: {objective.label} on the {split!r} split", scale)
    paths["pareto_png"] = plot_pareto(
        [r.params for r in records], [r.metrics[objective.key] for r in records],
        [r.params for r in front], [r.metrics[objective.key] for r in front], out / "pareto.png", label,
        f"Pareto front: {objective.label} on the {split!r} split", scale,
    )
    return paths


def _columns(task: Task) -> list[str]:
    return [m.key for m in task.metrics] + ["params", "flops", task.unit, "arch"]


def _row(r: TrialRecord, task: Task) -> list[Any]:
    return [repr(r.metrics[m.key]) for m in task.metrics] + [r.params, r.flops, r.units, json.dumps(r.arch)]


def _write_csv(path: Path, records: Sequence[TrialRecord], task: Task, ranks: bool) -> Path:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow((["rank"] if ranks else []) + ["index"] + _columns(task))
        for rank, r in enumerate(records, 1):
            w.writerow(([rank] if ranks else []) + [r.index] + _row(r, task))
    return path


def _write_md(path: Path, records: Sequence[TrialRecord], total: int, task: Task, space: SearchSpace,
              split: str) -> Path:
    metrics = task.metrics
    units = records[0].units if records else 0
    lines = [
        f"# Leaderboard (top {len(records)} of {total})", "",
        f"Scored with inherited weights on {units:,} {task.unit} of the {split!r} split; "
        f"ranked by {task.objective.label} ({'lower' if task.objective.mode == 'min' else 'higher'} is better).", "",
        "| rank | architecture | " + " | ".join(m.label for m in metrics) + " | params | FLOPs | MACs |",
        "|---:|---|" + "---:|" * len(metrics) + "---:|---:|---:|",
    ]
    lines += [
        f"| {k} | `{space.describe(r.arch)}` | " + " | ".join(f"{r.metrics[m.key]:{m.fmt}}" for m in metrics)
        + f" | {r.params:,} | {r.flops:.3g} | {r.flops / 2:.3g} |"
        for k, r in enumerate(records, 1)
    ]
    lines += ["", "FLOPs: forward, one sample, 2 per multiply-add (as `torch.utils.flop_counter` counts them); MACs:"
              " multiply-adds, what the AutoFormer, OFA and TangleNAS tables call FLOPs."]
    path.write_text("\n".join(lines) + "\n")
    return path
