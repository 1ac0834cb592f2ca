"""Stages: one workflow step (a training run or a Tune search, then its scores on the test split) as a function
of typed inputs, with an identity derived from those inputs and a folder that says whether it is done,
resumable or new.

A stage is data: its kind, its settings (a run file's or a search file's mapping), and links that fill settings
from the records of the stages it needs (``Ref``: the architecture a search chose, the supernet it exported).
Its identity hashes its settings and the identities of what it links to, never their outputs, so a changed
setting changes the identity of that stage and of every stage downstream, and nothing else. A finished stage
writes ``stage.json`` (its record); an unfinished folder resumes through Ray Train's or Tune's own restore.
Campaigns and scaling grids compose stages; the CLI commands run the same functions one at a time.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from tangle_ray import storage
from tangle_ray.configs import read_json, set_dotted
from tangle_ray.errors import ConfigError
from tangle_ray.train.history import RunHistory

STAGE_FILE = "stage.json"
KINDS = ("train", "tune", "measure")


@dataclass(frozen=True)
class Ref:
    """A value another stage's record holds: ``records[stage][key]``."""

    stage: str
    key: str


@dataclass(frozen=True)
class Stage:
    """One step: ``kind`` (train: ``tangle_ray.train``; tune: ``tangle_ray.tune``; measure: a training run kept
    for its measurements, without export or scores), its settings as a run or search file would hold them, and
    ``links``: dotted setting -> the ``Ref`` that fills it at run time."""

    name: str
    kind: str
    settings: dict[str, Any]
    links: dict[str, Ref] = field(default_factory=dict)
    devices: tuple[str, float] = ("CPU", 1.0)  # what the stage holds while it runs: device kind and count
    workers: int = 1  # ``devices`` are held by this many equal workers (Ray Train workers, Tune trials)
    work: float = 0.0  # the units (tokens, images) it processes, for estimates of its cost
    test_samples: int = 256  # the test-split samples its architecture is scored on

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"stage {self.name}: kind {self.kind!r}; allowed: {list(KINDS)}")

    @property
    def needs(self) -> set[str]:
        return {ref.stage for ref in self.links.values()}

    def identity(self, upstream: dict[str, str]) -> str:
        """A hash of the kind, the settings and the identities of the linked stages (``upstream``: name -> id)."""
        links = {key: [upstream[ref.stage], ref.key] for key, ref in sorted(self.links.items())}
        text = json.dumps({"kind": self.kind, "settings": self.settings, "links": links,
                           "test_samples": self.test_samples}, sort_keys=True)
        return hashlib.sha1(text.encode()).hexdigest()[:10]

    def resolved(self, records: dict[str, dict[str, Any]], folder: Path, uri: str | None = None) -> dict[str, Any]:
        """The settings with links filled from ``records`` and the output placed in ``folder`` (or in ``uri``,
        the object-store folder that ``folder`` mirrors)."""
        raw = copy.deepcopy(self.settings)
        for key, ref in self.links.items():
            set_dotted(raw, key, records[ref.stage][ref.key])
        raw["run"] = {**raw.get("run", {}), "storage_path": uri or str(folder), "name": OUTPUT[self.kind]}
        return raw


# the Ray Train run or the Tune experiment inside a stage's folder
OUTPUT = {"train": "run", "tune": "search", "measure": "run"}


def open_folder(out: Path | str) -> tuple[Path, str | None]:
    """The local folder of a campaign or scaling grid, checked and created, and the object-store folder it
    mirrors (None for a plain folder), whose finished stages' records (not their checkpoints) are pulled in."""
    from tangle_ray.names import check_output_dir

    local, remote = storage.mirror(out)
    check_output_dir(local, "--out")
    local.mkdir(parents=True, exist_ok=True)
    if remote:
        storage.pull(remote, local, only=lambda name: name.endswith(STAGE_FILE))
    return local, remote


def check_fits(stage: Stage, what: str) -> None:
    """ClusterError unless the cluster can hold ``stage``'s workers with their share of its devices."""
    from tangle_ray.cluster import check_resources

    kind, count = stage.devices
    check_resources(stage.workers, {kind: count / stage.workers}, what)


def stage_status(folder: Path, identity: str) -> str:
    """'done' (its record is written), 'resumable' (started, not finished) or 'new'."""
    record = folder / STAGE_FILE
    if record.is_file() and read_json(record, "stage record").get("identity") == identity:
        return "done"
    return "resumable" if folder.exists() and any(folder.iterdir()) else "new"


def read_record(folder: Path) -> dict[str, Any]:
    return read_json(folder / STAGE_FILE, "stage record")


def run_stage(stage: Stage, identity: str, folder: Path, records: dict[str, dict[str, Any]],
              uri: str | None = None) -> dict[str, Any]:
    """Run (or resume) ``stage`` in ``folder`` (the mirror of ``uri`` on object storage, if given), score what it
    produced on the test split, write its record."""
    folder.mkdir(parents=True, exist_ok=True)
    raw, start = stage.resolved(records, folder, uri), time.time()
    run = {"train": _train, "tune": _tune, "measure": _measure}[stage.kind]
    out = run(raw, stage.name, stage.test_samples)
    return write_record(stage, identity, folder, start, out, uri)


