"""Starting or joining Ray, the same way for every command."""

from __future__ import annotations

import logging
import os


def connect(address: str | None = None, num_cpus: int | None = None, verbose: bool = False) -> None:
    """Join the Ray cluster at ``address`` (or the one running on this machine), or start a local one.

    ``address="local"`` always starts a new local cluster (with ``num_cpus``); nothing happens when Ray is
    already initialised in this process. Unless ``verbose``, Ray's own messages stay in its log files: workers'
    output is not forwarded to this terminal and Ray's driver-side loggers only report errors.
    """
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    kwargs = {"num_cpus": num_cpus, "include_dashboard": False} if address == "local" else {}
    if not verbose:
        logging.getLogger("ray").setLevel(logging.ERROR)
        kwargs["logging_config"] = ray.LoggingConfig(log_level="ERROR")
    ray.init(address=address, log_to_driver=verbose, **kwargs)
