"""Predictions made before a point runs: FLOPs per step (of what the step computes and of the architecture it
trains) and memory per worker (model states by ZeRO stage and world size, activations of one micro-batch).

Model states follow DeepSpeed's own accounting (``estimate_zero2_model_states_mem_needs``: 2 + 18/W bytes per
parameter in bf16 under ZeRO-2) term by term, so that each term can be set against what a rank measures:
weights (partitioned by ZeRO-3), gradients (partitioned from ZeRO-2; mixed precision adds an fp32 partition from
ZeRO-1), Adam's two moments (partitioned from ZeRO-1) and the fp32 copy of the weights the ZeRO optimizer keeps
per partition (and bf16 training keeps whole without ZeRO). Activations are the tensors autograd saves for the
backward pass of one micro-batch of the superposed step, traced on PyTorch's meta device: shapes only, no memory
and no computation.
"""

from __future__ import annotations

import random
from typing import Any

import torch

from tangle_ray.methods import get_method
from tangle_ray.space import SearchSpace

SPOS_SAMPLES = 256  # architectures drawn to estimate a SPOS step's expected FLOPs


def step_flops(space: SearchSpace, method: str, samples: int) -> float:
    """FLOPs of one training step over ``samples`` samples: a superposing method (TangleNAS) runs the supernet
    forward and backward on a weight batch and on an architecture batch of the same size; a single-path method
    (SPOS) one random path."""
    if get_method(method).superposed_loss:
        return 2.0 * space.superposed_flops(samples, backward=True)
    return 3.0 * samples * expected_path_flops(space)


def arch_flops(space: SearchSpace, arch: dict[str, Any] | None, samples: int) -> float:
    """FLOPs of training ``arch`` alone on ``samples`` samples (forward and backward: 3 x forward)."""
    return 3.0 * samples * (space.flops(arch) if arch is not None else expected_path_flops(space))


def expected_path_flops(space: SearchSpace) -> float:
    """The mean forward FLOPs per sample of uniformly drawn architectures (SPOS's paths)."""
    rng = random.Random(0)
    return sum(space.flops(space.sample(rng)) for _ in range(SPOS_SAMPLES)) / SPOS_SAMPLES


def model_state_bytes(params: int, zero_stage: int, world: int, precision: str) -> dict[str, float]:
    """Bytes per rank of each model state for ``params`` weights at ``zero_stage`` over ``world`` ranks."""
    mixed = precision in ("bf16", "fp16")
    width = 2 if mixed else 4

    def part(stage: int) -> int:  # the divisor once ZeRO partitions a state at ``stage``
        return world if zero_stage >= stage else 1

    grads = params * width / part(2) + (4 * params / world if mixed and zero_stage >= 1 else 0)
    master = 4 * params / world if zero_stage >= 1 else (4 * params if mixed else 0)
    return {"param_bytes": params * width / part(3), "grad_bytes": grads,
            "optimizer_state_bytes": 8 * params / part(1), "master_bytes": master}


def predict_memory(space: SearchSpace, method: str, micro_batch: int, zero_stage: int, world: int,
                   precision: str) -> dict[str, float]:
    """Every term of a rank's predicted memory and their sum (``peak_bytes``)."""
    params, activations = _traced(space, method, micro_batch, precision)
    out = {**model_state_bytes(params, zero_stage, world, precision), "activation_bytes": activations}
    out["peak_bytes"] = sum(out.values())
    return {**out, "supernet_params": params}


_TRACES: dict[tuple[str, str, int, str], tuple[int, int]] = {}


def _traced(space: SearchSpace, method: str, micro_batch: int, precision: str) -> tuple[int, int]:
    """(parameters of the supernet, bytes autograd saves for one micro-batch), on the meta device."""
    key = (space.name, method, micro_batch, precision)
    if key not in _TRACES:
        _TRACES[key] = _trace(space, method, micro_batch, precision)
    return _TRACES[key]


def _trace(space: SearchSpace, method: str, micro_batch: int, precision: str) -> tuple[int, int]:
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)
    lm = space.family.task == "lm"
    with torch.device("meta"):
        supernet = space.build_supernet().to(dtype)
        x = torch.zeros(micro_batch, *_input_shape(space), dtype=torch.long if lm else dtype)
        y = torch.zeros(micro_batch, *(_input_shape(space) if lm else ()), dtype=torch.long)
    net = supernet.net
    owned = {id(p) for p in net.parameters()}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        base = t._base if t._base is not None else t
        if id(t) not in owned and id(base) not in owned:  # weights (and views of them) are counted as states
            saved[id(t)] = t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        if get_method(method).superposed_loss:
            net(x, y, weights={k: torch.softmax(a.to(dtype), -1) for k, a in supernet.alphas.items()})
        else:
            net(x, y, arch=space.largest())
    return sum(p.numel() for p in net.parameters()), sum(saved.values())


def _input_shape(space: SearchSpace) -> tuple[int, ...]:
    f = space.fixed
    if space.family.task == "lm":
        return (f["block_size"],)
    return (f["in_chans"], f["img_size"], f["img_size"])
