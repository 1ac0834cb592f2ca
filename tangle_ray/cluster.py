"""Starting or joining Ray, the same way for every command."""

from __future__ import annotations

import os


def connect(address: str | None = None, num_cpus: int | None = None) -> None:
    """Join the Ray cluster at ``address`` (or the one running on this machine), or start a local one.

    ``address="local"`` always starts a new local cluster (with ``num_cpus``); nothing happens when Ray is
    already initialised in this process.
    """
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    kwargs = {"num_cpus": num_cpus, "include_dashboard": False} if address == "local" else {}
    ray.init(address=address, **kwargs)
