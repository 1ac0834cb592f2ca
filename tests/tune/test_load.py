"""Load: a random search of 300 trials at full concurrency records every trial once, and its driver's peak memory
stays within 10% of a 50-trial search's.

Each search is `tangle-ray tune` in a fresh process that joins this module's Ray cluster (``--address``), so its
``ru_maxrss`` (``os.wait4``) is the driver's own: the cluster's processes and the trial workers are not its
children. Two trials at a time with one CPU each was the fastest setting on 2 cores (``bench/load.py``).
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import ray
import yaml
from ray import tune

from tangle_ray.models import load_space
from tangle_ray.tune.searchers import saved_searcher_state
from tangle_ray.tune.tuner import evaluate_trial

pytestmark = pytest.mark.ray

SMALL, LARGE = 50, 300
CONCURRENCY = 2  # trials at a time, one CPU each
TIMEOUT_S = 300


def search(tmp_path: Path, supernet_dir: Path, data_dir: Path, trials: int) -> tuple[Path, int, str]:
    """Run a random search of ``trials`` trials with the CLI on the running cluster.

    Returns the search folder, the driver's peak resident set in KiB and what it wrote to stderr.
    """
    settings = {
        "supernet": str(supernet_dir),
        "data": {"dir": str(data_dir)},
        "eval": {"samples": 8, "batch_size": 8},
        "algorithm": "random",
        "random": {"num_trials": trials},
        "resources": {"max_concurrent_trials": CONCURRENCY, "cpus_per_trial": 1},
        "run": {"storage_path": str(tmp_path / "runs"), "name": f"load-{trials}"},
    }
    path = tmp_path / f"load-{trials}.yaml"
    path.write_text(yaml.safe_dump(settings))
    address = ray.get_runtime_context().gcs_address
    with open(tmp_path / f"load-{trials}.err", "w+") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "tangle_ray.cli", "tune", str(path), "--address", address],
            stdout=subprocess.DEVNULL, stderr=err,
        )
        deadline = time.monotonic() + TIMEOUT_S
        while not (waited := os.wait4(proc.pid, os.WNOHANG))[0]:
            if time.monotonic() > deadline:
                proc.kill()
                proc.wait()
                pytest.fail(f"the {trials}-trial search did not end within {TIMEOUT_S} s")
            time.sleep(0.1)
        proc.returncode = os.waitstatus_to_exitcode(waited[1])
        err.seek(0)
        stderr = err.read()
    assert proc.returncode == 0, stderr[-3000:]
    return Path(settings["run"]["storage_path"]) / settings["run"]["name"], waited[2].ru_maxrss, stderr


def test_a_search_of_300_trials_records_each_once_in_the_memory_of_50(local_ray, tmp_path, supernet_dir, data_dir):
    space = load_space("gpt-micro")
    assert space.num_architectures() >= 5 * LARGE  # random search finds new architectures without many repeats
    _, small_rss, _ = search(tmp_path, supernet_dir, data_dir, SMALL)
    run_dir, large_rss, stderr = search(tmp_path, supernet_dir, data_dir, LARGE)
    everyone = list(range(LARGE))

    lines = [line.split() for line in stderr.splitlines() if line.startswith("[tangle-ray] trial ")]
    assert [w[2] for w in lines] == [f"{k}/{LARGE}" for k in range(1, LARGE + 1)]  # one line per trial
    assert sorted(int(w[3].lstrip("#")) for w in lines) == everyone

    folders = sorted(run_dir.glob("trial_*"))
    results = [(f.name, (f / "result.json").read_text().splitlines()) for f in folders]
    assert len(folders) == LARGE and all(len(r) == 1 for _, r in results)  # one report per trial
    results = [(name, json.loads(r[0])) for name, r in results]
    assert all(name == f"trial_{r['trial_id']}" for name, r in results)
    by_index = {r["index"]: json.loads(r["arch"]) for _, r in results}
    assert sorted(by_index) == everyone
    assert len({space.key(a) for a in by_index.values()}) == LARGE  # no architecture twice

    rows = list(csv.DictReader((run_dir / "leaderboard.csv").read_text().splitlines()))
    assert [int(r["rank"]) for r in rows] == list(range(1, LARGE + 1))
    assert {int(r["index"]): json.loads(r["arch"]) for r in rows} == by_index

    grid = tune.Tuner.restore(str(run_dir), evaluate_trial).get_results()
    assert len(grid) == LARGE and not grid.errors
    assert sorted(r.config["index"] for r in grid) == everyone
    assert all(r.metrics["index"] == r.config["index"] for r in grid)

    state = saved_searcher_state(run_dir)
    assert state["finished"] and state["suggested"] == len(state["archs"]) == len(state["results"]) == LARGE

    assert large_rss <= 1.10 * small_rss, (
        f"driver peak RSS: {large_rss / 1024:.0f} MiB at {LARGE} trials, {small_rss / 1024:.0f} MiB at {SMALL}"
    )
