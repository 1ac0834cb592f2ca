"""A scaling grid's outputs: ``points.csv`` (long form), ``scale.json``, ``report.md`` and its plots."""

from __future__ import annotations

import csv
import io
import json
import math
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from tangle_ray.report.plots import new_axes, save
from tangle_ray.scaling.config import ScaleConfig
from tangle_ray.scaling.measure import measured
from tangle_ray.scaling.plan import GRID_COLUMNS, PlannedPoint
from tangle_ray.stages import write_atomic

COLUMNS = ("point_id", *GRID_COLUMNS, "metric", "value")
GIB = 2**30
PREDICTED = ("param_bytes", "grad_bytes", "optimizer_state_bytes", "master_bytes", "activation_bytes", "peak_bytes")


def write_results(config: ScaleConfig, points: list[PlannedPoint], records: dict[str, dict[str, Any]],
                  out: Path) -> dict[str, Any]:
    rows = [_point_result(config, p, records[p.point.key]) for p in points]
    _add_efficiency(rows)
    long = [{"point_id": r["point_id"], **r["grid"], "metric": k, "value": v}
            for r in rows for k, v in sorted({**r["measured"], **{f"predicted_{k}": v for k, v in
                                                                  r["predicted"].items()}, "oom": r["oom"]}.items())]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(long)
    write_atomic(out / "points.csv", buffer.getvalue())
    plots = _plots(config, rows, out)
    result = {"name": config.name, "mode": config.mode, "device": config.device.name,
              "peak_flops": config.device.peak, "points": rows}
    write_atomic(out / "scale.json", json.dumps(result, indent=2) + "\n")
    write_atomic(out / "report.md", _report(config, rows, plots, out))
    return result


def _point_result(config: ScaleConfig, p: PlannedPoint, record: dict[str, Any]) -> dict[str, Any]:
    oom = record.get("status") == "oom"
    result = {"point_id": p.point.key, "grid": p.point.grid_row(), "oom": int(oom), "folder": record["folder"],
              "predicted": {k: p.predicted[k] for k in PREDICTED},
              "measured": {} if oom else measured(p, record, config.device.peak),
              "arch": record.get("arch"), "wall_s": record["wall_s"]}
    if oom:
        result["error"] = record.get("error", "")
    else:
        result["memory_error"] = result["measured"]["peak_bytes"] / p.predicted["peak_bytes"] - 1
    return result


def _add_efficiency(rows: list[dict[str, Any]]) -> None:
    """efficiency = tokens/s(N) / (N x tokens/s(1)), against the 1-worker point of the same size, ZeRO stage,
    method, micro-batch and mode (and accumulation in weak mode)."""
    def base_key(g: dict[str, Any]) -> tuple:
        return (g["space"], g["zero_stage"], g["method"], g["micro_batch"], g["mode"],
                g["grad_accum"] if g["mode"] == "weak" else None)

    single = {base_key(r["grid"]): r["measured"]["tokens_per_s"] for r in rows
              if r["grid"]["workers"] == 1 and not r["oom"]}
    for r in rows:
        one = single.get(base_key(r["grid"]))
        if one and not r["oom"]:
            r["measured"]["efficiency"] = r["measured"]["tokens_per_s"] / (r["grid"]["workers"] * one)


# ------------------------------------------------------------------------------------------------ plots
def _plots(config: ScaleConfig, rows: list[dict[str, Any]], out: Path) -> dict[str, Path]:
    ok = [r for r in rows if not r["oom"]]
    plots = {"Throughput against workers": _throughput(ok, out / "throughput_vs_workers.png"),
             "Memory per worker against ZeRO stage and size": _memory(rows, out / "memory_per_worker.png")}
    if any("valid_loss" in r["measured"] for r in ok):
        plots["Loss against compute"] = _loss(ok, out / "loss_vs_compute.png")
    if any(r["arch"] for r in ok):
        plots["Chosen architecture against supernet size"] = _arch_size(ok, out / "arch_vs_supernet.png")
    return plots