def write_record(stage: Stage, identity: str, folder: Path, started_at: float, out: dict[str, Any],
                 uri: str | None = None) -> dict[str, Any]:
    """Write a finished stage's record (``out`` plus when, where and on what it ran), next to its outputs in
    ``uri`` too when the stage lives on object storage; the stage is then done."""
    end = time.time()
    kind, count = stage.devices
    record = {"name": stage.name, "kind": stage.kind, "identity": identity, "folder": str(folder),
              "started_at": started_at, "finished_at": end, "wall_s": end - started_at, "device": kind,
              "devices": count, "device_hours": count * (end - started_at) / 3600, **out}
    write_atomic(folder / STAGE_FILE, json.dumps(record, indent=2) + "\n")
    if uri:
        storage.push(folder, uri)
    return record


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to a temporary file next to ``path``, then move it into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _train(raw: dict[str, Any], name: str, test_samples: int) -> dict[str, Any]:
    from tangle_ray.train.config import from_dict
    from tangle_ray.train.runner import run_training

    cfg = from_dict({**raw, "test_samples": test_samples}, f"stage {name}")
    result = run_training(cfg, export=True)
    task, space, data = result.plan.task, result.plan.space, result.plan.config.data.dir
    out: dict[str, Any] = {"objective": task.objective.key, "data": data, "run_dir": str(result.run_dir),
                           "anytime": _anytime(result.history, task.objective.key)}
    if not cfg.method_class.trains_supernet:
        scores, model = result.test_scores, result.export_dir / "model"
        out |= {"model": str(model), "arch": result.arch, "test": _metrics(scores),
                "inference_ms": scores["ms_per_sample"], "sample_losses": result.test_sample_losses}
    else:
        out["supernet"] = str(result.export_dir / "supernet")
        if result.arch is not None:
            out |= {"arch": result.arch, **_inherited_scores(data, out["supernet"], result.arch, test_samples,
                                                             cfg.seed)}
    if "arch" in out:
        out |= {"params": space.param_count(out["arch"]), "macs": space.flops(out["arch"]) / 2}
    return out


def _measure(raw: dict[str, Any], name: str, test_samples: int) -> dict[str, Any]:
    """A training run for what it measured: its history (losses, throughput, each rank's memory and timers)
    and the architecture it ended on."""
    from tangle_ray.train.config import from_dict
    from tangle_ray.train.runner import run_training

    result = run_training(from_dict(raw, f"stage {name}"), export=False)
    h = result.history
    return {"run_dir": str(result.run_dir), "arch": result.arch,
            "history": {"metrics": h.metrics, "anytime": h.anytime, "resources": h.resources}}


def _tune(raw: dict[str, Any], name: str, test_samples: int) -> dict[str, Any]:
    from tangle_ray.tune.config import search_config_from_dict
    from tangle_ray.tune.tuner import run_search

    cfg = search_config_from_dict(raw, f"stage {name}")
    start = time.time()
    result = run_search(cfg)
    best, objective = None, result.task.objective
    key, anytime = objective.key, []
    for trial in sorted(result.trials, key=lambda t: t.finished_at or 0.0):
        score = trial.metrics[key]
        best = score if objective.better(score, best) else best
        anytime.append([max(0.0, (trial.finished_at or start) - start), best])
    best = result.best  # its trial counted the parameters and FLOPs
    return {"objective": key, "data": cfg.data.dir, "supernet": cfg.supernet, "arch": best.arch, "anytime": anytime,
            "trials": len(result.trials), "params": best.params, "macs": best.flops / 2,
            **_inherited_scores(cfg.data.dir, cfg.supernet, best.arch, test_samples, cfg.seed)}


def _inherited_scores(data: str, supernet: str, arch: dict[str, Any], samples: int, seed: int) -> dict[str, Any]:
    from tangle_ray.evaluate import evaluate_on_split

    scores = evaluate_on_split(data, "test", supernet=supernet, arch=arch, num_samples=samples, seed=seed)
    return {"test": _metrics(scores)}


def _metrics(scores: dict[str, Any]) -> dict[str, float]:
    """The task's scores (floats), without the timing."""
    return {k: float(v) for k, v in scores.items() if isinstance(v, float) and k != "ms_per_sample"}


def _anytime(history: RunHistory, key: str) -> list[list[float]]:
    """The any-time curve of a run: (seconds since the run started, validation score of the architecture it
    followed), the step of each any-time record placed in time by the progress records around it."""
    rows = [r for r in history.anytime if f"valid_{key}" in r]
    timed = [(r["step"], r["elapsed_s"]) for r in history.metrics if "elapsed_s" in r]
    if not rows or not timed:
        return []
    steps, seconds = zip(*sorted(timed))
    return [[float(np.interp(r["step"], (0, *steps), (0.0, *seconds))), float(r[f"valid_{key}"])] for r in rows]


def check_graph(stages: list[Stage]) -> None:
    """Refuse a graph with an unknown or circular link (a programming error, named)."""
    names = {s.name for s in stages}
    for s in stages:
        if missing := s.needs - names:
            raise ConfigError(f"stage {s.name} links to unknown stage(s) {sorted(missing)}")
    order = topological(stages)
    if len(order) != len(stages):
        raise ConfigError(f"stages {sorted(names - {s.name for s in order})} link in a circle")


def topological(stages: list[Stage]) -> list[Stage]:
    """Stages in an order where every stage follows those it needs (stable in the given order)."""
    placed: dict[str, Stage] = {}
    remaining = list(stages)
    while remaining:
        ready = [s for s in remaining if s.needs <= set(placed)]
        if not ready:
            break
        for s in ready:
            placed[s.name] = s
        remaining = [s for s in remaining if s.name not in placed]
    return list(placed.values())
