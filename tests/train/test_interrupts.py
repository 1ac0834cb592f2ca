"""Ctrl+C on a training command, run as a user runs it (issue 22): one line saying what was saved and the command
that resumes; a rerun asking for fewer steps than the checkpoint reached is refused before Ray starts."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import yaml

from tangle_ray.cli import main
from tangle_ray.configs import to_dict
from tests.faults.conftest import recorded

pytestmark = pytest.mark.ray

ENV = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2"}


def test_ctrl_c_on_search_says_what_was_saved_and_how_to_resume(tiny_config, tmp_path, capsys):
    cfg = tiny_config(steps=400, checkpoint_every=2, eval_every=400, log_every=1)
    run_file = tmp_path / "run.yaml"
    run_file.write_text(yaml.safe_dump(to_dict(cfg)))
    command = ["search", str(run_file), "--no-export", "--address", "local"]
    driver = subprocess.Popen([sys.executable, "-m", "tangle_ray.cli", *command], env=ENV, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while not recorded(cfg.run_dir()):
        assert driver.poll() is None, driver.communicate()[1][-3000:]
        assert time.time() < deadline, "no checkpoint was recorded"
        time.sleep(0.05)
    driver.send_signal(signal.SIGINT)  # Ctrl+C
    out, err = driver.communicate(timeout=120)
    assert driver.returncode == 130, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"tangle-ray: run {cfg.run_dir().name} interrupted; its checkpoint of step "), last
    assert f"is saved in {cfg.run_dir()}" in last
    assert last.endswith(f"to resume, run the same command again: tangle-ray {' '.join(command)}"), last

    # the run reached at least step 2: a rerun asking for 1 step is refused on the driver, before Ray starts
    assert main(["search", str(run_file), "steps=1", "--no-export", "--address", "local"]) == 2
    refused = capsys.readouterr().err
    assert "is already at step" in refused and "past steps = 1" in refused and refused.count("\n") == 1
