"""Requests no machine can hold, refused on the driver before Ray starts a worker.

- **Memory.** Every worker builds the whole supernet in fp32 (4 bytes a parameter, and its buffers: masks and index
  tables) before DeepSpeed partitions it,
  then holds its model states: weights, gradients, Adam's two moments and the fp32 copy the ZeRO optimizer keeps,
  per ZeRO stage and world size as ``scaling.predict.model_state_bytes`` counts them. The supernet's parameters
  are counted on PyTorch's meta device (shapes only). Workers that share a node share its memory: the nodes the
  run will use (this machine for a local cluster, ``ray.nodes()`` for a cluster) must hold ``num_workers`` of them.
  Activations come on top, so this refuses only what cannot fit at all. Commands that build a supernet on the
  driver without workers (``evaluate``, ``tune``, ``export``) ask ``check_build``: the build and the weights
  read beside it against this machine's memory.
- **The global batch.** A step's global batch may not exceed the distinct samples of the weight split (text
  windows, images): a larger one repeats samples within every step.
"""

from __future__ import annotations

import json
import math
import os
import sys
from dataclasses import dataclass
from typing import Any

import torch

from tangle_ray.errors import ClusterError, ConfigError
from tangle_ray.space import SearchSpace, space_to_dict

_META: dict[str, Any] = {}  # space (as JSON) -> its supernet on the meta device (shapes only, no memory)

@dataclass(frozen=True)
class Node:
    """A machine the run may use: its memory in bytes, how many workers its CPUs or GPUs take and the memory of
    one of its GPUs where known (the driver's own machine)."""

    memory: float
    slots: int
    gpu_memory: float | None = None


def local_gpu_memory() -> float | None:
    return float(torch.cuda.get_device_properties(0).total_memory) if torch.cuda.is_available() else None


def meta_supernet(space: SearchSpace) -> Any:
    """The space's supernet built on PyTorch's meta device: every parameter and buffer with its shape and no
    memory (cached per space)."""
    key = json.dumps(space_to_dict(space), sort_keys=True, default=str)
    if key not in _META:
        with torch.device("meta"):
            _META[key] = space.build_supernet()
    return _META[key]


def supernet_params(space: SearchSpace) -> int:
    """Parameters of the space's supernet (weights and architecture parameters), counted on the meta device."""
    supernet = meta_supernet(space)
    return sum(p.numel() for p in supernet.net.parameters()) + sum(a.numel() for a in supernet.alphas.values())


def buffer_bytes(space: SearchSpace) -> int:
    """Bytes of the supernet's buffers (masks, index tables: 0.44 GiB for AutoFormer-T with patch_size 7, whose
    1,025 tokens make large relative-position tables), which its build allocates besides the parameters."""
    return sum(b.numel() * b.element_size() for b in meta_supernet(space).net.buffers())


def build_bytes(space: SearchSpace) -> float:
    """Memory one build of the supernet takes: its parameters in fp32 and its buffers."""
    return 4.0 * supernet_params(space) + buffer_bytes(space)


def check_build(space: SearchSpace, source: str, loads: bool = True) -> None:
    """ClusterError when this machine cannot hold the supernet of ``space`` built in fp32 (and, with ``loads``,
    the stored weights read beside it): what ``evaluate``, ``tune`` and ``export`` need before they build one,
    checked on the meta device so that nothing is allocated first."""
    import psutil

    params, build = supernet_params(space), build_bytes(space)
    need = build + (4.0 * params if loads else 0.0)
    have = float(psutil.virtual_memory().total)
    if need > have:
        raise ClusterError(
            f"{source}: space {space.source} has a supernet of {params:,} parameters; building it"
            f"{' and reading its weights' if loads else ''} needs at least {gib(need)} of memory "
            f"(fp32 weights {gib(4.0 * params)}, buffers {gib(build - 4.0 * params)}), but this machine has "
            f"{gib(have)}: use a machine with more memory, or a smaller space")


def gib(n: float) -> str:
    return f"{n / 2**30:,.3g} GiB"


def rank_bytes(cfg: Any, params: int, buffers: float = 0.0) -> tuple[float, float, dict[str, float]]:
    """(host bytes, device bytes, model states) of one worker: the whole supernet in fp32 (and its buffers)
    while it is built, and at least that or its model states on the device that trains (the host, on CPU
    workers)."""
    from tangle_ray.scaling.predict import model_state_bytes
    from tangle_ray.train.deepspeed import resolve_precision

    states = model_state_bytes(params, cfg.zero_stage, cfg.scaling.num_workers, resolve_precision(cfg))
    build = 4.0 * params + buffers
    device = max(build, sum(states.values()))
    return (build if cfg.scaling.use_gpu else device), device, states


def nodes_for(cfg: Any) -> tuple[list[Node], str] | None:
    """The nodes a run will use and how to name them: Ray's nodes once connected, else this machine (where a
    local cluster would start); None when ``RAY_ADDRESS`` names a cluster not joined yet."""
    if "ray" in sys.modules and sys.modules["ray"].is_initialized():
        return cluster_nodes(cfg)
    if os.environ.get("RAY_ADDRESS") in (None, "", "local"):
        import psutil

        return [Node(float(psutil.virtual_memory().total), cfg.scaling.num_workers, local_gpu_memory())], \
            "this machine"
    return None


