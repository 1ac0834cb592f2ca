"""Layer norm over a prefix of the features, superposed over the width choices."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tangle_ray.ops.linear import prefix_indicators


class EntangledLayerNorm(nn.Module):
    """LayerNorm of the largest width; choice ``e`` normalises and scales the first ``e`` features.

    The superposition is sum_e w_e pad(LN_e(x[:e])): each width keeps its own statistics, so a one-hot
    mix equals the sliced layer exactly (normalising over the padded width would not).
    """

    def __init__(self, width: int, widths: list[int], bias: bool, eps: float = 1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(width))
        self.bias = nn.Parameter(torch.zeros(width)) if bias else None
        self.widths = [int(e) for e in widths]
        self.eps = eps
        self.register_buffer("ind", prefix_indicators(self.widths, width), False)
        # statistics of every width from one pass: sums over chunks of gcd(widths) features, then prefix sums
        self.chunk = math.gcd(*self.widths, width)
        self.register_buffer("chunk_ends", torch.tensor([e // self.chunk - 1 for e in self.widths]), False)

    def forward(self, x: Tensor, w: Tensor | None = None, *, width: int | None = None) -> Tensor:
        if w is None:
            bias = None if self.bias is None else self.bias[:width]
            return F.layer_norm(x, (width,), self.weight[:width], bias, self.eps)
        acc = torch.promote_types(x.dtype, torch.float32)  # bf16 inputs: statistics in fp32
        chunks = x.unflatten(-1, (-1, self.chunk))
        n = torch.tensor(self.widths, dtype=acc, device=x.device)
        sums = chunks.sum(-1, dtype=acc).cumsum(-1).index_select(-1, self.chunk_ends)
        squares = chunks.to(acc).square().sum(-1).cumsum(-1).index_select(-1, self.chunk_ends)
        mean = sums / n
        rstd = torch.rsqrt((squares / n - mean.square()).clamp_min(0.0) + self.eps)
        mean, rstd = mean.to(x.dtype), rstd.to(x.dtype)
        ind, w = self.ind.to(x.dtype), w.to(x.dtype)
        scale = (w * rstd) @ ind  # sum_e w_e rstd_e 1[j < e]
        shift = (w * mean * rstd) @ ind
        y = (x * scale - shift) * self.weight
        return y if self.bias is None else y + self.bias * (w @ ind)
