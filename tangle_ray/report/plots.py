"""Plotting helpers: small functions that each write one PNG (matplotlib, Agg canvas, no pyplot state)."""

from __future__ import annotations

import textwrap
from collections.abc import Sequence
from pathlib import Path

from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, MaxNLocator


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


def wrapped(label: str, width: int = 38) -> str:
    """An axis label over as many lines as it needs to fit beside a plot of ordinary height."""
    return textwrap.fill(label, width)


def metric_axis(key: str, label: str, unit: str | None = None) -> tuple[str, float]:
    """An axis label for a metric with its unit, and the factor that turns its values into that unit: accuracies
    in percent, a loss as cross-entropy in nats per ``unit`` (a token, an image), perplexity as the exponential
    of the loss. Other metrics keep their label."""
    if key.startswith("top") or "accuracy" in label:
        return f"{label} (%)", 100.0
    if key == "loss":
        return f"{label} (cross-entropy, nats{f' per {unit}' if unit else ''})", 1.0
    if key == "perplexity":
        return f"{label} (exp of the loss)", 1.0
    return label, 1.0


def plot_incumbent(values: Sequence[float], path: str | Path, label: str = "loss", mode: str = "min",
                   title: str = "Incumbent", scale: float = 1.0) -> Path:
    """The score of each trial (dots) and the best so far (step line) against the trials in proposal order;
    ``label`` is the y axis (with its unit), ``scale`` turns values into that unit. The legend sits below the
    axes, where it covers no point."""
    fig, ax = new_axes(title, "trial (in proposal order)", wrapped(label), (5.5, 4.2))
    x = range(1, len(values) + 1)
    pick = min if mode == "min" else max
    best: list[float] = []
    for v in values:
        best.append(v if not best else pick(best[-1], v))
    ax.scatter(x, [v * scale for v in values], s=12, alpha=0.5, color="tab:gray", label="trial")
    ax.step(x, [v * scale for v in best], where="post", color="tab:blue", label="best so far")
    ax.ticklabel_format(axis="y", useOffset=False)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.legend(loc="outside lower center", ncol=2, frameon=False)
    return save(fig, path)


def plot_pareto(
    params: Sequence[float],
    values: Sequence[float],
    front_params: Sequence[float],
    front_values: Sequence[float],
    path: str | Path,
    label: str = "loss",
    title: str = "Pareto front",
    scale: float = 1.0,
) -> Path:
    """All trials (dots) and their Pareto front (line) of the score (``label``, values times ``scale``) against
    the parameter count, in millions."""
    fig, ax = new_axes(title, "parameters", wrapped(label), (5.5, 4.2))
    ax.scatter([p / 1e6 for p in params], [v * scale for v in values], s=12, alpha=0.5, color="tab:gray",
               label="trial")
    ax.step([p / 1e6 for p in front_params], [v * scale for v in front_values], where="post", marker="o", ms=3,
            color="tab:red", label="Pareto front")
    ax.ticklabel_format(useOffset=False, style="plain")
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}M"))
    fig.legend(loc="outside lower center", ncol=2, frameon=False)
    return save(fig, path)


def plot_anytime(steps: Sequence[int], values: Sequence[float], path: str | Path,
                 label: str = "validation loss of the argmax architecture", ylabel: str | None = None,
                 scale: float = 1.0, changes: Sequence[int] = (), change_label: str = "argmax changed") -> Path:
    """Any-time performance: the score of the architecture a run follows (``label``, the title's second line)
    against the step; ``ylabel`` names the score with its unit (default ``label``), ``scale`` turns values into
    that unit. ``changes``: the steps whose architecture differs from the previous point's, each marked by a
    dotted line (``change_label`` in the legend)."""
    fig, ax = new_axes("", "training step", wrapped(ylabel or label), (6.0, 4.0))
    ax.set_title(f"Any-time performance\n{label}", fontsize=10)
    ax.plot(steps, [v * scale for v in values], marker="o", label="score")
    for k, step in enumerate(changes):
        ax.axvline(step, ls=":", lw=1.2, color="tab:orange", label=change_label if k == 0 else None)
    ax.ticklabel_format(axis="y", useOffset=False)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if changes:
        fig.legend(loc="outside lower center", ncol=2, frameon=False)
    return save(fig, path)


def plot_choice_trajectory(
    steps: Sequence[int], probs: Sequence[Sequence[Sequence[float]]], values: Sequence[float], name: str,
    path: str | Path, active_layers: int | Sequence[int] | None = None,
) -> Path:
    """softmax(alpha) of every option of one choice over the steps: ``probs[panel][step][option]``, one panel
    per layer for a per-layer choice (the paper's MLP-ratio-per-layer figure) or a single panel. One legend for
    all panels; with ``active_layers`` (the chosen depth, or the indices of the layers the chosen architecture
    runs: a depth per stage), the panels of the other layers are shaded and titled as unused by it."""
    fig = Figure(figsize=(2.6 * len(probs) + 1.6, 3.3), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(probs), sharey=True, squeeze=False)[0]
    per_layer = len(probs) > 1
    beyond = False
    if active_layers is not None and not isinstance(active_layers, int) and \
            list(active_layers) == list(range(len(active_layers))):
        active_layers = len(active_layers)  # the first layers: a depth
    used = (None if active_layers is None else
            set(range(active_layers)) if isinstance(active_layers, int) else set(active_layers))
    for panel, (ax, rows) in enumerate(zip(axes, probs)):
        unused = per_layer and used is not None and panel not in used
        beyond |= unused
        for k, value in enumerate(values):
            ax.plot(steps, [r[k] for r in rows], label=f"{value:g}", alpha=0.45 if unused else 1.0,
                    color=f"C{k}")
        title = f"layer {panel + 1}" if per_layer else name
        if unused:
            ax.set_facecolor("0.92")
            title += " (beyond depth)" if isinstance(active_layers, int) else " (not run)"
        ax.set(title=title, xlabel="training step", ylim=(0, 1))
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(True, alpha=0.3)
    axes[0].set_ylabel("probability (softmax of alpha)")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, title=name, loc="outside right center", fontsize=8)
    if per_layer:
        note = ("" if not beyond else f"; shaded: layers beyond the chosen depth of {active_layers}"
                if isinstance(active_layers, int) else "; shaded: layers the chosen architecture does not run")
        fig.suptitle(f"Architecture weights of {name}, per layer{note}", fontsize=10)
    return save(fig, path)