def cluster_nodes(cfg: Any) -> tuple[list[Node], str]:
    """Every live node of the Ray cluster: its memory (Ray's ``memory`` plus ``object_store_memory``) and how
    many workers of this run its resources take."""
    import ray

    from tangle_ray.cluster import worker_resources

    s = cfg.scaling
    per_worker = worker_resources(s.use_gpu, s.resources_per_worker)
    here = ray.util.get_node_ip_address()
    nodes = []
    for n in ray.nodes():
        if not n.get("Alive"):
            continue
        have = n.get("Resources", {})
        memory = float(have.get("memory", 0.0)) + float(have.get("object_store_memory", 0.0))
        slots = min((math.floor(have.get(k, 0.0) / v + 1e-9) for k, v in per_worker.items() if v > 0),
                    default=s.num_workers)
        gpu = local_gpu_memory() if n.get("NodeManagerAddress") == here else None
        nodes.append(Node(memory, min(slots, s.num_workers), gpu))
    return nodes, f"the Ray cluster ({len(nodes)} node(s))"


def check_memory(cfg: Any, space: SearchSpace, nodes: list[Node], where: str, source: str = "run config") -> None:
    """ConfigError when ``num_workers`` workers of ``cfg`` cannot hold the supernet of ``space`` on ``nodes``
    (also on a local GPU too small for one worker), with the numbers and what to change."""
    if sum(n.slots for n in nodes) < cfg.scaling.num_workers:
        return  # too few CPUs or GPUs whatever the memory: ``cluster.check_resources`` says so
    params, buffers = supernet_params(space), buffer_bytes(space)
    host, device, states = rank_bytes(cfg, params, buffers)
    build = 4.0 * params + buffers
    workers = cfg.scaling.num_workers
    fits = sum(min(n.slots, math.floor(n.memory / host)) for n in nodes)
    largest = max(n.memory for n in nodes)
    labels = {"param_bytes": "weights", "grad_bytes": "gradients", "optimizer_state_bytes": "Adam's moments",
              "master_bytes": "fp32 copy"}
    parts = ", ".join(f"{labels.get(k, k)} {gib(v)}" for k, v in states.items() if v)
    what = (f"the whole supernet in fp32 while it is built: {gib(build)}" if cfg.scaling.use_gpu else
            f"model states at ZeRO stage {cfg.zero_stage} over {workers} worker(s): {parts}; the whole supernet in "
            f"fp32 while it is built: {gib(build)}")
    if fits < workers:
        if build > largest:
            advice = ("no number of workers helps (each builds the whole supernet before ZeRO partitions it): "
                      "use a smaller space (fewer or narrower layers, a smaller vocabulary or num_classes)")
        else:
            advice = ("use a smaller space, or spread the run over more nodes with zero_stage: 3 (model states per "
                      "worker fall as 1 / workers; each worker still builds the whole supernet once)")
        raise ClusterError(
            f"{source}: space {space.source} has a supernet of {params:,} parameters; each of the {workers} "
            f"worker(s) needs at least {gib(host)} of memory for it ({what}), {gib(host * workers)} in all before "
            f"activations, but {where} has {gib(sum(n.memory for n in nodes))} (largest node {gib(largest)}); {advice}")
    usable = [n for n in nodes if n.slots > 0]
    known = [n.gpu_memory for n in usable if n.gpu_memory is not None]
    if cfg.scaling.use_gpu and known and len(known) == len(usable) and device > max(known):
        advice = ("use a smaller space" if build > max(known) else
                  "use zero_stage: 3 with more GPUs (model states per GPU fall as 1 / workers), or a smaller space")
        raise ClusterError(
            f"{source}: space {space.source} has a supernet of {params:,} parameters; each GPU worker needs at least "
            f"{gib(device)} of GPU memory for it (model states at ZeRO stage {cfg.zero_stage} over {workers} "
            f"worker(s): {parts}; the whole supernet in fp32 when it is moved there: {gib(build)}), the "
            f"GPUs of {where} have {gib(max(known))}; {advice}")


def check_global_batch(cfg: Any, data_dir: str, batches: Any, source: str = "run config") -> None:
    """ConfigError when the global batch exceeds the distinct samples of the weight split ``batches`` draws
    from (batches that cannot say how many are left unchecked)."""
    count = getattr(batches, "num_samples", None)
    if count is None:
        return
    n = count()
    if cfg.global_batch_size > n:
        per_step = cfg.scaling.num_workers * cfg.micro_batch_size
        fix = (f"use at most {n // per_step * per_step:,} (a multiple of scaling.num_workers x micro_batch_size = "
               f"{per_step})" if n >= per_step else f"use a smaller micro_batch_size (now {per_step} samples over "
               "all workers)")
        raise ConfigError(
            f"{source}: global_batch_size = {cfg.global_batch_size:,} is more than the {n:,} distinct samples of "
            f"the weight split of {data_dir}: every step would repeat samples; {fix}, or use more data")
