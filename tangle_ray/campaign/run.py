"""Running a campaign: its stages as Ray tasks, each started as soon as the stages it needs are done, so that
independent stages of different seeds and methods share the cluster; then the tables, plots and report.

Every stage lives in ``CAMPAIGN/stages/<name>-<identity>/``. A done stage is read, never rerun; an unfinished
one resumes from its own checkpoints; a changed setting gives the stages it affects new identities. Killing
the driver loses nothing: the same command finishes the campaign.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tangle_ray import storage
from tangle_ray.campaign import report, statistics
from tangle_ray.campaign.config import CampaignConfig
from tangle_ray.campaign.plan import Plan, anytime_curves, result_rows
from tangle_ray.cluster import connect
from tangle_ray.names import output_folder
from tangle_ray.stages import Stage, check_fits, open_folder, read_record, run_stage, stage_status, write_atomic


class CampaignStopped(RuntimeError):
    """A stage failed; the others that were running finished, and a rerun resumes."""


@dataclass(frozen=True)
class Placed:
    """A stage with its identity and folder (and the object-store folder that it mirrors, if any)."""

    stage: Stage
    identity: str
    folder: Path
    uri: str | None = None

    @property
    def name(self) -> str:
        return self.stage.name


def place(plan: Plan, out: Path | str) -> list[Placed]:
    """Identities in graph order (each from the identities of the stages it links to) and folders."""
    local, remote = storage.mirror(out)
    ids: dict[str, str] = {}
    placed = []
    for stage in plan.stages:
        ids[stage.name] = stage.identity(ids)
        name = f"{stage.name}-{ids[stage.name]}"
        placed.append(Placed(stage, ids[stage.name], local / "stages" / name,
                             storage.join(remote, "stages", name) if remote else None))
    return placed


def dry_run(config: CampaignConfig, plan: Plan, out: Path | str) -> str:
    """The stages, their resources, status and estimated cost, as a table a person reads."""
    lines = [f"campaign {config.name}: {len(plan.stages)} stages for methods {config.methods} x seeds "
             f"{config.seeds}, in {out}", "",
             f"{'stage':28s} {'kind':5s} {'holds':>9s} {'status':9s} {'work (units)':>14s} {'est. device-h':>13s}"]
    total = 0.0
    for p in place(plan, out):
        kind, count = p.stage.devices
        est = p.stage.work / config.throughput / 3600 if config.throughput else None
        total += est or 0.0
        lines.append(f"{p.name:28s} {p.stage.kind:5s} {count:>5g} {kind:3s} {stage_status(p.folder, p.identity):9s} "
                     f"{p.stage.work:>14,.0f} {f'{est:.3g}' if est is not None else 'n/a':>13s}")
    lines += ["", f"estimated: {total:.3g} device-hours at {config.throughput:g} units/s per device"
              if config.throughput else "estimated: set throughput (units/s per device) for device-hours"]
    return "\n".join(lines)


def run_campaign(config: CampaignConfig, plan: Plan, out: Path | str, address: str | None = None,
                 num_cpus: int | None = None, verbose: bool = False) -> dict[str, Any]:
    """Run every stage not done yet (at most as many at once as the cluster holds), then write the results
    (``out``: a folder, or a folder on object storage mirrored locally)."""
    import ray

    local, remote_out = open_folder(out)
    placed = place(plan, out)
    connect(address, num_cpus=num_cpus, verbose=verbose)
    for p in placed:  # every request must fit the cluster before anything starts
        check_fits(p.stage, f"stage {p.name}")
    records = {p.name: read_record(p.folder) for p in placed if stage_status(p.folder, p.identity) == "done"}
    remote = ray.remote(num_cpus=0, max_retries=0)(run_stage)
    running: dict[Any, Placed] = {}
    waiting = [p for p in placed if p.name not in records]
    failures: list[str] = []
    room = _Room(ray.cluster_resources())
    _progress(f"{len(records)} of {len(placed)} stages done before this run", records, running, waiting)
    while waiting or running:
        if not failures:
            for p in [p for p in waiting if p.stage.needs <= set(records)]:
                if not room.take(p.stage.devices, bool(running)):
                    continue
                waiting.remove(p)
                needs = {n: records[n] for n in p.stage.needs}
                running[remote.remote(p.stage, p.identity, p.folder, needs, p.uri)] = p
                _progress(f"started  {p.name}", records, running, waiting)
        if not running:
            break
        ready, _ = ray.wait(list(running), num_returns=1)
        p = running.pop(ready[0])
        room.give(p.stage.devices)
        try:
            records[p.name] = ray.get(ready[0])
            _progress(f"finished {p.name} in {records[p.name]['wall_s']:.0f} s", records, running, waiting)
        except Exception as e:  # a stage's own error: let the running ones finish, then stop
            failures.append(f"{p.name}: {_last_line(e)} (folder {p.folder})")
            _progress(f"failed   {p.name}", records, running, waiting)
    if failures:
        raise CampaignStopped(f"campaign {config.name}: {len(failures)} stage(s) failed, {len(records)} of "
                              f"{len(placed)} done; first: {failures[0]}; rerun the same command to resume")
    result = write_results(config, plan, placed, records, local)
    if remote_out:
        storage.push(local, remote_out)
    return result


class _Room:
    """What the cluster can still hold: a stage starts when its devices fit beside the running stages' (Ray
    would queue it anyway, but then its wall time would count the wait). ``TANGLE_RAY_AUTOSCALING=1``: a
    cluster that grows on demand, every ready stage starts."""

    def __init__(self, total: dict[str, float]):
        self.free = {k: float(v) for k, v in total.items()}
        self.unbounded = os.environ.get("TANGLE_RAY_AUTOSCALING") == "1"

    def take(self, devices: tuple[str, float], busy: bool) -> bool:
        kind, count = devices
        if not self.unbounded and busy and self.free.get(kind, 0.0) + 1e-9 < count:
            return False
        self.free[kind] = self.free.get(kind, 0.0) - count
        return True

    def give(self, devices: tuple[str, float]) -> None:
        kind, count = devices
        self.free[kind] += count


def write_results(config: CampaignConfig, plan: Plan, placed: list[Placed], records: dict[str, dict[str, Any]],
                  out: Path) -> dict[str, Any]:
    """``results.csv``, ``comparisons.csv``, ``campaign.json``, the plots and ``report.md``. The campaign's wall
    time is the span from its first stage's start to its last stage's end (over every run of the driver)."""
    rows = result_rows(plan, records)
    comparisons = statistics.compare(rows, plan.directions, reference=config.reference)
    summary = statistics.summarize(rows)
    report.write_tables(out, rows, comparisons)
    stages = [{"name": p.name, "identity": p.identity, "status": "done", "folder": str(p.folder.relative_to(out)),
               **{k: records[p.name][k] for k in ("kind", "started_at", "finished_at", "wall_s", "device",
                                                   "devices", "device_hours")}} for p in placed]
    plots = _plots(plan, records, rows, out)
    wall_s = max(s["finished_at"] for s in stages) - min(s["started_at"] for s in stages)
    per_sample = _per_sample(config, plan, records)
    ranks = statistics.ranks(rows, plan.directions, "retrain", plan.objective)
    report.write_report(out, f"Campaign `{config.name}`: {', '.join(config.methods)} on `{config.space}`, "
                        f"seeds {config.seeds}", summary, comparisons, stages, plots, wall_s,
                        per_sample=per_sample, ranks=ranks)
    result = {"name": config.name, "space": config.space, "methods": config.methods, "seeds": config.seeds,
              "reference": config.reference, "wall_s": wall_s, "stage_wall_s": sum(s["wall_s"] for s in stages),
              "stages": stages, "summary": summary, "comparisons": comparisons, "ranks": ranks,
              "per_sample": per_sample}
    write_atomic(out / "campaign.json", json.dumps(result, indent=2) + "\n")
    return result


def _per_sample(config: CampaignConfig, plan: Plan, records: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Per seed and baseline: the reference's and the baseline's retrained models paired over the test samples."""
    out = []
    for (method, seed), chain in plan.chains.items():
        if method == config.reference:
            continue
        ref = records[plan.chains[(config.reference, seed)]["retrain"]]["sample_losses"]
        base = records[chain["retrain"]]["sample_losses"]
        out.append({"seed": seed, "method": config.reference, "baseline": method,
                    **statistics.per_sample_paired(ref, base, higher_is_better=False, seed=seed)})
    return out


