"""The DeepSpeed config, the weight optimizer and its learning-rate schedule, built from a ``TrainConfig``."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from tangle_ray.train.config import TrainConfig


def resolve_precision(cfg: TrainConfig) -> str:
    """``auto`` is bf16 on GPUs and fp32 on CPUs (gloo has no bf16 all-reduce worth using)."""
    if cfg.precision != "auto":
        return cfg.precision
    return "bf16" if cfg.scaling.use_gpu else "fp32"


def deepspeed_config(cfg: TrainConfig) -> dict[str, Any]:
    precision = resolve_precision(cfg)
    config: dict[str, Any] = {
        "train_batch_size": cfg.global_batch_size,
        "train_micro_batch_size_per_gpu": cfg.micro_batch_size,
        "gradient_accumulation_steps": cfg.grad_accum_steps,
        "gradient_clipping": cfg.optimizer.grad_clip,
        "zero_optimization": {"stage": cfg.zero_stage},
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": precision == "fp16"},
        "zero_allow_untested_optimizer": True,  # torch AdamW: no JIT-built op, bit-exact reloads
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    return _merge(config, cfg.deepspeed)


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


Exempt = Callable[[str, nn.Parameter, nn.Module], bool]  # (name, parameter, owning module) -> no decay


def param_groups(module: nn.Module, weight_decay: float, exempt: Exempt) -> list[dict[str, Any]]:
    """AdamW groups of ``module``'s trainable parameters: decayed unless ``exempt(name, param, owner)``.

    Each parameter counts once, for its first owner in ``named_modules`` order (a tied weight belongs to the
    module registered first: the token embedding, not the LM head). Empty groups are left out.
    """
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    seen: set[int] = set()
    for module_name, owner in module.named_modules():
        for short, p in owner.named_parameters(recurse=False):
            if id(p) in seen or not p.requires_grad:
                continue
            seen.add(id(p))
            name = f"{module_name}.{short}" if module_name else short
            (no_decay if exempt(name, p, owner) else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def weight_optimizer(module: nn.Module, cfg: TrainConfig, exempt: Exempt) -> torch.optim.Optimizer:
    """AdamW over ``param_groups(module, weight_decay, exempt)``; ``exempt``: ``family.no_weight_decay``. On a
    GPU its fused kernel (one launch for every tensor); on CPUs the default, whose numbers the recorded runs hold."""
    o = cfg.optimizer
    fused = next(module.parameters()).is_cuda or None
    return torch.optim.AdamW(param_groups(module, o.weight_decay, exempt), lr=o.lr, betas=o.betas, fused=fused)


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Linear warmup, then cosine decay from ``lr`` to ``min_lr`` at the last step (as a factor of ``lr``)."""
    o = cfg.optimizer
    if step < o.warmup_steps:
        return (step + 1) / o.warmup_steps
    span = max(1, cfg.steps - o.warmup_steps)
    progress = min(1.0, (step - o.warmup_steps) / span)
    lr = o.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (o.lr - o.min_lr)
    return lr / o.lr
