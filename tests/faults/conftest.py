"""The fault drills reuse the training tests' corpus and tiny run configs (tests/train/conftest.py), and compare
every drill with one uninterrupted run of the same settings."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psutil

from tangle_ray.train.checkpoint import RAY_SNAPSHOT
from tangle_ray.train.runner import TrainResult, run_training
from tests.train.conftest import data_dir, tiny_config  # noqa: F401  (fixtures)

LONG = {"steps": 20, "checkpoint_every": 5, "eval_every": 10, "log_every": 1, "scaling__num_workers": 2}
_uninterrupted: dict[str, TrainResult] = {}


def uninterrupted(make_config) -> TrainResult:
    """The LONG run without faults, once per session: on the Ray cluster that is up when first asked, or on a
    local one started for it."""
    import ray

    if "long" not in _uninterrupted:
        own = not ray.is_initialized()
        if own:
            ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
        try:
            _uninterrupted["long"] = run_training(make_config(**LONG), export=False)
        finally:
            if own:
                ray.shutdown()
    return _uninterrupted["long"]


def recorded(run_dir: Path) -> bool:
    """Has Ray Train recorded a checkpoint of this run (the one a restart or a rerun resumes from)?"""
    try:
        return bool(json.loads((run_dir / RAY_SNAPSHOT).read_text()).get("latest_checkpoint_result"))
    except (OSError, ValueError):
        return False


@contextmanager
def after_a_checkpoint(run_dir: Path, fault: Callable[[], Any]) -> Iterator[list]:
    """While the body runs, a thread calls ``fault()`` once Ray has recorded a checkpoint of ``run_dir``; the list
    yielded receives what it returned, unless None (it found nothing to break). The thread ends with the body."""
    done: list = []
    stop = threading.Event()

    def wait_then_break() -> None:
        while not recorded(run_dir):
            if stop.wait(0.02):
                return
        if (result := fault()) is not None:
            done.append(result)

    thread = threading.Thread(target=wait_then_break, daemon=True)
    thread.start()
    try:
        yield done
    finally:
        stop.set()
        thread.join()


def train_workers(process: psutil.Process) -> list[psutil.Process]:
    """The Ray Train worker processes among ``process``'s descendants."""
    found = []
    for child in process.children(recursive=True):
        try:
            if "RayTrainWorker" in " ".join(child.cmdline()):
                found.append(child)
        except psutil.Error:
            continue
    return found