def _plots(plan: Plan, records: dict[str, dict[str, Any]], rows: list[dict[str, Any]], out: Path) -> dict[str, Path]:
    devices = "/".join(sorted({r["device"] for r in records.values()}))
    key, units = plan.objective, {"device": f"device-hours ({devices}-hours)", "wall": "wall time (s)"}
    curves = anytime_curves(plan, records)
    plots = {}
    for axis, label in units.items():
        if curves[axis]:
            path = out / f"anytime_{axis}.png"
            report.plot_anytime(path, curves[axis], label, f"validation {key}",
                                title=f"Any-time validation {key}")
            plots[f"Any-time against {label}"] = path
    by_key = {(r["method"], r["seed"], r["stage"], r["metric"]): r["value"] for r in rows}
    points = [{"method": m, "seed": s, "params": by_key[(m, s, "search", "params")],
               "score": by_key[(m, s, "retrain", key)]} for (m, s) in plan.chains]
    path = out / "score_vs_params.png"
    report.plot_score_vs_params(path, points, f"test {key} after retraining",
                                higher_is_better=plan.directions[key] == "max")
    plots["Test score after retraining against parameters"] = path
    return plots


def _progress(event: str, records: dict, running: dict, waiting: list) -> None:
    print(f"[campaign] {event}  ({len(records)} done, {len(running)} running, {len(waiting)} queued)",
          file=sys.stderr, flush=True)


def _last_line(error: Exception) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return (lines or [type(error).__name__])[-1][:300]


def campaign_dir(config: CampaignConfig, out: str | None) -> Path | str:
    """``--out`` (a folder, or an ``s3://`` / ``gs://`` folder), else ``campaigns/<name>``."""
    if out is not None and storage.is_uri(out):
        return storage.check_uri(out, "--out")
    return output_folder(out, Path("campaigns") / config.name)
