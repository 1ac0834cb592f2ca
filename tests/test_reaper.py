"""The reaper of a local cluster, without Ray: a stand-in driver starts process trees and the reaper watches them."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil

import tangle_ray
from tangle_ray.reaper import alive

REAPER = Path(tangle_ray.__file__).with_name("reaper.py")
SLEEPER = "import time; time.sleep(600)"
ROOT = f"import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', {SLEEPER!r}]); time.sleep({{life}})"
DRIVER = f"""
import os, subprocess, sys, time
roots = [subprocess.Popen([sys.executable, '-c', {ROOT!r}.format(life=sys.argv[1])]) for _ in range(2)]
time.sleep(0.5)  # the roots have started their children
reaper = subprocess.Popen([sys.executable, {str(REAPER)!r}, str(os.getpid()), *[str(r.pid) for r in roots]],
                          start_new_session=True)
print(reaper.pid, flush=True)
time.sleep(600)
"""


def _start(root_life_s: float) -> tuple[subprocess.Popen, psutil.Process, list[psutil.Process]]:
    """The stand-in driver, its reaper, and the cluster: two roots, each with a child."""
    driver = subprocess.Popen([sys.executable, "-c", DRIVER, str(root_life_s)], stdout=subprocess.PIPE, text=True)
    reaper = psutil.Process(int(driver.stdout.readline()))
    cluster = [p for p in psutil.Process(driver.pid).children(recursive=True) if p.pid != reaper.pid]
    assert len(cluster) == 4
    time.sleep(1)  # a few polls: the reaper knows every process
    return driver, reaper, cluster


def _gone(processes: list[psutil.Process], within_s: float) -> bool:
    deadline = time.time() + within_s
    while time.time() < deadline:
        if not any(alive(p) for p in processes):
            return True
        time.sleep(0.1)
    return False


def test_a_killed_driver_takes_its_cluster_with_it():
    driver, reaper, cluster = _start(root_life_s=600)
    driver.send_signal(signal.SIGKILL)
    driver.wait()
    assert _gone(cluster + [reaper], within_s=5), [p.pid for p in cluster if alive(p)]


def test_the_reaper_ends_by_itself_once_the_cluster_has_shut_down():
    driver, reaper, cluster = _start(root_life_s=2)  # the roots exit (as after ray.shutdown), their children not
    try:
        assert not _gone([reaper], within_s=2.5), "the reaper ended while the roots' children still ran"
        for process in filter(alive, cluster):
            process.kill()
        assert _gone([reaper], within_s=5)
        assert driver.poll() is None  # the driver itself is never touched
    finally:
        driver.kill()
        driver.wait()
