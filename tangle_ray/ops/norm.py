"""Layer norm over a prefix of the features, superposed over the width choices."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from tangle_ray.ops.linear import prefix_indicators


class EntangledLayerNorm(nn.Module):
    """LayerNorm of the largest width; choice ``e`` normalises and scales the first ``e`` features.

    The superposition is sum_e w_e pad(LN_e(x[:e])): each width keeps its own statistics, so a one-hot
    mix equals the sliced layer exactly (normalising over the padded width would not).
    ``reference=True`` (superposition only) is TangleNAS's MixedLayerNormV2 instead: one layer norm over
    the whole padded width with the superposed scale and shift, sum_e w_e pad(gamma[:e]) and likewise beta.
    The superposition keeps only its inputs for the backward pass and recomputes the per-width statistics
    there (a fused layer norm keeps no more), so it costs the fixed layer's activation memory.
    """

    def __init__(self, width: int, widths: list[int], bias: bool, eps: float = 1e-5, reference: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(width))
        self.bias = nn.Parameter(torch.zeros(width)) if bias else None
        self.widths = [int(e) for e in widths]
        self.eps = eps
        self.reference = reference
        self.register_buffer("ind", prefix_indicators(self.widths, width), False)

    def forward(self, x: Tensor, w: Tensor | None = None, *, width: int | None = None) -> Tensor:
        if w is None:
            bias = None if self.bias is None else self.bias[:width]
            return F.layer_norm(x, (width,), self.weight[:width], bias, self.eps)
        if self.reference:
            mask = w.to(x.dtype) @ self.ind.to(x.dtype)  # sum_e w_e 1[j < e]
            bias = None if self.bias is None else self.bias * mask
            return F.layer_norm(x, self.weight.shape, self.weight * mask, bias, self.eps)
        args = (x, w.to(x.dtype), self.ind.to(x.dtype), self.weight, self.bias, self.widths, self.eps)
        if torch.is_grad_enabled():  # keep only the inputs for backward and recompute the rest there
            return checkpoint(_superposed_layer_norm, *args, use_reentrant=False)
        return _superposed_layer_norm(*args)


def _superposed_layer_norm(x: Tensor, w: Tensor, ind: Tensor, weight: Tensor, bias: Tensor | None,
                           widths: list[int], eps: float) -> Tensor:
    """sum_e w_e pad(LN_e(x[:e])): every width's statistics, one scale and shift per feature."""
    var_mean = [torch.var_mean(x[..., :e], -1, unbiased=False) for e in widths]
    var = torch.stack([v for v, _ in var_mean], -1)
    mean = torch.stack([m for _, m in var_mean], -1)
    rstd = torch.rsqrt(var + eps)
    scale = (w * rstd) @ ind  # sum_e w_e rstd_e 1[j < e]
    shift = (w * mean * rstd) @ ind
    y = (x * scale - shift) * weight
    return y if bias is None else y + bias * (w @ ind)
