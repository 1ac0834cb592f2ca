"""Fault drills on a local Ray cluster: a worker killed mid-run, an exception at a step, a checkpoint cut short,
a read-only run folder. Each ends in a resume or in one line naming what to do; few ``fit()`` calls in all.

Covered elsewhere and not repeated: a run killed after a checkpoint resumes to the same state bit for bit, and
a worker failure with restarts resumes from the last checkpoint (tests/train/test_distributed.py).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess

import psutil
import pytest

from tangle_ray.errors import ConfigError, DataError
from tangle_ray.train.checkpoint import (
    consolidated_weights,
    find_checkpoints,
    latest_checkpoint,
    read_trainer_state,
    resume_checkpoint,
)
from tangle_ray.train.runner import RunStopped, preflight, run_training
from tests.faults.conftest import LONG, after_a_checkpoint, train_workers, uninterrupted
from tests.train.states import assert_same_run, steps


def _kill_a_worker() -> int | None:
    """SIGKILL one Ray Train worker of this test (a child process of ours); its pid."""
    for worker in train_workers(psutil.Process()):
        try:
            worker.send_signal(signal.SIGKILL)
            return worker.pid
        except psutil.Error:
            continue
    return None


def _run_with_a_kill(cfg):
    with after_a_checkpoint(cfg.run_dir(), _kill_a_worker) as killed:
        return run_training(cfg, export=False), killed


@pytest.mark.ray
def test_a_killed_worker_with_restarts_resumes_by_itself(local_ray, tiny_config):
    cfg = tiny_config(**LONG, max_failures=1)
    result, killed = _run_with_a_kill(cfg)
    assert killed, "no worker was killed: the run ended before its first checkpoint reached storage"
    assert steps(result) == list(range(1, 21))  # every step once: the restart resumed from the checkpoint
    assert "resumed at step 5" in (cfg.run_dir() / "progress.log").read_text()
    assert read_trainer_state(resume_checkpoint(cfg.run_dir()))["step"] == 20
    assert_same_run(result, uninterrupted(tiny_config))


@pytest.mark.ray
def test_a_killed_worker_without_restarts_stops_with_one_line_and_a_rerun_resumes(local_ray, tiny_config):
    cfg = tiny_config(**LONG, max_failures=0)
    with pytest.raises(RunStopped) as stopped:
        _run_with_a_kill(cfg)
    message = str(stopped.value)
    assert "\n" not in message and len(message) < 600, message
    assert "rerun the same command to resume from step" in message
    step = read_trainer_state(latest_checkpoint(cfg.run_dir()))["step"]
    result = run_training(cfg, export=False)
    assert f"resumed at step {step}" in (cfg.run_dir() / "progress.log").read_text()
    assert_same_run(result, uninterrupted(tiny_config))


@pytest.mark.ray
def test_an_exception_at_a_step_then_a_checkpoint_cut_short(local_ray, tiny_config):
    cfg = tiny_config(steps=6, checkpoint_every=2, eval_every=6, scaling__num_workers=2, inject_failure_at_step=5,
                      max_failures=0)
    with pytest.raises(RunStopped, match="injected failure at step 5.*resume from step 4"):
        run_training(cfg, export=False)
    run_dir = cfg.run_dir()
    older, newest = find_checkpoints(run_dir)
    assert read_trainer_state(newest)["step"] == 4 and resume_checkpoint(run_dir) == newest
    assert set(consolidated_weights(newest)) == set(consolidated_weights(older))  # weights_only loads
    shard = next((newest / "ds").glob("*optim_states.pt"))
    body = shard.read_bytes()
    shard.write_bytes(body[: len(body) // 2])  # the write was cut half-way
    assert latest_checkpoint(run_dir) == older  # readers fall back to the previous checkpoint
    with pytest.raises(DataError, match=f"{shard.name} is {len(body) // 2} bytes, its manifest says {len(body)}"):
        resume_checkpoint(run_dir)  # Ray would resume from exactly this one: refused, naming the file
    with pytest.raises(DataError, match=shard.name):
        consolidated_weights(newest)
    with pytest.raises(DataError, match=f"{shard.name}.*Ray resumes from this checkpoint"):
        preflight(cfg)  # the rerun stops before Ray starts
    shard.write_bytes(body)
    (newest / "manifest.part1.json").unlink()  # rank 1 never finished writing
    assert latest_checkpoint(run_dir) == older
    with pytest.raises(DataError, match=r"manifest parts \[1\] of 2 are missing"):
        resume_checkpoint(run_dir)


def test_a_read_only_run_folder_is_one_line_naming_it(tiny_config):
    cfg = tiny_config()
    run_dir = cfg.run_dir()
    run_dir.mkdir(parents=True)
    if os.geteuid() == 0:  # root writes through permissions: make the folder immutable instead
        if shutil.which("chattr") is None or subprocess.run(["chattr", "+i", str(run_dir)]).returncode:
            pytest.skip("running as root without chattr: cannot make a read-only folder")
    else:
        run_dir.chmod(0o555)
    try:
        with pytest.raises(ConfigError) as e:
            preflight(cfg)
    finally:
        if os.geteuid() == 0:
            subprocess.run(["chattr", "-i", str(run_dir)])
        run_dir.chmod(0o755)
    assert str(run_dir) in str(e.value) and "\n" not in str(e.value)
