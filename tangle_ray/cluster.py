"""Starting or joining Ray, the same way for every command; checking that a request fits the cluster."""

from __future__ import annotations

import _thread
import logging
import math
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Mapping
from pathlib import Path

from tangle_ray.errors import ClusterError, ConfigError, clip, shorten

CONNECT_TIMEOUT_S = 15.0
START_TIMEOUT_S = 180.0  # ray.init, starting a local cluster or joining one that answered: a busy 2-core machine
# starts a local cluster in 5-30 s; past this something hangs (``TANGLE_RAY_START_TIMEOUT_S`` changes it)
_HTTP2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"  # + empty SETTINGS


def connect(address: str | None = None, num_cpus: int | None = None, timeout_s: float = CONNECT_TIMEOUT_S,
            verbose: bool = False, start_timeout_s: float | None = None) -> None:
    """Join the Ray cluster at ``address`` (or the one running on this machine), or start a local one.

    ``address="local"`` always starts a new local cluster (with ``num_cpus``); nothing happens when Ray is
    already initialised in this process. Without ``address`` (and ``RAY_ADDRESS``), the cluster Ray's cluster file
    names (``/tmp/ray/ray_current_cluster``, written by ``ray start``) is joined, or a local one started where
    there is none. An address that does not answer as a Ray cluster within ``timeout_s`` is a ConfigError
    (``ray.init`` itself would wait for minutes); so is a cluster file naming an address where nothing answers
    (a cluster that ended without ``ray stop``), and a ``ray.init`` that has not returned after
    ``start_timeout_s`` (default ``START_TIMEOUT_S``). Unless ``verbose``, Ray's own
    messages stay in its log files: workers' output is not forwarded here and Ray's loggers report errors only.
    A cluster started here is watched by ``reaper.py``: killed with this process, it leaves nothing behind.
    """
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    target = address or os.environ.get("RAY_ADDRESS") or None
    origin = f"--address {shorten(target)}" if address else f"RAY_ADDRESS={shorten(target)}"
    if target not in (None, "local"):
        check_reachable(target, timeout_s, where=origin)
    elif target is None:
        _check_cluster_file(timeout_s)
    kwargs = {"num_cpus": num_cpus, "include_dashboard": False} if address == "local" else {}
    level = logging.INFO if verbose else logging.ERROR  # Ray's own loggers only: tangle_ray's warnings stay visible
    logging.getLogger("ray").setLevel(level)
    before = _children()
    limit = start_timeout_s if start_timeout_s is not None else float(
        os.environ.get("TANGLE_RAY_START_TIMEOUT_S", START_TIMEOUT_S))
    joining = origin if target is not None else "starting or joining Ray (no --address)"
    bound = _Bounded(limit)
    try:
        with bound:
            ray.init(address=address, log_to_driver=verbose, logging_level=level, **kwargs)
    except KeyboardInterrupt:
        if not bound.fired.is_set():  # a person's Ctrl+C
            raise
        _end_started(before)
        how = ("is the cluster healthy (`ray status` on its head node)? Or pass --address local to start a fresh "
               "local cluster" if target not in (None, "local") else
               "see Ray's logs (/tmp/ray/session_latest/logs/); `ray stop` ends what an earlier cluster left "
               "running")
        raise ClusterError(f"{joining}: Ray did not start or join within {limit:g} s; {how}") from None
    except (ConnectionError, RuntimeError, ValueError, TimeoutError) as e:
        raise ClusterError(f"{joining}: cannot start or join the Ray cluster ({clip(str(e), 200)})") from None
    started = sorted(pid for pid, _ in _children() - before)
    if started:  # this process started a local cluster: its GCS, raylet and helpers are our children
        subprocess.Popen([sys.executable, str(Path(__file__).with_name("reaper.py")), str(os.getpid()),
                          *map(str, started)], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL, start_new_session=True)


class _Bounded:
    """A block interrupted (KeyboardInterrupt, with ``fired`` set) when it runs longer than ``limit_s``: a timer
    interrupts the main thread as Ctrl+C would (Ray's connection loops return to Python every second). Only on the
    main thread, where that interrupt lands; elsewhere the block is unbounded."""

    def __init__(self, limit_s: float):
        self.limit_s = limit_s
        self.fired = threading.Event()
        self.lock = threading.Lock()
        self.done = False
        self.timer: threading.Timer | None = None

    def _expire(self) -> None:
        with self.lock:
            if not self.done:
                self.fired.set()
                _thread.interrupt_main()

    def __enter__(self) -> None:
        if threading.current_thread() is threading.main_thread() and self.limit_s > 0:
            self.timer = threading.Timer(self.limit_s, self._expire)
            self.timer.daemon = True
            self.timer.start()

    def __exit__(self, kind, value, traceback) -> bool:
        with self.lock:
            self.done = True
        if self.timer is not None:
            self.timer.cancel()
        if self.fired.is_set() and kind is None:  # it returned as the timer fired: the interrupt is on its way
            raise KeyboardInterrupt
        return False


def _end_started(before: set[tuple[int, float]]) -> None:
    """After a start that timed out: disconnect, and end the processes it started."""
    import psutil
    import ray

    try:
        ray.shutdown()
    except Exception:  # noqa: BLE001 - best effort: the processes are ended below either way
        pass
    for pid, _ in _children() - before:
        try:
            psutil.Process(pid).kill()
        except psutil.Error:
            continue


