"""The DeepSpeed config, the weight optimizer and its learning-rate schedule, built from a ``TrainConfig``."""

from __future__ import annotations

import math
from typing import Any

import torch

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


def weight_optimizer(params: list[torch.nn.Parameter], cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW with weight decay on matrices only (nanoGPT's grouping)."""
    o = cfg.optimizer
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": o.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=o.lr, betas=o.betas)


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Linear warmup, then cosine decay from ``lr`` to ``min_lr`` at the last step (as a factor of ``lr``)."""
    o = cfg.optimizer
    if step < o.warmup_steps:
        return (step + 1) / o.warmup_steps
    span = max(1, cfg.steps - o.warmup_steps)
    progress = min(1.0, (step - o.warmup_steps) / span)
    lr = o.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (o.lr - o.min_lr)
    return lr / o.lr
