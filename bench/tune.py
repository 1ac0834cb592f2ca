"""Bench: Ray Tune overhead of the architecture search, and loading the supernet once vs once per trial.

Run from the repo root (``PYTHONPATH=. python bench/tune.py``). It builds a random supernet of ``--space``
(default: the paper-scale gpt-tinystories, 88M parameters), sizes the evaluation so one architecture takes
about ``--target-s`` seconds on one thread, and prints, side by side:

* K trials at concurrency c through ``run_search``'s trainable (supernet shared through the object store,
  model cached per worker) against K x one evaluation's pure compute time / c, measured alone in-process;
* the same K trials with a trainable that loads the supernet folder from disk in every trial.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import ray
import torch
from ray import tune

from tangle_ray.evaluate import evaluate_arch
from tangle_ray.folders import load_supernet, save_supernet
from tangle_ray.models import load_space
from tangle_ray.tasks import Samples, Task, get_task
from tangle_ray.tune.config import search_config_from_dict
from tangle_ray.tune.searchers import RandomSearcher
from tangle_ray.tune.tuner import make_trainable, make_tuner


def disk_trial(config: dict, path: str, task: Task, x: np.ndarray, y: np.ndarray, batch_size: int) -> None:
    """The baseline trial: read and build the supernet from its folder, then evaluate."""
    start = time.perf_counter()
    supernet = load_supernet(path)
    ready = time.perf_counter()
    scores = evaluate_arch(supernet, config["arch"], task, Samples(torch.from_numpy(x.copy()),
                                                                   torch.from_numpy(y.copy())), batch_size)
    tune.report({**scores, "setup_s": ready - start, "eval_s": time.perf_counter() - ready})


class Timeline(tune.Callback):
    """Driver-side clock of the first trial start and the last trial completion."""

    def __init__(self):
        self.first_start, self.last_end = math.inf, 0.0

    def on_trial_start(self, iteration, trials, trial, **info):
        self.first_start = min(self.first_start, time.perf_counter())

    def on_trial_complete(self, iteration, trials, trial, **info):
        self.last_end = time.perf_counter()


def timed_fit(config, trainable, space, task: Task, seed: int) -> dict:
    timeline = Timeline()
    searcher = RandomSearcher(space, config.total_trials, seed=seed)
    tuner = make_tuner(config, trainable, searcher, task, [timeline])
    start = time.perf_counter()
    grid = tuner.fit()
    end = time.perf_counter()
    if grid.errors:
        raise RuntimeError(grid.errors[0])
    return {
        "wall": end - start,
        "startup": timeline.first_start - start,
        "teardown": end - timeline.last_end,
        "span": timeline.last_end - timeline.first_start,
        "metrics": [r.metrics for r in grid],
    }


def positive(kind: type):
    """An argparse type: a number of ``kind`` above 0."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a{'n integer' if kind is int else ' number'}") from None
        if not value > 0:
            raise argparse.ArgumentTypeError(f"{value} must be above 0")
        return value

    return parse


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--space", default="gpt-tinystories", help="a GPT space (default: gpt-tinystories)")
    p.add_argument("--trials", type=positive(int), default=48, help="K (default: 48)")
    p.add_argument("--concurrency", type=positive(int), default=2, help="c, one CPU per trial (default: 2)")
    p.add_argument("--target-s", type=positive(float), default=1.0,
                   help="aimed duration of one evaluation in seconds (default: 1)")
    p.add_argument("--batch-size", type=positive(int), default=8, help="evaluation batch size (default: 8)")
    p.add_argument("--seed", type=int, default=0, help="seed of the supernet and the architectures (default: 0)")
    args = p.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    torch.set_num_threads(1)  # as in a one-CPU trial
    with tempfile.TemporaryDirectory(prefix="bench-tune-") as work:
        try:
            bench(args, Path(work))
        finally:
            ray.shutdown()