def _check_cluster_file(timeout_s: float) -> None:
    """Without an address, Ray joins the cluster its cluster file names (written by ``ray start``): a ConfigError
    when nothing answers there (``ray.init`` would retry for minutes), saying what to do."""
    try:
        from ray._private.utils import get_ray_address_file, read_ray_address

        found, where = read_ray_address(None), get_ray_address_file(None)
    except (ImportError, OSError, AttributeError):
        return
    if not found:
        return
    hint = (f"a cluster that ended without `ray stop`? Run `ray stop`, or remove {where}, to let tangle-ray start "
            "a fresh local cluster; or pass --address local (a fresh local cluster) or --address HOST:PORT")
    check_reachable(found, timeout_s, where=f"the Ray cluster file {where} names {shorten(found)}", hint=hint)


def _children() -> set[tuple[int, float]]:
    """This process's children as (pid, start time)."""
    import psutil

    found = set()
    for child in psutil.Process().children():
        try:
            found.add((child.pid, child.create_time()))
        except psutil.Error:
            continue
    return found


def check_reachable(address: str, timeout_s: float = CONNECT_TIMEOUT_S, where: str | None = None,
                    hint: str | None = None) -> None:
    """ConfigError unless ``address`` (``host:port``, ``ray://host:port`` or ``auto``) answers like a Ray
    cluster (a gRPC server) within ``timeout_s`` seconds; ``where`` names the address's origin in the message
    (default: ``--address``), ``hint`` replaces its advice."""
    where = where or f"--address {shorten(address)}"
    if address == "auto":
        try:
            from ray._private.services import canonicalize_bootstrap_address_or_die

            address = canonicalize_bootstrap_address_or_die("auto")
        except (ConnectionError, RuntimeError, ValueError, ImportError) as e:
            raise ClusterError(f"{where}: no Ray cluster is running on this machine ({clip(str(e), 200)}); "
                              "start one with `ray start --head`, or leave --address out") from None
    host, sep, port = address.removeprefix("ray://").rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"{where}: expected host:port (e.g. 10.0.0.1:6379), ray://host:port or auto")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s) as s:
            if os.environ.get("RAY_USE_TLS", "0") in ("0", ""):
                s.settimeout(timeout_s)
                s.sendall(_HTTP2_PREFACE)
                reply = s.recv(9)  # a gRPC server's first frame is SETTINGS (type 4)
                if len(reply) < 4 or reply[3] != 4:
                    raise ClusterError(f"{where}: something answers there, but not a Ray cluster (no gRPC reply)"
                                      + (f"; {hint}" if hint else ""))
    except (TimeoutError, socket.timeout):
        raise ClusterError(f"{where}: no answer within {timeout_s:g} s; " + (hint or "is the Ray cluster running "
                          "(`ray status` on its head node) and its port open?")) from None
    except OSError as e:
        raise ClusterError(f"{where}: cannot reach it ({e.strerror or e}); " + (hint or "is the Ray cluster "
                          "running (`ray start --head` on its head node)?")) from None


def worker_resources(use_gpu: bool, resources_per_worker: Mapping[str, float] | None) -> dict[str, float]:
    """What one Ray Train worker asks for, as Ray Train works it out (1 CPU, or 1 GPU with ``use_gpu``)."""
    per = dict(resources_per_worker) if resources_per_worker else ({"GPU": 1.0} if use_gpu else {"CPU": 1.0})
    if use_gpu:
        per.setdefault("GPU", 1.0)
    return {k: float(v) for k, v in per.items() if v != 0}


def check_resources(num_workers: int, per_worker: Mapping[str, float], what: str,
                    placement_strategy: str = "PACK") -> None:
    """After connecting: ConfigError when ``num_workers`` workers of ``per_worker`` resources can never run on
    this cluster (Ray would wait for them forever), naming what is asked and what the cluster has.

    ``TANGLE_RAY_AUTOSCALING=1`` (a cluster that grows on demand) skips the check.
    """
    import ray

    if os.environ.get("TANGLE_RAY_AUTOSCALING") == "1":
        return
    nodes = [dict(n.get("Resources", {})) for n in ray.nodes() if n.get("Alive")]
    total = {k: sum(n.get(k, 0.0) for n in nodes) for n in nodes for k in n}
    have = ", ".join(f"{total.get(k, 0):g} {k}" for k in ("CPU", "GPU")) + f" on {len(nodes)} node(s)"
    for key, amount in per_worker.items():
        if not isinstance(amount, (int, float)) or isinstance(amount, bool) or not math.isfinite(amount) or amount < 0:
            raise ConfigError(f"{what}: {key} = {shorten(amount)} per worker must be a finite number >= 0")
        if amount == 0:
            continue
        largest = max((n.get(key, 0.0) for n in nodes), default=0.0)
        if largest < amount:
            hint = " (set use_gpu = false on a cluster without GPUs)" if key == "GPU" else ""
            raise ClusterError(f"{what}: each worker needs {amount:g} {key}, the largest node has {largest:g}; "
                              f"the cluster has {have}{hint}")
        fits = sum(math.floor(n.get(key, 0.0) / amount + 1e-9) for n in nodes)
        if placement_strategy == "STRICT_PACK":
            fits = max(math.floor(n.get(key, 0.0) / amount + 1e-9) for n in nodes)
        elif placement_strategy == "STRICT_SPREAD":
            fits = sum(1 for n in nodes if n.get(key, 0.0) >= amount)
        if fits < num_workers:
            raise ClusterError(f"{what}: {num_workers} workers x {amount:g} {key} ({placement_strategy}) do not fit: "
                              f"at most {fits} fit; the cluster has {have}")
