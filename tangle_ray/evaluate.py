"""The search objective: mean next-token cross-entropy of one architecture on fixed windows of a split.

The mean is the exactly rounded sum (``math.fsum``) of per-token losses divided by their count, so it
does not depend on the batch size's summation order, only on the logits.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tangle_ray.supernet import load_supernet
from tangle_ray.data.prepare import load_split
from tangle_ray.data.sampler import eval_windows
from tangle_ray.errors import ConfigError
from tangle_ray.models.gpt import GPT
from tangle_ray.space import Arch, read_arch

DEFAULT_BATCH_SIZE = 16


def evaluate_arch(
    model: nn.Module, arch: Arch, x: Tensor, y: Tensor, batch_size: int = DEFAULT_BATCH_SIZE
) -> float:
    """Mean cross-entropy of the single path ``arch`` on inherited weights (a ``Supernet`` or its ``net``)."""
    return _mean_loss(model, lambda xb: model(xb, None, arch=arch)[0], x, y, batch_size)


def evaluate_model(model: nn.Module, x: Tensor, y: Tensor, batch_size: int = DEFAULT_BATCH_SIZE) -> float:
    """Mean cross-entropy of a standalone model (e.g. an extracted ``GPT``), computed as ``evaluate_arch``."""
    return _mean_loss(model, lambda xb: model(xb)[0], x, y, batch_size)


def _mean_loss(
    model: nn.Module, logits_of: Callable[[Tensor], Tensor], x: Tensor, y: Tensor, batch_size: int
) -> float:
    if x.shape != y.shape or x.ndim != 2 or len(x) == 0:
        raise ValueError(
            f"expected equal non-empty [n, T] inputs and targets, got {tuple(x.shape)}, {tuple(y.shape)}"
        )
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    losses: list[float] = []
    try:
        with torch.inference_mode():
            for start in range(0, len(x), batch_size):
                xb, yb = x[start : start + batch_size].to(device), y[start : start + batch_size].to(device)
                logits = logits_of(xb)
                nll = F.cross_entropy(
                    logits.reshape(-1, logits.size(-1)).float(), yb.reshape(-1), reduction="none"
                )
                losses.extend(nll.double().cpu().tolist())
    finally:
        model.train(was_training)
    return math.fsum(losses) / len(losses)


def eval_data(
    data_dir: str | Path, split: str, block_size: int, vocab_size: int, num_windows: int, seed: int
) -> tuple[Tensor, Tensor]:
    """The fixed windows (x, y) of a prepared split, checked to hold only token ids below ``vocab_size``."""
    x, y = eval_windows(load_split(data_dir, split), block_size, num_windows, seed)
    top = int(max(x.max(), y.max()))
    if top >= vocab_size:
        raise ConfigError(
            f"data {data_dir}: split {split!r} holds token id {top}, outside the model's vocabulary "
            f"of {vocab_size}: was it prepared with another tokenizer?"
        )
    return x, y


def evaluate_on_split(
    data_dir: str | Path,
    split: str = "test",
    supernet: str | Path | None = None,
    arch: Arch | str | Path | None = None,
    model: str | Path | None = None,
    num_windows: int = 256,
    seed: int = 0,
    batch_size: int = DEFAULT_BATCH_SIZE,
) -> dict:
    """Loss and perplexity on ``num_windows`` fixed windows of ``split``: ``arch`` (a dict or an arch.json;
    default the supernet's argmax) with a supernet folder's inherited weights, or an exported ``model``."""
    if (supernet is None) == (model is None):
        raise ConfigError(
            "evaluate: give a supernet folder (optionally with an architecture) or a model folder"
        )
    if model is not None:
        if arch is not None:
            raise ConfigError(
                "evaluate: an architecture goes with a supernet folder; a model folder holds its own"
            )
        net = GPT.from_pretrained(model)
        arch = json.loads((Path(model) / "config.json").read_text()).get("arch")
        c = net.config
        x, y = eval_data(data_dir, split, c.block_size, c.vocab_size, num_windows, seed)
        loss, params = evaluate_model(net, x, y, batch_size), net.num_parameters()
    else:
        sn = load_supernet(supernet)
        source = str(arch) if isinstance(arch, (str, Path)) else "architecture"
        if isinstance(arch, (str, Path)):
            arch = read_arch(arch)
        arch = sn.space.validate(sn.argmax_arch() if arch is None else arch, source)
        f = sn.space.fixed
        x, y = eval_data(data_dir, split, f["block_size"], f["vocab_size"], num_windows, seed)
        loss, params = evaluate_arch(sn, arch, x, y, batch_size), sn.space.param_count(arch)
    return {
        "split": split,
        "windows": len(x),
        "tokens": x.numel(),
        "loss": loss,
        "perplexity": math.exp(loss),
        "params": params,
        "arch": arch,
    }

