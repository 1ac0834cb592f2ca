"""A search's results on disk: leaderboard (Markdown, CSV), best architecture, incumbent, Pareto front."""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from tangle_ray.report.plots import plot_incumbent, plot_pareto
from tangle_ray.space import DEPTH, Arch

COLUMNS = ("rank", "index", "loss", "perplexity", "params", "flops", "arch")


@dataclass(frozen=True)
class TrialRecord:
    """One evaluated architecture; ``index`` is its proposal number (0, 1, ...)."""

    index: int
    arch: Arch
    loss: float
    perplexity: float
    params: int
    flops: int


def ranked(records: Sequence[TrialRecord]) -> list[TrialRecord]:
    """Best (lowest loss) first; ties by proposal order."""
    return sorted(records, key=lambda r: (r.loss, r.index))


def pareto_front(records: Sequence[TrialRecord]) -> list[TrialRecord]:
    """Trials no other trial beats on both loss and parameters, by increasing parameter count."""
    front: list[TrialRecord] = []
    for r in sorted(records, key=lambda r: (r.params, r.loss, r.index)):
        if not front or r.loss < front[-1].loss:
            front.append(r)
    return front


def describe(arch: Arch) -> str:
    """A compact one-line architecture: global choices, then the per-layer choices of active layers."""
    depth = int(arch.get(DEPTH, 0))
    parts = [
        f"{k}={','.join(map(str, v[:depth]))}" if isinstance(v, list) else f"{k}={v}" for k, v in arch.items()
    ]
    return " ".join(parts)


def write_report(records: Sequence[TrialRecord], out_dir: str | Path, top: int = 20) -> dict[str, Path]:
    """Write every result file into ``out_dir``; returns their paths by name."""
    if not records:
        raise ValueError("no trials to report")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    board, front = ranked(records), pareto_front(records)
    paths = {
        "leaderboard_csv": _write_csv(out / "leaderboard.csv", board, ranks=True),
        "leaderboard_md": _write_md(out / "leaderboard.md", board[:top], len(board)),
        "pareto_csv": _write_csv(out / "pareto.csv", front, ranks=False),
        "best_arch": out / "best_arch.json",
    }
    paths["best_arch"].write_text(json.dumps(board[0].arch, indent=2) + "\n")
    by_index = sorted(records, key=lambda r: r.index)
    paths["incumbent_png"] = plot_incumbent([r.loss for r in by_index], out / "incumbent.png")
    paths["pareto_png"] = plot_pareto(
        [r.params for r in records],
        [r.loss for r in records],
        [r.params for r in front],
        [r.loss for r in front],
        out / "pareto.png",
    )
    return paths


def _write_csv(path: Path, records: Sequence[TrialRecord], ranks: bool) -> Path:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(COLUMNS if ranks else COLUMNS[1:])
        for rank, r in enumerate(records, 1):
            row = [r.index, repr(r.loss), repr(r.perplexity), r.params, r.flops, json.dumps(r.arch)]
            w.writerow([rank, *row] if ranks else row)
    return path


def _write_md(path: Path, records: Sequence[TrialRecord], total: int) -> Path:
    lines = [
        f"# Leaderboard (top {len(records)} of {total})",
        "",
        "| rank | architecture | loss | perplexity | params | FLOPs |",
        "|---:|---|---:|---:|---:|---:|",
    ]
    lines += [
        f"| {k} | `{describe(r.arch)}` | {r.loss:.4f} | {r.perplexity:.2f} | {r.params:,} | {r.flops:.3g} |"
        for k, r in enumerate(records, 1)
    ]
    path.write_text("\n".join(lines) + "\n")
    return path
