"""Depth, written once for every family: superposed over the depth choices, or one path of a given depth.

Superposition runs every layer once and sums the outputs after each candidate depth, weighted by the depth's
mixing weight. A single path runs the first ``depth`` layers; with ``keep_all_params`` the unused layers also
run on one detached token, times zero, so that every parameter is in every step's graph (ZeRO reduces the
same gradients on every step, and DeepSpeed expects each parameter to receive one).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

Layer = Callable[[Tensor], Tensor]


def superpose_depth(x: Tensor, layers: Sequence[Layer], depths: Sequence[int], w_depth: Tensor) -> Tensor:
    """sum_d w_d * (x after the first d layers), for the candidate depths ``depths`` (ascending)."""
    out = x
    for i, layer in enumerate(layers):
        x = layer(x)
        if i + 1 in depths:
            w = w_depth[depths.index(i + 1)].to(x.dtype)
            out = w * x if i + 1 == depths[0] else torch.addcmul(out, w, x)
    return out


def first_token(x: Tensor) -> Tensor:
    return x[:, :1]


def path_depth(x: Tensor, layers: Sequence[Layer], depth: int, keep_all_params: bool,
               probe: Callable[[Tensor], Tensor] = first_token) -> tuple[Tensor, Tensor | float]:
    """``x`` after the first ``depth`` layers, and a zero that touches the other layers' parameters (or 0.0): they
    run on ``probe(x)`` (one token; a convolutional family passes one pixel of one image)."""
    zero: Tensor | float = 0.0
    for i, layer in enumerate(layers):
        if i < depth:
            x = layer(x)
        elif keep_all_params:
            zero = zero + 0.0 * layer(probe(x).detach()).sum()
    return x, zero
