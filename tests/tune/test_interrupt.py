"""Ctrl+C on `tangle-ray tune`, then the same command again, as a user runs them (issue 22): one line saying what
was saved and the command that resumes; the resumed search counts on from the restored trials and its best so far
includes them; without --verbose, no Ray Tune banner reaches the terminal."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.ray

ENV = {**os.environ, "RAY_AUTH_MODE": "disabled"}
TRIAL = re.compile(r"^\[tangle-ray\] trial (\d+)/(\d+)  #(\d+)  loss (\S+)  \S+  best (\S+) \(#(\d+)\)$")


def _restored_losses(run_dir: Path) -> list[float]:
    losses = []
    for result in run_dir.glob("trial_*/result.json"):
        lines = result.read_text().splitlines()
        if lines:
            losses.append(json.loads(lines[-1])["loss"])
    return losses


def test_ctrl_c_on_tune_then_resume(supernet_dir, data_dir, tmp_path):
    search = {
        "supernet": str(supernet_dir), "data": {"dir": str(data_dir)}, "eval": {"samples": 64, "batch_size": 16},
        "algorithm": "evolution", "seed": 0,
        "evolution": {"population": 10, "generations": 5, "parents": 3, "mutations": 4, "crossovers": 3},
        "resources": {"max_concurrent_trials": 2, "cpus_per_trial": 1},
        "run": {"storage_path": str(tmp_path / "tune"), "name": "s"},
    }
    search_file = tmp_path / "search.yaml"
    search_file.write_text(yaml.safe_dump(search))
    run_dir = tmp_path / "tune" / "s"
    command = ["tune", str(search_file), "--address", "local"]

    def tune() -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-m", "tangle_ray.cli", *command], env=ENV, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)

    driver, deadline = tune(), time.time() + 240
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(iter(driver.stderr.readline, "")), daemon=True)
    reader.start()
    while not any(line.startswith("[tangle-ray] trial 2/") for line in list(lines)):  # as a person sees it
        assert driver.poll() is None, "".join(lines)[-3000:]
        assert time.time() < deadline, "no trial finished"
        time.sleep(0.01)
    driver.send_signal(signal.SIGINT)  # Ctrl+C
    out = driver.stdout.read()
    driver.wait(timeout=120)
    reader.join(timeout=60)
    err = "".join(lines)
    assert driver.returncode == 130 and "Traceback" not in err, err[-3000:]
    last = err.strip().splitlines()[-1]
    assert re.match(rf"tangle-ray: search {re.escape(str(run_dir))} interrupted after \d+ of 50 planned trials, "
                    r"whose results are saved there; to resume, run the same command again: ", last), last
    assert last.endswith(f"tangle-ray {' '.join(command)}"), last
    for noise in ("Number of trials", "TensorBoard", "View detailed results"):
        assert noise not in out + err, noise
    restored = _restored_losses(run_dir)

    resumed = tune()
    out, err = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, err[-3000:]
    for noise in ("Number of trials", "TensorBoard", "View detailed results"):
        assert noise not in out + err, noise
    lines = [TRIAL.match(line) for line in err.splitlines() if line.startswith("[tangle-ray] trial ")]
    assert lines and all(lines)
    counts = [int(m.group(1)) for m in lines]
    # counted on to the end; a trial that had reported but that Tune had not yet marked finished runs again
    # and reports again, under the same count
    assert counts[-1] == 50 and all(b - a in (0, 1) for a, b in zip(counts, counts[1:])), counts
    assert 1 < counts[0] <= len(restored) + 1, (counts[0], len(restored))  # from the restored trials
    first_best = float(lines[0].group(5))
    assert first_best <= round(min(restored), 4) + 1e-4, (first_best, min(restored))  # the restored best counts
