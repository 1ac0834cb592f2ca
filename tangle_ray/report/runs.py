"""Files a person reads after a training run: arch.json, CSVs, trajectory and any-time PNGs, summary.md."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from tangle_ray.space import SearchSpace  # noqa: E402


def write_run_report(run_dir: Path, cfg, history: dict[str, list], arch: dict[str, Any], space: SearchSpace,
                     export_dir: Path | None) -> Path:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "arch.json").write_text(json.dumps(arch, indent=2) + "\n")
    _write_csv(run_dir / "metrics.csv", history["metrics"])
    _write_csv(run_dir / "anytime.csv", [{k: v for k, v in r.items() if k != "arch"} for r in history["anytime"]])
    plots = []
    if history["alphas"]:
        _write_csv(run_dir / "alphas.csv", list(_alpha_rows(history["alphas"], space)))
        plots += plot_alpha_trajectories(history["alphas"], space, run_dir)
    if history["anytime"]:
        plots.append(plot_anytime(history["anytime"], run_dir / "anytime.png"))
    summary = _summary(cfg, history, arch, space, export_dir, plots)
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
        n_panels = space.max_layers if d.per_layer else 1
        fig, axes = plt.subplots(1, n_panels, figsize=(2.6 * n_panels + 1, 2.8), sharey=True, squeeze=False)
        for layer, ax in enumerate(axes[0]):
            for k, value in enumerate(d.values):
                probs = [(r[d.name][layer] if d.per_layer else r[d.name])[k] for r in alphas]
                ax.plot(steps, probs, label=f"{value:g}")
            ax.set_title(f"layer {layer + 1}" if d.per_layer else d.name, fontsize=9)
            ax.set_xlabel("step")
        axes[0][0].set_ylabel(f"softmax(alpha) of {d.name}")
        axes[0][-1].legend(title=d.name, fontsize=8)
        fig.tight_layout()
        path = out_dir / f"alphas_{d.name}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def plot_anytime(anytime: list[dict[str, Any]], path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.plot([r["step"] for r in anytime], [r["valid_loss"] for r in anytime], marker="o")
    ax.set_xlabel("step")
    ax.set_ylabel("validation loss of the argmax architecture")
    ax.set_title("any-time performance")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    if not rows:
        return
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def _summary(cfg, history, arch, space: SearchSpace, export_dir, plots: list[Path]) -> str:
    last = history["metrics"][-1] if history["metrics"] else {}
    lines = [
        f"# Run `{cfg.run_name()}`", "",
        f"- space: `{space.name}`, method: `{cfg.method}`" + (f" (mixer `{cfg.mixer}`)" if cfg.method == "tanglenas" else ""),
        f"- steps: {last.get('step', 0)} of {cfg.steps}, global batch {cfg.global_batch_size} x "
        f"{space.fixed['block_size']} tokens, {cfg.scaling.num_workers} worker(s), ZeRO stage {cfg.zero_stage}",
        f"- final train loss: {last.get('train_loss', float('nan')):.4f}"
        + (f", architecture-split loss: {last['valid_loss']:.4f}" if "valid_loss" in last else ""),
        f"- throughput: {last.get('tokens_per_s', 0):,.0f} tokens/s", "",
        "## Chosen architecture", "", "```json", json.dumps(arch), "```", "",
        f"{space.param_count(arch) / 1e6:.2f}M parameters, "
        f"{space.flops(arch) / 1e9:.2f} GFLOPs per {space.fixed['block_size']}-token sequence (forward).", "",
    ]
    if history["anytime"]:
        lines += ["## Any-time performance", "", "| step | valid loss of argmax arch |", "|---:|---:|"]
        lines += [f"| {r['step']} | {r['valid_loss']:.4f} |" for r in history["anytime"]]
        lines.append("")
    if plots:
        lines += ["## Plots", ""] + [f"![{p.stem}]({p.name})" for p in plots] + [""]
    if export_dir:
        lines += ["## Export", "", f"Extracted model and consolidated supernet: `{export_dir}`", ""]
    return "\n".join(lines)
