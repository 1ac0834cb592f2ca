"""Run a search on Ray Tune: one trial scores one architecture with the supernet's inherited weights.

The driver loads the supernet and builds the evaluation windows once; both reach the trials through the
object store as numpy arrays (zero-copy reads). Each worker process builds the model once and keeps it
(``reuse_actors=True``), so a trial costs one evaluation. Rerunning with the same ``storage_path``/``name``
resumes the campaign (``Tuner.restore``): finished trials are kept, unfinished and errored ones rerun.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import time
import uuid
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from ray import tune
from torch import nn

from tangle_ray import storage
from tangle_ray.cluster import check_resources, connect
from tangle_ray.configs import read_json, to_dict
from tangle_ray.errors import ConfigError
from tangle_ray.evaluate import calibration_batches, evaluate_arch
from tangle_ray.folders import load_supernet, load_weights, unique_tensors
from tangle_ray.manifest import check_manifest, write_manifest
from tangle_ray.models import load_space, space_from_dict
from tangle_ray.names import check_output_dir
from tangle_ray.report.leaderboard import TrialRecord, ranked, write_report
from tangle_ray.space import Arch, SearchSpace, space_to_dict
from tangle_ray.supernet import Supernet
from tangle_ray.tasks import EvalSet, Task, get_task
from tangle_ray.tune.config import SearchConfig
from tangle_ray.tune.searchers import check_constraints, make_searcher, saved_searcher_state

CONFIG_FILE = "search.json"
log = logging.getLogger(__name__)


class SearchInterrupted(RuntimeError):
    """The campaign stopped before its end (e.g. Ctrl+C); running the same search again resumes it. ``saved``
    says what was saved."""

    def __init__(self, saved: str):
        super().__init__(saved)
        self.saved = saved

    def __str__(self) -> str:
        return f"{self.saved}; run the same search again to resume it"


@dataclass
class SearchResult:
    out_dir: Path
    trials: list[TrialRecord]  # in proposal order
    task: Task
    space: SearchSpace

    @property
    def best(self) -> TrialRecord:
        return ranked(self.trials, self.task.objective)[0]

    @property
    def best_arch(self) -> Arch:
        """The best architecture's active layers, as ``best_arch.json`` holds it."""
        return self.space.active(self.best.arch)


@dataclass
class SharedSupernet:
    """What a trial needs to rebuild the supernet: the space and its weights as numpy arrays."""

    key: str  # identifies this copy in a worker's cache
    space: dict[str, Any]
    state: dict[str, np.ndarray]

    @classmethod
    def of(cls, supernet: Supernet) -> SharedSupernet:
        state = {name: t.numpy() for name, t in unique_tensors(supernet.net.state_dict()).items()}
        return cls(uuid.uuid4().hex, space_to_dict(supernet.space), state)


_CACHE: dict[str, nn.Module] = {}  # per worker process: key -> built model
_MIRRORED: set[str] = set()  # per worker process: data folders in a bucket mirrored to this node


def cached_model(shared: SharedSupernet) -> nn.Module:
    """The supernet's ``net`` for ``shared``, built once per process and kept for the next trials."""
    net = _CACHE.get(shared.key)
    if net is None:
        _CACHE.clear()
        net = space_from_dict(shared.space).build_supernet().net
        load_weights(net, {k: _tensor(v) for k, v in shared.state.items()}, "shared supernet")
        net = _CACHE[shared.key] = net.to("cuda" if torch.cuda.is_available() else "cpu").eval()
    return net


def evaluate_trial(
    config: dict, shared: SharedSupernet, task: Task, samples: EvalSet, batch_size: int,
    calibration: list[np.ndarray] | None = None, data_uri: str | None = None,
) -> None:
    """The Tune trial: score ``config["arch"]`` and report the task's metrics, params, FLOPs and the arch.
    ``samples`` are read batch by batch from the data folder on the trial's node (``data_uri``: a folder in a
    bucket, mirrored to the node first); ``calibration``: the batches a family that calibrates prepares the
    extracted architecture on."""
    start = time.perf_counter()
    net = cached_model(shared)
    if data_uri is not None and data_uri not in _MIRRORED:  # the node's mirror, where ``samples`` read
        storage.localize(data_uri, "search config: data.dir")
        _MIRRORED.add(data_uri)
    ready = time.perf_counter()
    arch = config["arch"]
    calibration = None if calibration is None else [_tensor(b) for b in calibration]
    scores = evaluate_arch(net, arch, task, samples, batch_size, calibration=calibration)
    space: SearchSpace = net.space
    tune.report(
        {
            **scores,
            "units": len(samples) * task.units_per_sample(space.fixed),
            "params": space.param_count(arch),
            "flops": space.flops(arch),
            "index": config["index"],
            "arch": json.dumps(arch),
            "setup_s": ready - start,
            "eval_s": time.perf_counter() - ready,
        }
    )


