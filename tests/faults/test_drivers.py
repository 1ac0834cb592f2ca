"""Drivers killed with SIGKILL: mid-run and mid-search, run from the command line as a user runs them.

The local Ray cluster a killed driver started goes with it (``tangle_ray/reaper.py``; without it Ray's agents
outlive the driver by about a minute), and rerunning the same command resumes to the uninterrupted result.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import psutil
import pytest
import yaml

from tangle_ray.configs import to_dict
from tangle_ray.reaper import alive
from tangle_ray.train.export import export_run
from tests.faults.conftest import LONG, recorded, uninterrupted
from tests.train.states import assert_same_run

pytestmark = pytest.mark.ray

ENV = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2"}


def tangle_ray(*args: str, **popen) -> subprocess.Popen:
    """``tangle-ray ARGS`` on a local Ray cluster of its own, as a separate driver process."""
    return subprocess.Popen([sys.executable, "-m", "tangle_ray.cli", *args, "--address", "local"], env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **popen)


def finish(process: subprocess.Popen, timeout_s: float = 300) -> str:
    output, _ = process.communicate(timeout=timeout_s)
    assert process.returncode == 0, output[-3000:]
    return output


def kill_when(driver: subprocess.Popen, ready: Callable[[], bool], timeout_s: float = 240) -> list[str]:
    """SIGKILL ``driver`` once ``ready()``; the processes of its cluster still running 10 s later."""
    deadline = time.time() + timeout_s
    while not ready():
        assert driver.poll() is None, f"the driver ended before it was killed:\n{driver.communicate()[0][-3000:]}"
        assert time.time() < deadline, "the driver never got ready to be killed"
        time.sleep(0.01)
    tree = psutil.Process(driver.pid).children(recursive=True)
    assert any("raylet" in p.name() for p in tree), "the driver did not start its own cluster"
    driver.send_signal(signal.SIGKILL)
    driver.communicate()
    deadline = time.time() + 10
    while time.time() < deadline and any(alive(p) for p in tree):
        time.sleep(0.2)
    return [f"{p.pid} {p.name()}" for p in tree if alive(p)]


def test_a_killed_search_driver_leaves_nothing_behind_and_a_rerun_resumes(tiny_config, tmp_path):
    reference = uninterrupted(tiny_config)
    cfg = tiny_config(**LONG)
    run_file = tmp_path / "run.yaml"
    run_file.write_text(yaml.safe_dump(to_dict(cfg)))
    command = ("search", str(run_file), "--no-export")

    left = kill_when(tangle_ray(*command), lambda: recorded(cfg.run_dir()))
    assert not left, f"processes of the killed driver's cluster still run: {left}"
    finish(tangle_ray(*command))
    assert "resumed at step " in (cfg.run_dir() / "progress.log").read_text()
    assert_same_run(cfg.run_dir(), reference)


def test_a_killed_tune_driver_leaves_nothing_behind_and_a_rerun_resumes(tiny_config, data_dir, tmp_path):
    supernet = export_run(uninterrupted(tiny_config).run_dir, tmp_path / "export") / "supernet"
    search = {
        "supernet": str(supernet), "data": {"dir": str(data_dir)}, "eval": {"samples": 32, "batch_size": 8},
        "algorithm": "evolution", "seed": 0,  # 50 trials: seconds after the first few finish, on an idle machine
        "evolution": {"population": 10, "generations": 5, "parents": 3, "mutations": 4, "crossovers": 3},
        "resources": {"max_concurrent_trials": 2, "cpus_per_trial": 1},
        "run": {"storage_path": str(tmp_path / "tune")},
    }
    search_file = tmp_path / "search.yaml"
    search_file.write_text(yaml.safe_dump(search))
    killed_dir, reference_dir = tmp_path / "tune" / "killed", tmp_path / "tune" / "reference"

    def some_trials_saved() -> bool:  # Tune has saved its state with some finished trials in it
        return len(list(killed_dir.glob("trial_*/result.json"))) >= 4 and any(killed_dir.glob("experiment_state*"))

    left = kill_when(tangle_ray("tune", str(search_file), "run.name=killed"), some_trials_saved)
    assert not left, f"processes of the killed driver's cluster still run: {left}"
    assert not (killed_dir / "leaderboard.csv").exists()
    finish(tangle_ray("tune", str(search_file), "run.name=killed"))
    finish(tangle_ray("tune", str(search_file), "run.name=reference"))
    resumed, reference = _leaderboard(killed_dir), _leaderboard(reference_dir)
    assert len(resumed) == 50 and len({row["index"] for row in resumed}) == 50  # every trial once
    assert resumed == reference
    assert json.loads((killed_dir / "best_arch.json").read_text()) == json.loads(
        (reference_dir / "best_arch.json").read_text())


def _leaderboard(run_dir: Path) -> list[dict[str, str]]:
    with open(run_dir / "leaderboard.csv") as f:
        return list(csv.DictReader(f))
