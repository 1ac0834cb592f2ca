"""``tangle-ray cluster check``: what every node of a Ray cluster runs and reaches, before a run starts there.

A probe task pinned to each alive node reports its Python, torch, CUDA, NCCL, DeepSpeed, Ray and tangle_ray
versions, its GPUs and their memory, the free disk under each path, and whether each path (``run.storage_path``,
``data.dir``) is reachable and writable from that node (a probe file written, read back and deleted). The driver
compares every node with itself and with the run's resource request: one table, one verdict, every problem in
one line that names the node and says the fix.
"""

from __future__ import annotations

import os
import platform
import shutil
import socket
import uuid
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from tangle_ray import storage

PACKAGES = ("torch", "deepspeed", "ray", "tangle-ray")


def node_facts(paths: list[str]) -> dict[str, Any]:
    """What this process's node runs and reaches (runs inside the probe task, or on the driver)."""
    import torch

    versions = {"python": platform.python_version()}
    for package in PACKAGES:
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = "missing"
    versions["cuda"] = torch.version.cuda or "none"
    nccl = torch.cuda.nccl.version() if torch.cuda.is_available() else None
    versions["nccl"] = ".".join(map(str, nccl)) if isinstance(nccl, tuple) else str(nccl or "none")
    gpus = [(torch.cuda.get_device_name(i), torch.cuda.get_device_properties(i).total_memory / 2**30)
            for i in range(torch.cuda.device_count())]
    return {"host": socket.gethostname(), "versions": versions, "gpus": gpus,
            "paths": {p: _probe_path(p) for p in paths}}


def _probe_path(path: str) -> dict[str, Any]:
    """Free disk under ``path`` and whether a file can be written, read back and deleted there (an object, on
    object storage; the free disk is then the local cache's)."""
    if storage.is_uri(path):
        problem = storage.probe(path)
        cache = next(p for p in (storage.cache_path(path), *storage.cache_path(path).parents) if p.exists())
        return {"ok": not problem, "free_gb": shutil.disk_usage(cache).free / 2**30, "problem": problem}
    folder = Path(path)
    existing = next((p for p in (folder, *folder.parents) if p.exists()), Path("/"))
    free_gb = shutil.disk_usage(existing).free / 2**30
    if not folder.is_dir():
        return {"ok": False, "free_gb": free_gb, "problem": f"{path} is not a folder on this node"
                + (f" (the nearest existing one is {existing})" if existing != folder else "")}
    probe = folder / f".tangle-ray-probe-{uuid.uuid4().hex}"
    try:
        probe.write_text("probe")
        ok = probe.read_text() == "probe"
        probe.unlink()
    except OSError as e:
        return {"ok": False, "free_gb": free_gb, "problem": f"cannot write to {path} ({e.strerror or e})"}
    return {"ok": ok, "free_gb": free_gb, "problem": "" if ok else f"{path} did not read back what was written"}


@dataclass
class ClusterReport:
    """The nodes' facts (by node address), the driver's, and every problem found."""

    nodes: dict[str, dict[str, Any]]
    driver: dict[str, Any]
    problems: list[str] = field(default_factory=list)

    def table(self) -> str:
        names = ["node", "host", *self.driver["versions"], "GPUs", *(f"free GB {p}" for p in self.driver["paths"])]
        rows = [names]
        for node, facts in sorted(self.nodes.items()):
            gpus = ", ".join(f"{n} {m:.0f} GiB" for n, m in facts["gpus"]) or "none"
            rows.append([node, facts["host"], *(facts["versions"].get(k, "?") for k in self.driver["versions"]),
                         gpus, *(f"{facts['paths'][p]['free_gb']:.0f}" + ("" if facts["paths"][p]["ok"] else " (!)")
                                 for p in self.driver["paths"])])
        widths = [max(len(str(r[i])) for r in rows) for i in range(len(names))]
        return "\n".join("  ".join(str(c).ljust(w) for c, w in zip(r, widths)) for r in rows)

    @property
    def verdict(self) -> str:
        if not self.problems:
            return f"ok: {len(self.nodes)} node(s) run the driver's versions and reach every path"
        return f"{len(self.problems)} problem(s):\n" + "\n".join(f"- {p}" for p in self.problems)


def check_cluster(paths: list[str], workers: int = 0, per_worker: dict[str, float] | None = None,
                  placement_strategy: str = "PACK") -> ClusterReport:
    """Probe every alive node of the connected cluster; compare with the driver and the resource request."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from tangle_ray.cluster import check_resources
    from tangle_ray.errors import TangleRayError

    probe = ray.remote(num_cpus=0, max_retries=0)(node_facts)
    alive = [n for n in ray.nodes() if n.get("Alive")]
    futures = {f"{n['NodeManagerAddress']}:{n['NodeManagerPort']}":
               probe.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)).remote(paths)
               for n in alive}
    nodes = dict(zip(futures, ray.get(list(futures.values()), timeout=120)))
    report = ClusterReport(nodes, node_facts(paths))
    for node, facts in sorted(nodes.items()):
        for name, mine in report.driver["versions"].items():
            theirs = facts["versions"].get(name)
            if theirs != mine:
                report.problems.append(f"node {node} ({facts['host']}) has {name} {theirs}, the driver has {mine}: "
                                       f"install {name} {mine} there (one environment on every node)")
        report.problems += [f"node {node} ({facts['host']}): {p['problem']}" for p in facts["paths"].values()
                            if not p["ok"]]
    if workers:
        try:
            check_resources(workers, per_worker or {"CPU": 1.0}, "the run's request", placement_strategy)
        except TangleRayError as e:
            report.problems.append(str(e))
    return report


def paths_of_run(run_file: str | None, overrides: list[str]) -> tuple[list[str], int, dict[str, float], str]:
    """A run file's storage and data folders and its resource request (workers, per worker, placement)."""
    from tangle_ray.cluster import worker_resources
    from tangle_ray.train.config import load_config

    cfg = load_config(run_file, overrides)
    s = cfg.scaling
    paths = [p if storage.is_uri(p) else os.path.abspath(p) for p in (cfg.run.storage_path, cfg.data.dir)]
    return paths, s.num_workers, worker_resources(s.use_gpu, s.resources_per_worker), s.placement_strategy