def load_checked_supernet(config: SearchConfig) -> Supernet:
    """The checkpoint, checked against ``config.space`` when one is named."""
    return load_supernet(storage.localize(config.supernet, "search config: supernet"),
                         load_space(config.space) if config.space is not None else None)


def make_trainable(config: SearchConfig, supernet: Supernet, task: Task, samples: EvalSet,
                   calibration: list[np.ndarray] | None = None):
    """``evaluate_trial`` bound to the shared supernet and calibration batches (object store) and the evaluation
    set (its folder and sample indices), with trial resources."""
    data_uri = config.data.dir if storage.is_uri(config.data.dir) else None
    trainable = tune.with_parameters(
        evaluate_trial, shared=SharedSupernet.of(supernet), task=task, samples=samples,
        batch_size=config.eval.batch_size, calibration=calibration, data_uri=data_uri,
    )
    r = config.resources
    return tune.with_resources(trainable, {"cpu": r.cpus_per_trial, "gpu": r.gpus_per_trial})


def check_resumable(config: SearchConfig) -> None:
    """ConfigError if ``config.run_dir()`` holds a search with other settings than ``config``."""
    saved = config.run_dir() / CONFIG_FILE
    if not saved.is_file():
        return
    before, now = read_json(saved, "search record"), config.identity()
    before = before.get("identity") if isinstance(before, dict) else None
    if not isinstance(before, dict):
        raise ConfigError(f"{saved} is not a search record of tangle_ray; give the search a new run.name")
    if before != now:
        diff = sorted(k for k in set(before) | set(now) if before.get(k) != now.get(k))
        raise ConfigError(
            f"search config: {config.run_dir()} holds a search with other settings ({diff}); "
            f"give a new name to start another search, or restore the settings to resume it"
        )


def make_tuner(
    config: SearchConfig, trainable, searcher, task: Task, callbacks: Sequence[tune.Callback] = ()
) -> tune.Tuner:
    """A new Tuner, or the restored one when ``config.run_dir()`` holds a run of this search."""
    check_resumable(config)
    run_dir, remote = config.run_dir(), config.remote_dir()
    if tune.Tuner.can_restore(remote or str(run_dir)):
        check_manifest(run_dir, "search folder", required=[CONFIG_FILE])  # Tune's state is pickled: ours only
        return tune.Tuner.restore(remote or str(run_dir), trainable, resume_unfinished=True, resume_errored=True)
    run_dir.mkdir(parents=True, exist_ok=True)
    saved = {"config": to_dict(config), "identity": config.identity()}
    (run_dir / CONFIG_FILE).write_text(json.dumps(saved, indent=2) + "\n")
    write_manifest(run_dir, [CONFIG_FILE])
    if remote:
        storage.push(run_dir, remote)
    return tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(
            search_alg=searcher,
            metric=task.objective.key,
            mode=task.objective.mode,
            num_samples=-1,
            max_concurrent_trials=config.resources.max_concurrent_trials,
            reuse_actors=True,
            trial_dirname_creator=_dirname,
        ),
        run_config=tune.RunConfig(
            name=config.run.name,
            storage_path=config.run.storage_path if remote else str(run_dir.parent),
            callbacks=list(callbacks),
            verbose=config.verbose,
        ),
    )


class TrialLines(tune.Callback):
    """One line per finished trial, with the incumbent: what a person follows instead of Tune's tables."""

    def __init__(self, task: Task, total: int, space: SearchSpace):
        self.objective, self.total, self.space = task.objective, total, space

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        o, value = self.objective, result.get(self.objective.key)
        if value is None:
            return
        # counted over every trial Tune holds, those restored with a resumed search included (a resumed search
        # restores this callback as it was pickled when the search started: it keeps no count of its own)
        scored = [(t.last_result[o.key], t.last_result.get("index", t.config.get("index"))) for t in trials
                  if t is not trial and o.key in (t.last_result or {})]
        scored.append((value, result["index"]))
        best = min(scored, key=lambda s: (o.sign * s[0], s[1]))  # ties: the earlier proposal
        print(f"[tangle-ray] trial {len(scored)}/{self.total}  #{result['index']}  {o.label} {value:{o.fmt}}  "
              f"{result['params'] / 1e6:.2f}M  best {best[0]:{o.fmt}} (#{best[1]})",
              file=sys.stderr, flush=True)


