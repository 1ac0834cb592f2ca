"""Running a scaling grid: predictions first (``--dry-run`` stops there), then each point not done yet as a short
training run, one at a time so that no point's timing shares the cluster with another's; then the tables, plots
and report.

Every point lives in ``SCALE_DIR/points/<key>-<identity>/``. A measured or out-of-memory point is never rerun; a
new grid value adds only its own points; an interrupted point resumes from its checkpoint like any run.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tangle_ray import storage
from tangle_ray.cluster import connect
from tangle_ray.names import output_folder
from tangle_ray.scaling import measure, report
from tangle_ray.scaling.config import ScaleConfig
from tangle_ray.scaling.plan import PlannedPoint
from tangle_ray.stages import check_fits, open_folder, read_record, run_stage, stage_status, write_record

GIB = 2**30


class ScaleStopped(RuntimeError):
    """A point failed for another reason than memory; the points before it are kept, a rerun resumes."""


@dataclass(frozen=True)
class Placed:
    planned: PlannedPoint
    identity: str
    folder: Path
    uri: str | None = None  # the object-store folder that ``folder`` mirrors


def place(points: list[PlannedPoint], out: Path | str) -> list[Placed]:
    local, remote = storage.mirror(out)
    placed = []
    for p in points:
        identity = p.stage.identity({})
        name = f"{p.point.key}-{identity}"
        placed.append(Placed(p, identity, local / "points" / name,
                             storage.join(remote, "points", name) if remote else None))
    return placed


def dry_run(config: ScaleConfig, points: list[PlannedPoint], out: Path | str) -> str:
    """Per point: its status, predicted memory per worker by term, whether it fits the device, and the predicted
    time from a calibration (``calibration_flops_per_s``, or the fastest measured point in the folder)."""
    placed = place(points, out)
    done = [(p.planned, read_record(p.folder)) for p in placed if stage_status(p.folder, p.identity) == "done"]
    calibration = config.calibration_flops_per_s or measure.calibration(done)
    limit = config.device.memory
    unit, size = ("GiB", GIB) if max(p.planned.predicted["peak_bytes"] for p in placed) >= GIB else ("MiB", 2**20)
    lines = [f"scaling {config.name}: {len(placed)} points ({config.mode} scaling), in {out}",
             f"memory per worker in {unit}: weights / gradients / optimizer states / fp32 copy / activations = peak; "
             f"limit: {f'{limit:g} GiB' if limit else 'none'}", "",
             f"{'point':44s} {'status':9s} {'params':>8s} {'w':>6s} {'g':>6s} {'opt':>6s} {'fp32':>6s} {'act':>6s} "
             f"{'peak':>7s} {'fits':>4s} {'pred. s':>8s}"]
    for p in placed:
        pp, m = p.planned, p.planned.predicted
        fits = "n/a" if not limit else "yes" if m["peak_bytes"] <= limit * GIB else "NO"
        seconds = measure.predicted_seconds(pp, calibration)
        lines.append(f"{pp.point.key:44s} {stage_status(p.folder, p.identity):9s} {pp.point.params / 1e6:>7.2f}M "
                     + " ".join(f"{m[k] / size:>6.3g}" for k in ("param_bytes", "grad_bytes", "optimizer_state_bytes",
                                                               "master_bytes", "activation_bytes"))
                     + f" {m['peak_bytes'] / size:>7.4g} {fits:>4s} {f'{seconds:.0f}' if seconds else 'n/a':>8s}")
    lines += ["", f"times at {calibration:.3g} FLOP/s per worker" if calibration else
              "times: set calibration_flops_per_s, or run one point first"]
    return "\n".join(lines)


def run_scale(config: ScaleConfig, points: list[PlannedPoint], out: Path | str, address: str | None = None,
              verbose: bool = False) -> dict[str, Any]:
    """Run every point not done yet, in grid order, then write ``points.csv``, ``scale.json`` and the report
    (``out``: a folder, or a folder on object storage mirrored locally)."""
    from tangle_ray.train.runner import RunStopped

    local, remote = open_folder(out)
    placed = place(points, out)
    connect(address, verbose=verbose)
    for p in placed:  # every point must fit the cluster before the first starts
        check_fits(p.planned.stage, f"point {p.planned.point.key}")
    records = {p.planned.point.key: read_record(p.folder) for p in placed
               if stage_status(p.folder, p.identity) == "done"}
    todo = [p for p in placed if p.planned.point.key not in records]
    _progress(f"{len(records)} of {len(placed)} points done before this run; {len(todo)} to run")
    for i, p in enumerate(todo, 1):
        key, start = p.planned.point.key, time.time()
        _progress(f"point {i}/{len(todo)}: {key}")
        try:
            records[key] = run_stage(p.planned.stage, p.identity, p.folder, {}, p.uri)
        except RunStopped as e:
            if not _out_of_memory(str(e)):
                raise ScaleStopped(f"scaling {config.name}: point {key} failed: {e}; rerun the same command to "
                                   "resume") from e
            records[key] = write_record(p.planned.stage, p.identity, p.folder, start,
                                        {"status": "oom", "error": str(e)[:500]}, p.uri)
            _progress(f"point {key}: out of memory, recorded as oom; the grid goes on")
    result = report.write_results(config, [p.planned for p in placed], records, local)
    if remote:
        storage.push(local, remote)
    return result


def _out_of_memory(message: str) -> bool:
    text = message.lower()
    return "out of memory" in text or "outofmemoryerror" in text


def _progress(event: str) -> None:
    print(f"[scale] {event}", file=sys.stderr, flush=True)


def scale_dir(config: ScaleConfig, out: str | None) -> Path | str:
    """``--out`` (a folder, or an ``s3://`` / ``gs://`` folder), else ``scaling/<name>``."""
    if out is not None and storage.is_uri(out):
        return storage.check_uri(out, "--out")
    return output_folder(out, Path("scaling") / config.name)
