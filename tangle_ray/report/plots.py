"""Plotting helpers: small functions that each write one PNG (matplotlib, Agg canvas, no pyplot state)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure


def new_axes(
    title: str, xlabel: str, ylabel: str, size: tuple[float, float] = (5.5, 3.8)
) -> tuple[Figure, Axes]:
    fig = Figure(figsize=size, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    ax.grid(True, alpha=0.3)
    return fig, ax


def save(fig: Figure, path: str | Path, dpi: int = 120) -> Path:
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=dpi)
    return out


def plot_incumbent(values: Sequence[float], path: str | Path, label: str = "loss", mode: str = "min",
                   title: str = "Incumbent") -> Path:
    """The score of each trial (dots) and the best so far (step line) against the number of trials."""
    fig, ax = new_axes(title, "trials", label)
    x = range(1, len(values) + 1)
    pick = min if mode == "min" else max
    best: list[float] = []
    for v in values:
        best.append(v if not best else pick(best[-1], v))
    ax.scatter(x, values, s=6, alpha=0.35, color="tab:gray", label="trial")
    ax.step(x, best, where="post", color="tab:blue", label="best so far")
    ax.legend()
    return save(fig, path)


def plot_pareto(
    params: Sequence[float],
    values: Sequence[float],
    front_params: Sequence[float],
    front_values: Sequence[float],
    path: str | Path,
    label: str = "loss",
    title: str = "Pareto front",
) -> Path:
    """All trials (dots) and their Pareto front (line) of the score (``label``) against parameter count."""
    fig, ax = new_axes(title, "parameters", label)
    ax.scatter(params, values, s=6, alpha=0.35, color="tab:gray", label="trial")
    ax.step(front_params, front_values, where="post", marker="o", ms=3, color="tab:red", label="Pareto front")
    ax.legend()
    return save(fig, path)


def plot_anytime(steps: Sequence[int], values: Sequence[float], path: str | Path,
                 label: str = "validation loss of the argmax architecture") -> Path:
    """Any-time performance: the score (``label``) of the architecture a run follows, against the step."""
    fig, ax = new_axes("Any-time performance", "step", label, (5.5, 3.4))
    ax.plot(steps, values, marker="o")
    return save(fig, path)


def plot_choice_trajectory(
    steps: Sequence[int], probs: Sequence[Sequence[Sequence[float]]], values: Sequence[float], name: str,
    path: str | Path,
) -> Path:
    """softmax(alpha) of every option of one choice over the steps: ``probs[panel][step][option]``, one panel
    per layer for a per-layer choice (the paper's MLP-ratio-per-layer figure) or a single panel."""
    fig = Figure(figsize=(2.6 * len(probs) + 1, 2.9), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(probs), sharey=True, squeeze=False)[0]
    for panel, (ax, rows) in enumerate(zip(axes, probs)):
        for k, value in enumerate(values):
            ax.plot(steps, [r[k] for r in rows], label=f"{value:g}")
        ax.set(title=f"layer {panel + 1}" if len(probs) > 1 else name, xlabel="step")
        ax.grid(True, alpha=0.3)
    axes[0].set_ylabel(f"softmax(alpha) of {name}")
    axes[-1].legend(title=name, fontsize=8)
    return save(fig, path)