def bench(args: argparse.Namespace, work: Path) -> None:
    space = load_space(args.space)
    task = get_task(space.family.task)
    torch.manual_seed(args.seed)
    supernet = space.build_supernet()
    path = save_supernet(supernet, work / "supernet")
    archs = RandomSearcher(space, args.trials, seed=args.seed)
    archs = [archs.suggest(str(i))["arch"] for i in range(args.trials)]

    # size the evaluation: windows so that the mean architecture takes about target-s
    T, vocab = space.fixed["block_size"], space.fixed["vocab_size"]
    probe = Samples(*[torch.randint(0, vocab, (4, T))] * 2)
    per_window = statistics.mean(_time(lambda a=a: evaluate_arch(supernet, a, task, probe, 4)) for a in archs[:4]) / 4
    windows = max(1, round(args.target_s / per_window))
    tokens = np.random.default_rng(args.seed).integers(0, vocab, size=(windows, T + 1))
    x, y = tokens[:, :-1].copy(), tokens[:, 1:].copy()
    samples = Samples(torch.from_numpy(x), torch.from_numpy(y))
    pure = [_time(lambda a=a: evaluate_arch(supernet, a, task, samples, args.batch_size)) for a in archs]
    ideal = sum(pure) / args.concurrency

    ray.init(address="local", num_cpus=args.concurrency, include_dashboard=False, log_to_driver=False)
    raw = {
        "supernet": str(path),
        "data": {"dir": "-"},
        "algorithm": "random",
        "random": {"num_trials": args.trials},
        "seed": args.seed,
        "resources": {"max_concurrent_trials": args.concurrency, "cpus_per_trial": 1},
        "eval": {"batch_size": args.batch_size},
        "verbose": 0,
    }
    config = search_config_from_dict({**raw, "run": {"storage_path": str(work / "runs"), "name": "shared"}})
    start = time.perf_counter()
    loaded = load_supernet(path)
    trainable = make_trainable(config, loaded, task, samples)  # puts the weights and windows in the object store
    load_once = time.perf_counter() - start
    shared = timed_fit(config, trainable, space, task, args.seed)

    disk_config = search_config_from_dict({**raw, "run": {"storage_path": str(work / "runs"), "name": "disk"}})
    from_disk = tune.with_resources(
        tune.with_parameters(disk_trial, path=str(path), task=task, x=x, y=y, batch_size=args.batch_size),
        {"cpu": 1},
    )
    disk = timed_fit(disk_config, from_disk, space, task, args.seed)
    ray.shutdown()
    report(args, space, windows, pure, ideal, load_once, shared, disk)


def report(args, space, windows, pure, ideal, load_once, shared, disk) -> None:
    T = space.fixed["block_size"]
    builds = [m["setup_s"] for m in shared["metrics"] if m["setup_s"] > 0.05]
    print(
        f"\nspace {space.name}: {windows} windows x {T} tokens per evaluation, K={args.trials} trials, "
        f"c={args.concurrency}, one CPU (one torch thread) per trial"
    )
    print(
        f"pure evaluation, alone in-process: mean {statistics.mean(pure):.3f} s (min {min(pure):.3f}, "
        f"max {max(pure):.3f}); ideal K x t / c = {ideal:.2f} s"
    )
    print(
        f"{'':32}{'wall':>8}{'overhead':>10}{'startup':>9}{'span':>8}{'span ovh':>10}{'teardown':>10}"
        f"{'eval/trial':>12}{'setup/trial':>13}{'vs in-trial':>13}"
    )
    for name, run in (("shared (object store + cache)", shared), ("per-trial disk load", disk)):
        m = run["metrics"]
        in_trial = sum(r["eval_s"] for r in m) / args.concurrency
        mean_eval, mean_setup = (
            statistics.mean(r["eval_s"] for r in m),
            statistics.mean(r["setup_s"] for r in m),
        )
        print(
            f"{name:32}{run['wall']:8.2f}{run['wall'] / ideal - 1:10.1%}{run['startup']:9.2f}"
            f"{run['span']:8.2f}{run['span'] / ideal - 1:10.1%}{run['teardown']:10.2f}"
            f"{mean_eval:12.3f}{mean_setup:13.3f}{run['wall'] / in_trial - 1:13.1%}"
        )
    print(
        "(startup: fit() to the first trial start; span: first trial start to last trial end; teardown: "
        "last trial end to fit() returning; overhead and span ovh: against the ideal; vs in-trial: wall "
        "against the evaluation time measured inside the trials / c, which removes CPU contention between "
        "the trials)"
    )
    disk_setup = [r["setup_s"] for r in disk["metrics"]]
    print(
        f"supernet loaded once on the driver and put in the object store: {load_once:.2f} s; built "
        f"{len(builds)} times in workers ({', '.join(f'{b:.2f}' for b in builds)} s), then cached. "
        f"Per-trial disk loading: {statistics.mean(disk_setup):.2f} s x {args.trials} "
        f"= {sum(disk_setup):.1f} s of worker time"
    )


def _time(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


if __name__ == "__main__":
    main()
