"""The driver: resolve and check a run before any worker starts, run it on Ray Train, write the reports."""

from __future__ import annotations

import json
import logging
import os
import random
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path, PurePosixPath
from typing import Any

import yaml

from tangle_ray import divergence, storage
from tangle_ray.cluster import check_resources, connect, worker_resources
from tangle_ray.configs import read_yaml, to_dict
from tangle_ray.errors import ConfigError, TangleRayError, write_fault
from tangle_ray.folders import load_supernet, space_shape
from tangle_ray.models import load_space, space_from_dict
from tangle_ray.space import SearchSpace
from tangle_ray.tasks import get_task
from tangle_ray.train import capacity
from tangle_ray.train.checkpoint import (
    latest_checkpoint,
    read_run_state,
    read_trainer_state,
    remove_cut_checkpoints,
    resume_checkpoint,
    set_aside_checkpoints,
)
from tangle_ray.train.config import RunPlan, TrainConfig
from tangle_ray.train.export import export_run
from tangle_ray.train.history import RunHistory
from tangle_ray.train.progress import PROGRESS_FILE, follow
from tangle_ray.train.worker import train_loop_per_worker

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    run_dir: Path
    checkpoint: Path
    arch: dict[str, Any] | None  # what the run chose or trained; None for a SPOS supernet
    history: RunHistory
    export_dir: Path | None
    seconds: float
    test_scores: dict[str, Any] | None = None  # a run of one architecture: its exported model on the test split
    against_random: dict[str, Any] | None = None  # a run that chooses: the choice against random architectures
    active_arch: dict[str, Any] | None = None  # ``arch`` without the layers beyond its depth (as arch.json)
    plan: RunPlan | None = None  # what the run ran: config (paths resolved), space, task
    test_sample_losses: list[float] | None = None  # with ``test_scores``: each test sample's loss, in order
    timeline: dict[str, float] | None = None  # where fit()'s wall time went (``RunHistory.timeline``)


def preflight(cfg: TrainConfig, before_writing: Callable[[], None] | None = None) -> RunPlan:
    """Everything a user can get wrong, checked on the driver; returns the plan every worker runs.

    What can be checked without writing is checked first; then ``before_writing`` runs (``run_training``: join
    Ray and check that the workers fit), and only then is anything written: the data prepared (with its lock
    file), the run folder made."""
    space = load_space(cfg.space)
    task = get_task(space.family.task)
    arch = None if cfg.method_class.trains_supernet else space.validate(cfg.arch, source="arch")
    init_from = None
    if cfg.init == "inherit":  # the supernet folder must load, and be of this space, before workers start
        load_supernet(cfg.init_from, space)
        init_from = str(Path(cfg.init_from).resolve())
    run_dir, remote = cfg.run_dir(), cfg.remote_run_dir()
    _check_can_write(run_dir)
    if not remote:  # a local run folder is read as it is; one on object storage after its mirror is pulled
        _check_resume(cfg, run_dir, space)
    # data without a source is only checked, which writes nothing: before Ray; data to prepare (a lock file, a
    # download, tokens) only once Ray is joined and the workers fit
    checked = (task.prepare(cfg.data, space, cfg.seed)
               if getattr(cfg.data, "source", None) is None and not storage.is_uri(cfg.data.dir) else None)
    if before_writing is not None:
        before_writing()
        task.check_helpers(cfg.data)
    if (nodes := capacity.nodes_for(cfg)) is not None:  # the joined cluster's nodes, or this machine
        capacity.check_memory(cfg, space, *nodes)
    for warning in cfg.unusual_settings():
        log.warning("tangle-ray: %s", warning)
    data_remote = cfg.data.dir if storage.is_uri(cfg.data.dir) else None
    data = cfg.data  # prepared once to the bucket: every node reads its own mirror
    if data_remote:
        data = replace(data, dir=str(storage.localize(data_remote, "data.dir")))
    data = checked if checked is not None else task.prepare(data, space, cfg.seed)
    capacity.check_global_batch(cfg, data.dir, task.batches(
        data, space.fixed, "train", cfg.micro_batch_size, cfg.seed, cfg.micro_per_step))
    _check_writable(run_dir)
    remove_cut_checkpoints(run_dir)  # what a write cut short (a full disk) left, never recorded by Ray
    if remote:  # the run so far (its record and checkpoints) into the local mirror, checked like a local one
        storage.pull(remote, run_dir)
        _check_resume(cfg, run_dir, space)
    resolved = replace(cfg, data=data, init_from=init_from,
                       run=replace(cfg.run, storage_path=str(run_dir.parent), name=run_dir.name))
    return RunPlan(resolved, space, task, arch, cfg.identity(), remote=remote, data_remote=data_remote)


