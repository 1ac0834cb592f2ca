"""A full disk under the run folder (a small tmpfs filled by a balloon file once Ray has recorded a checkpoint):
the run stops with one line saying so, preflight and export refuse with one line each and export leaves nothing
a reader accepts; after freeing space the rerun resumes to the uninterrupted result and export succeeds."""

from __future__ import annotations

import errno
import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tangle_ray.errors import ConfigError, DataError, StorageError
from tangle_ray.folders import load_supernet
from tangle_ray.models import load_model
from tangle_ray.train.checkpoint import latest_checkpoint, read_trainer_state
from tangle_ray.train.export import export_run
from tangle_ray.train.runner import RunStopped, preflight, run_training
from tests.faults.conftest import LONG, after_a_checkpoint, uninterrupted
from tests.train.states import assert_same_run

DISK_MB = 200  # a LONG run holds up to three checkpoints of ~55 MB (Ray keeps two and copies the next one)


@pytest.fixture
def small_disk(tmp_path) -> Iterator[Path]:
    """A tmpfs of DISK_MB mounted for this test (needs root), unmounted afterwards."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mount = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={DISK_MB}m", "tmpfs", str(disk)],
                           capture_output=True, text=True)
    if mount.returncode:
        pytest.skip(f"mounting a tmpfs is not permitted here ({mount.stderr.strip()}): no disk to fill")
    try:
        yield disk
    finally:
        subprocess.run(["umount", "--lazy", str(disk)], check=True)


def _fill(disk: Path) -> Path:
    """Write zeros into ``disk/balloon`` until the file system has no space left."""
    balloon = disk / "balloon"
    with balloon.open("wb", buffering=0) as f:
        try:
            while True:
                f.write(bytes(1 << 20))
        except OSError as e:
            if e.errno != errno.ENOSPC:
                raise
    return balloon


@pytest.mark.ray
def test_a_full_disk_stops_with_one_line_and_a_rerun_after_freeing_space_resumes(local_ray, tiny_config, small_disk):
    cfg = tiny_config(**LONG, run__storage_path=str(small_disk), max_failures=0)
    run_dir = cfg.run_dir()
    with after_a_checkpoint(run_dir, lambda: _fill(small_disk)) as balloons, pytest.raises(RunStopped) as stopped:
        run_training(cfg, export=False)
    assert balloons, "the disk was not filled: the run stopped before Ray recorded a checkpoint"
    step = read_trainer_state(latest_checkpoint(run_dir))["step"]
    message = str(stopped.value)
    assert "\n" not in message and len(message) < 600, message
    assert f"disk full at {run_dir}" in message and "(No space left on device): free space there" in message
    assert f"rerun the same command to resume from step {step}" in message, message

    with pytest.raises(ConfigError) as refused:
        preflight(cfg)  # _check_writable
    assert f"cannot write to {run_dir} (No space left on device)" in str(refused.value)
    export = run_dir / "export"
    with pytest.raises(StorageError) as refused:
        export_run(run_dir)
    message = str(refused.value)
    assert "\n" not in message and len(message) < 600, message
    assert f"disk full at {export} (No space left on device): free space there, then export again" in message
    for read, folder in ((load_supernet, export / "supernet"), (load_model, export / "model")):
        with pytest.raises(DataError):  # what the failed export left is not taken for a complete folder
            read(folder)
    assert not (export / "arch.json").exists()

    balloons[0].unlink()
    result = run_training(cfg, export=False)
    assert f"resumed at step {step}" in (run_dir / "progress.log").read_text()
    assert_same_run(result, uninterrupted(tiny_config))
    assert export_run(run_dir) == export
    supernet = load_supernet(export / "supernet")
    load_model(export / "model")
    assert json.loads((export / "arch.json").read_text()) == supernet.space.active(result.arch)