def _series(rows: list[dict[str, Any]], *keys: str) -> dict[tuple, list[dict[str, Any]]]:
    groups: dict[tuple, list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        groups[tuple(r["grid"][k] for k in keys)].append(r)
    return dict(sorted(groups.items(), key=lambda kv: str(kv[0])))


def _throughput(rows: list[dict[str, Any]], path: Path) -> Path:
    fig, ax = new_axes("Throughput against workers (dashed: ideal linear scaling)", "workers",
                       "throughput (tokens/s)", size=(6.6, 4.2))
    for i, ((space, zero, method, mb), group) in enumerate(_series(rows, "space", "zero_stage", "method",
                                                                   "micro_batch").items()):
        group = sorted(group, key=lambda r: r["grid"]["workers"])
        w = [r["grid"]["workers"] for r in group]
        tps = [r["measured"]["tokens_per_s"] for r in group]
        colour = f"C{i % 10}"
        ax.plot(w, tps, "o-", color=colour, label=f"{space} ZeRO-{zero} {method} mb {mb}")
        if w[0] == 1:
            ax.plot(w, [tps[0] * n for n in w], "--", color=colour, alpha=0.6)
    ax.set_xticks(sorted({r["grid"]["workers"] for r in rows}))
    ax.legend(fontsize=7)
    return save(fig, path)


def _memory(rows: list[dict[str, Any]], path: Path) -> Path:
    workers = max(r["grid"]["workers"] for r in rows)
    chosen = [r for r in rows if r["grid"]["workers"] == workers]
    zeros = sorted({r["grid"]["zero_stage"] for r in chosen})
    sizes = sorted({r["grid"]["space"] for r in chosen}, key=lambda s: min(r["grid"]["params"] for r in chosen
                                                                          if r["grid"]["space"] == s))
    fig, ax = new_axes(f"Peak memory per worker at {workers} worker(s) (bars: measured, x: predicted)",
                       "ZeRO stage", "peak memory per worker (MiB)", size=(6.6, 4.2))
    width = 0.8 / len(sizes)
    for j, space in enumerate(sizes):
        xs, measured_mib, predicted_mib, oom_x = [], [], [], []
        for i, zero in enumerate(zeros):
            match = [r for r in chosen if r["grid"]["space"] == space and r["grid"]["zero_stage"] == zero]
            if not match:
                continue
            r, x = match[0], i + (j - (len(sizes) - 1) / 2) * width
            predicted_mib.append((x, r["predicted"]["peak_bytes"] / 2**20))
            if r["oom"]:
                oom_x.append(x)
            else:
                xs.append(x)
                measured_mib.append(r["measured"]["peak_bytes"] / 2**20)
        ax.bar(xs, measured_mib, width * 0.9, color=f"C{j}", label=f"{space} measured")
        if predicted_mib:
            px, py = zip(*predicted_mib)
            ax.plot(px, py, "x", color="black", markersize=9, label="predicted" if j == 0 else None)
        for x in oom_x:
            ax.annotate("oom", (x, 0), ha="center", va="bottom", color=f"C{j}", fontsize=8)
    ax.set_xticks(range(len(zeros)), [str(z) for z in zeros])
    ax.legend(fontsize=7)
    return save(fig, path)


def _loss(rows: list[dict[str, Any]], path: Path) -> Path:
    fig, ax = new_axes("Validation loss of the chosen architecture against training compute", "compute (FLOPs)",
                       "validation loss (nats/token)", size=(6.6, 4.2))
    best: dict[str, tuple[float, float]] = {}
    for i, ((space,), group) in enumerate(_series(rows, "space").items()):
        group = [r for r in group if "valid_loss" in r["measured"]]
        if not group:
            continue
        c = [r["measured"]["compute_flops"] for r in group]
        loss = [r["measured"]["valid_loss"] for r in group]
        ax.scatter(c, loss, color=f"C{i}", label=f"{space} ({group[0]['grid']['params'] / 1e6:.2f}M)")
        k = int(np.argmin(loss))
        best[space] = (c[k], loss[k])
    ax.set_xscale("log")
    if len(best) >= 3:
        c, loss = np.array(list(best.values())).T
        slope, intercept = np.polyfit(np.log(c), np.log(loss), 1)
        grid = np.geomspace(c.min(), c.max(), 50)
        ax.plot(grid, np.exp(intercept) * grid**slope, "k--",
                label=f"power law: loss = {math.exp(intercept):.3g} C^{slope:.3f}")
    ax.legend(fontsize=7)
    return save(fig, path)


def _arch_size(rows: list[dict[str, Any]], path: Path) -> Path:
    fig, ax = new_axes("Chosen architecture against supernet size", "supernet parameters (M)",
                       "chosen architecture's parameters (M)", size=(6.0, 4.2))
    for i, ((method,), group) in enumerate(_series([r for r in rows if r["arch"]], "method").items()):
        ax.scatter([r["grid"]["params"] / 1e6 for r in group], [r["measured"]["arch_params"] / 1e6 for r in group],
                   color=f"C{i}", label=f"{method} argmax")
    top = max(r["grid"]["params"] for r in rows) / 1e6
    ax.plot([0, top], [0, top], ":", color="gray", label="supernet size")
    ax.legend(fontsize=7)
    return save(fig, path)


# ------------------------------------------------------------------------------------------------ report
def _fmt(value: float | None, scale: float = 1.0, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value / scale:.{digits}g}"


def _report(config: ScaleConfig, rows: list[dict[str, Any]], plots: dict[str, Path], out: Path) -> str:
    peak = config.device.peak
    mfu_note = (f"MFU against {peak:.3g} FLOP/s per {config.device.name}" if peak else
                "FLOP/s per worker (no MFU: a CPU has no tensor-core peak)")
    lines = [f"# Scaling `{config.name}` ({config.mode} scaling, device {config.device.name})", "",
             f"{len(rows)} points, {sum(r['oom'] for r in rows)} out of memory. Throughput counts the weight batch's "
             f"tokens after {config.warmup_steps} warm-up step(s); efficiency = tokens/s(N) / "
             "(N x tokens/s(1)) against the 1-worker point of the same size, ZeRO stage, method and batch. Step "
             "FLOPs are what the step computes (TangleNAS: the superposed supernet forward and backward on the "
             "weight and the architecture batch); arch FLOPs are those of training the chosen architecture alone. "
             f"{mfu_note}. Memory: peak per worker (CPU: growth of the resident set; GPU: reserved), predicted "
             "from the model states and the traced activations."
             + (" On CPUs the step-time split is not measured (DeepSpeed's timers use device events), and the "
                "resident set also holds allocator and DeepSpeed buffers the prediction leaves out (a few hundred "
                "MiB per process), which dominate tiny models." if not peak else ""), "",
             "| point | tokens/s | per worker | efficiency | step ms (fwd+bwd / comm / optim) | peak MiB "
             "(pred., error) | params MiB meas./pred. | optim. MiB meas./pred. | loss | chosen M | "
             + ("MFU step / arch |" if peak else "GFLOP/s step / arch per worker |"),
             "|---|---:|---:|---:|---|---|---|---|---:|---:|---|"]
    mib = 2**20
    for r in rows:
        m, p = r["measured"], r["predicted"]
        if r["oom"]:
            lines.append(f"| `{r['point_id']}` | oom | | | | (pred. {_fmt(p['peak_bytes'], mib)}) | | | | | |")
            continue
        parts = [m.get(k) for k in ("forward_backward_ms", "communication_ms", "optimizer_ms")]
        split = f" ({' / '.join(_fmt(v) for v in parts)})" if any(v is not None for v in parts) else ""
        opt_m, opt_p = m["optimizer_state_bytes"] + m["master_bytes"], p["optimizer_state_bytes"] + p["master_bytes"]
        eff = m.get("efficiency")
        use = (f"{m['mfu']:.1%} / {m['arch_mfu']:.1%}" if peak else
               f"{_fmt(m['flops_per_s'] / r['grid']['workers'], 1e9)} / "
               f"{_fmt(m['arch_flops_per_s'] / r['grid']['workers'], 1e9)}")
        lines.append(
            f"| `{r['point_id']}` | {m['tokens_per_s']:,.0f} | {m['tokens_per_s_per_worker']:,.0f} | "
            f"{f'{eff:.2f}' if eff is not None else 'n/a'} | {_fmt(m['step_ms'])}{split} | "
            f"{_fmt(m['peak_bytes'], mib)} ({_fmt(p['peak_bytes'], mib)}, {r['memory_error']:+.0%}) | "
            f"{_fmt(m['param_bytes'], mib)} / {_fmt(p['param_bytes'], mib)} | "
            f"{_fmt(opt_m, mib)} / {_fmt(opt_p, mib)} | "
            f"{_fmt(m.get('valid_loss', m['train_loss']), digits=4)} | {_fmt(m.get('arch_params'), 1e6)} | {use} |")
    lines += ["", "Loss: validation loss of the chosen architecture (SPOS: training loss of its random paths). "
              "Optimizer memory: Adam's moments plus the optimizer's fp32 copy of the weights. Out-of-memory points "
              "keep the configuration they asked for in `points.csv` (metric `oom` = 1).", ""]
    for title, path in plots.items():
        lines += [f"## {title}", "", f"![{title}]({path.relative_to(out).as_posix()})", ""]
    return "\n".join(lines)