def _check_can_write(run_dir: Path) -> None:
    """Without writing anything: the run folder, or the nearest folder above it that exists, is a folder this
    process may write to (``_check_writable`` then tries)."""
    existing = next((p for p in (run_dir, *run_dir.parents) if os.path.lexists(p)), None)
    if existing is None:
        return
    if not existing.is_dir():
        raise ConfigError(f"run.storage_path: cannot write to {run_dir} ({existing} is not a folder)")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"run.storage_path: cannot write to {run_dir} ({existing} is not writable)")


def _check_writable(run_dir: Path) -> None:
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / ".write-test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise ConfigError(f"run.storage_path: cannot write to {run_dir} ({e.strerror or e})") from None


def _check_resume(cfg: TrainConfig, run_dir: Path, space: SearchSpace) -> None:
    stored = run_dir / "run_config.yaml"
    if stored.is_file():
        previous = read_yaml(stored, "run record")
        if not isinstance(previous, dict) or previous.get("identity") != cfg.identity():
            # a run that diverged may go on from its last good checkpoint with other optimizer settings
            stored_identity = previous.get("identity") if isinstance(previous, dict) else None
            changed = divergence.resumable_changes(run_dir, stored_identity, cfg.identity())
            if changed is None:
                raise ConfigError(
                    f"run {run_dir} exists with a different configuration; give a new run.name to start a fresh "
                    f"run, or rerun with the original settings to resume it"
                    + ("; after a divergence only optimizer.* and arch_optimizer.* may change"
                       if divergence.read_record(run_dir) else "")
                )
            log.warning("tangle-ray: run %s diverged; resuming it with changed %s", run_dir.name, ", ".join(changed))
    checkpoint = resume_checkpoint(run_dir)  # what Ray will resume from, checked against its manifests
    if checkpoint is None:
        return
    state = read_trainer_state(checkpoint)
    if state["step"] > cfg.steps:  # Ray would resume past the end and the report say "steps: 30 of 10"
        raise ConfigError(
            f"run {run_dir.name} is already at step {state['step']} (checkpoint {checkpoint.name}), past steps = "
            f"{cfg.steps}; rerun with steps >= {state['step']} to continue it, or give a new run.name for a fresh "
            f"run of {cfg.steps} steps"
        )
    if state["world_size"] != cfg.scaling.num_workers:
        raise ConfigError(
            f"checkpoint {checkpoint} was written by {state['world_size']} workers but scaling.num_workers = "
            f"{cfg.scaling.num_workers}; ZeRO shards are per rank: resume with {state['world_size']} workers"
        )
    if space_shape(space_from_dict(read_run_state(checkpoint)["space"])) != space_shape(space):
        raise ConfigError(f"checkpoint {checkpoint} belongs to another space than {cfg.space!r}")


class RunStopped(RuntimeError):
    """A run ended before its last step; rerunning the same command resumes it from its last checkpoint."""


class RunInterrupted(KeyboardInterrupt):
    """Ctrl+C ended a run: the message says what was saved (a KeyboardInterrupt, so that nothing that handles
    errors takes it for one)."""


