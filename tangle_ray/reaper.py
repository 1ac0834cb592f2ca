"""The reaper of a local Ray cluster started by a tangle-ray driver; run as a script, it imports only psutil.

Ray ties its GCS and raylet to the driver that started them, but when that driver is killed (SIGKILL, the OOM
killer) Ray's agents stay alive for about a minute more: they report the raylet's death to the GCS, which is
dead too, and wait for the call to time out. The reaper watches the driver: while it lives, it notes every
process of the cluster (the processes ``ray.init`` started and all their descendants); once the driver is gone,
it kills the ones still running. It ends by itself when the cluster has shut down.

Usage: ``python reaper.py DRIVER_PID ROOT_PID...`` (``cluster.connect`` starts it).
"""

from __future__ import annotations

import os
import sys
import time

import psutil

POLL_S = 0.5


def alive(process: psutil.Process) -> bool:
    """Running, and still the process we saw (``is_running`` compares start times: pids are reused)."""
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def cluster_processes(roots: list[psutil.Process]) -> dict[int, psutil.Process]:
    """The live roots and their live descendants, by pid."""
    found: dict[int, psutil.Process] = {}
    for root in roots:
        try:
            if alive(root):
                found.update((p.pid, p) for p in [root, *root.children(recursive=True)] if alive(p))
        except psutil.Error:
            continue
    return found


def watch(driver_pid: int, root_pids: list[int]) -> None:
    """Until the driver exits, note the cluster's processes; then kill those that remain."""
    roots = []
    for pid in root_pids:
        try:
            roots.append(psutil.Process(pid))
        except psutil.Error:
            continue
    known: dict[int, psutil.Process] = {}
    while os.getppid() == driver_pid:  # the driver's death makes init (or a subreaper) our parent
        known = {pid: p for pid, p in known.items() if alive(p)}
        known.update(cluster_processes(roots))
        if not known:
            return  # the driver shut the cluster down
        time.sleep(POLL_S)
    for process in known.values():
        try:
            if alive(process):
                process.kill()
        except psutil.Error:
            continue


if __name__ == "__main__":
    watch(int(sys.argv[1]), [int(pid) for pid in sys.argv[2:]])