def run_search(
    config: SearchConfig, callbacks: Sequence[tune.Callback] = (), address: str | None = None,
    verbose: bool = False,
) -> SearchResult:
    """Search, or resume the search in ``config.run_dir()``; writes the report there and returns the trials.

    Every check that can fail on the user's input runs before Ray starts (on ``address`` when it is not
    running yet). ``callbacks`` apply to a new run; a resumed run keeps those it was started with (Tune
    restores its run configuration).
    """
    supernet = load_checked_supernet(config)
    space = supernet.space
    task = get_task(space.family.task)
    check_constraints(space, config.constraints, config.seed)
    remote = config.remote_dir()
    if remote:  # the search so far (its record, Tune's and the searcher's state) into the local mirror
        storage.pull(remote, config.run_dir())
    check_resumable(config)
    check_output_dir(config.run_dir(), "search config: run.storage_path")
    e, data = config.eval, str(storage.localize(config.data.dir, "search config: data.dir"))
    data_config = task.data_config(dir=data)  # the data section's defaults: calibration images and batch size
    samples = task.eval_set(data_config, space.fixed, e.split, e.samples, e.seed)
    calibration = calibration_batches(task, data_config, space)
    connect(address, verbose=verbose)
    r = config.resources
    check_resources(1, {"CPU": r.cpus_per_trial, "GPU": r.gpus_per_trial}, "search config: resources (one trial)")
    trainable = make_trainable(config, supernet, task, samples,
                               None if calibration is None else [b.numpy() for b in calibration])
    searcher = make_searcher(config, space, task.objective.key, task.objective.mode)
    lines = [] if config.verbose else [TrialLines(task, config.total_trials, space)]
    tuner = make_tuner(config, trainable, searcher, task, [*lines, *callbacks])
    del supernet  # the trials hold their own copies
    # Tune prints a banner to stdout whatever its verbosity (an endless "Number of trials", a TensorBoard hint
    # into Ray's temporary folder): shown with --verbose or the search file's verbose >= 1, kept off otherwise
    quiet = not (verbose or config.verbose)
    with open(os.devnull, "w") if quiet else contextlib.nullcontext(sys.stdout) as out, \
            contextlib.redirect_stdout(out):
        grid = tuner.fit()
    if grid.errors:
        raise RuntimeError(
            f"search {config.run_dir()}: {len(grid.errors)} of {len(grid)} trials failed; first error: "
            f"{grid.errors[0]!r}. Run the same search again to retry them."
        )
    done = [r for r in grid if task.objective.key in (r.metrics or {})]
    if remote:  # Tune synced its state (and the searcher's) to the bucket
        storage.pull(remote, config.run_dir())
    state = saved_searcher_state(config.run_dir())
    if len(done) < len(grid) or not (state and state["finished"]):
        raise SearchInterrupted(
            f"search {config.run_dir()} interrupted after {len(done)} of {config.total_trials} planned trials, "
            "whose results are saved there"
        )
    if len(done) < config.total_trials:
        log.warning(
            "search %s ended after %d of %d planned trials: no new architecture inside the constraints "
            "was left",
            config.run_dir(),
            len(done),
            config.total_trials,
        )
    trials = sorted((_record(r.config, r.metrics, task) for r in done), key=lambda t: t.index)
    write_report(trials, config.run_dir(), task, space, config.eval.split)
    if remote:
        storage.push(config.run_dir(), remote)
    return SearchResult(config.run_dir(), trials, task, space)


def _record(config: dict, metrics: dict, task: Task) -> TrialRecord:
    return TrialRecord(
        index=config["index"],
        arch=config["arch"],
        metrics={m.key: metrics[m.key] for m in task.metrics},
        params=metrics["params"],
        flops=metrics["flops"],
        units=metrics["units"],
        finished_at=metrics.get("timestamp"),
    )


def _tensor(a: np.ndarray) -> torch.Tensor:
    """A tensor viewing ``a``; arrays from the object store are read-only, and evaluation never writes."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(a)


def _dirname(trial) -> str:
    return f"trial_{trial.trial_id}"