def run_training(cfg: TrainConfig, address: str | None = None, export: bool = True,
                 verbose: bool = False) -> TrainResult:
    """Train a supernet (TangleNAS search or SPOS) or one architecture on Ray Train, then write reports.

    Rank 0's progress lines are printed as they come; unless ``verbose``, the workers' own output goes to
    ``RUN/logs/``."""
    import ray.train
    from ray.train.torch import TorchTrainer

    s = cfg.scaling

    def join_ray() -> None:  # before anything is written: a run that cannot start leaves nothing behind
        connect(address, verbose=verbose)
        check_resources(s.num_workers, worker_resources(s.use_gpu, s.resources_per_worker), "scaling",
                        s.placement_strategy)

    plan = replace(preflight(cfg, join_ray), verbose=verbose)
    run_dir = plan.run_dir
    (run_dir / "run_config.yaml").write_text(
        yaml.safe_dump({"identity": plan.identity, "config": to_dict(plan.config)}, sort_keys=False)
    )
    divergence.clear_record(run_dir)  # accepted by preflight: this run goes on with the settings just recorded
    if plan.remote:
        storage.push(run_dir, plan.remote)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"plan": plan},
        scaling_config=ray.train.ScalingConfig(
            num_workers=s.num_workers, use_gpu=s.use_gpu, resources_per_worker=s.resources_per_worker,
            placement_strategy=s.placement_strategy,
        ),
        run_config=ray.train.RunConfig(
            name=run_dir.name, storage_path=cfg.run.storage_path if plan.remote else str(run_dir.parent),
            failure_config=ray.train.FailureConfig(max_failures=cfg.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
        ),
    )
    start = time.time()
    try:
        with follow(run_dir / PROGRESS_FILE):
            result = trainer.fit()
    except (KeyboardInterrupt, SystemExit) as e:  # Ctrl+C: Ray Train aborts the run, then exits (SystemExit)
        raise RunInterrupted(_interrupted_message(run_dir, cfg)) from e
    except ray.train.TrainingFailedError as e:
        if plan.remote:
            storage.pull(plan.remote, run_dir)
        raise RunStopped(_stopped_message(run_dir, e)) from e
    fit_ended = time.time()
    if plan.remote:  # Ray wrote the checkpoints to the bucket: the latest into the mirror
        storage.pull(plan.remote, run_dir)
    if (record := divergence.record_from_return(result.return_value)) is not None:  # the guard stopped it
        raise RunStopped(_diverged_message(run_dir, record))
    checkpoint = run_dir / PurePosixPath(result.checkpoint.path).name
    history = read_run_state(checkpoint)["history"]
    arch = read_trainer_state(checkpoint)["arch"]
    from tangle_ray.report.runs import write_run_report

    method = cfg.method_class
    export_dir = export_run(run_dir, data=cfg.data) if export or not method.trains_supernet else None
    test_scores, sample_losses = (None, None) if method.trains_supernet else score_test_split(plan, export_dir)
    against_random = (compare_with_random(plan, export_dir / "supernet", arch)
                      if export_dir is not None and method.chooses_arch else None)
    timeline = history.timeline(start, fit_ended)
    write_run_report(run_dir, plan, history, arch, export_dir, test_scores, against_random, timeline)
    if plan.remote:  # the reports, the export and the logs next to the checkpoints
        storage.push(run_dir, plan.remote)
    return TrainResult(run_dir, checkpoint, arch, history, export_dir, time.time() - start, test_scores,
                       against_random, plan.space.active(arch) if arch is not None else None, plan, sample_losses,
                       timeline)


def _interrupted_message(run_dir: Path, cfg: TrainConfig) -> str:
    """One line: the run was interrupted, and what its folder holds to resume from."""
    try:
        checkpoint = latest_checkpoint(run_dir)
        step = read_trainer_state(checkpoint)["step"] if checkpoint else None
    except TangleRayError:
        step = None
    saved = (f"its checkpoint of step {step} of {cfg.steps} is saved in {run_dir}" if step is not None else
             f"no checkpoint was saved yet (the first comes at step {min(cfg.checkpoint_every, cfg.steps)}): "
             f"rerunning starts it again in {run_dir}")
    return f"run {run_dir.name} interrupted; {saved}"


def _diverged_message(run_dir: Path, record: dict[str, Any]) -> str:
    """One line for a run the divergence guard stopped (``tangle_ray.divergence``), after setting aside the
    checkpoints that hold the diverging state and keeping the record (a rerun may change optimizer settings)."""
    aside = set_aside_checkpoints(run_dir, record.get("bad_from", record["step"]))
    divergence.write_record(run_dir, record)
    checkpoint = latest_checkpoint(run_dir)
    step = read_trainer_state(checkpoint)["step"] if checkpoint else None
    return divergence.stopped_line(run_dir.name, record, checkpoint, step, run_dir / "logs", aside)


def _stopped_message(run_dir: Path, error: Exception) -> str:
    """One line: what stopped the run (a full disk said as such), where it can resume from, where the workers'
    logs are."""
    checkpoint = latest_checkpoint(run_dir)
    resume = (f"rerun the same command to resume from step {read_trainer_state(checkpoint)['step']}"
              if checkpoint else "no checkpoint was written: rerunning starts it again")
    logs = f"(worker logs: {run_dir / 'logs'})"
    if fault := write_fault(error, run_dir):
        return f"run {run_dir.name} stopped: {fault}; then {resume} {logs}"
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    causes = [line for line in lines if re.match(r"^[\w.]*(Error|Exception|Interrupt)\b.*:", line)]
    cause = (causes or lines or [type(error).__name__])[-1][:300]
    return f"run {run_dir.name} stopped: {cause}; {resume} {logs}"


def compare_with_random(plan: RunPlan, supernet_dir: Path, arch: dict[str, Any], k: int = 8) -> dict[str, Any]:
    """The chosen architecture and ``k`` random ones of the space, each with the supernet's inherited weights,
    on the held-out test split: is the choice better than chance? The difference to the random architectures'
    median comes with a paired bootstrap interval over the evaluation batches (``against_random.json``)."""
    from tangle_ray.evaluate import calibration_batches, evaluate_arch, evaluate_model, inherited_model
    from tangle_ray.stats import against_median
    from tangle_ray.tasks import Samples

    cfg, task = plan.config, plan.task
    supernet = load_supernet(supernet_dir)
    samples = task.eval_set(cfg.data, plan.space.fixed, "test", cfg.eval_samples, cfg.seed)
    calibration = calibration_batches(task, cfg.data, plan.space)  # each architecture's model prepared once
    rng = random.Random(cfg.seed)
    archs = [arch] + [plan.space.sample(rng) for _ in range(k)]
    key = task.objective.key
    b = min(cfg.micro_batch_size, len(samples))
    which = range(len(samples) // b)  # equal sizes: a short last batch is left out

    def scores_of(a: dict[str, Any]) -> list[float]:  # each batch's score, a batch in memory at a time
        model = None if calibration is None else inherited_model(supernet, a, calibration)
        return [(evaluate_arch(supernet, a, task, Samples(xb, yb), b) if model is None
                 else evaluate_model(model, task, Samples(xb, yb), b))[key] for xb, yb in samples.batches(b, which)]

    per_batch = [scores_of(a) for a in archs]
    scores = [sum(p) / len(p) for p in per_batch]
    result = {"metric": key, "samples": b * len(which), "chosen": scores[0],
              "random": scores[1:], "random_archs": archs[1:],
              "beaten": sum(task.objective.better(scores[0], s) for s in scores[1:])}
    if len(which) >= 2:
        diff = against_median(per_batch[0], per_batch[1:], task.objective.higher_is_better, seed=cfg.seed)
        result["against_median"] = diff.to_dict()
    (plan.run_dir / "against_random.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def score_test_split(plan: RunPlan, export_dir: Path) -> tuple[dict[str, Any], list[float]]:
    """The exported model of a fixed-architecture run on ``test_samples`` of the held-out test split, with the
    time the pass took per sample (``test_scores.json``); and each sample's loss, in order."""
    from tangle_ray.evaluate import evaluate_on_split

    cfg, start = plan.config, time.perf_counter()
    scores = evaluate_on_split(cfg.data.dir, "test", model=export_dir / "model", num_samples=cfg.test_samples,
                               seed=cfg.seed, per_sample=True)
    scores["ms_per_sample"] = 1e3 * (time.perf_counter() - start) / scores["samples"]
    sample_losses = scores.pop("sample_losses")
    (plan.run_dir / "test_scores.json").write_text(json.dumps(scores, indent=2) + "\n")
    return scores, sample_losses
