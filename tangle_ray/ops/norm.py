"""Layer norm over a prefix of the features, superposed over the width choices."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tangle_ray.ops.linear import prefix_indicators


class EntangledLayerNorm(nn.Module):
    """LayerNorm of the largest width; choice ``e`` normalises and scales the first ``e`` features.

    The superposition is sum_e w_e pad(LN_e(x[:e])): each width keeps its own statistics, so a one-hot
    mix equals the sliced layer exactly (normalising over the padded width would not).
    ``reference=True`` (superposition only) is TangleNAS's MixedLayerNormV2 instead: one layer norm over
    the whole padded width with the superposed scale and shift, sum_e w_e pad(gamma[:e]) and likewise beta.
    The superposition keeps its input and each width's mean and reciprocal deviation for the backward pass
    (``SuperposedLayerNorm``: what a fused layer norm keeps), so it costs the fixed layer's activation memory.
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
        return SuperposedLayerNorm.apply(x, w.to(x.dtype), self.ind.to(x.dtype), self.weight, self.bias,
                                         self.widths, self.eps)


def width_statistics(x: Tensor, widths: list[int], eps: float) -> tuple[Tensor, Tensor]:
    """Each width's mean and reciprocal standard deviation over its prefix of the features: [..., widths] each."""
    var_mean = [torch.var_mean(x[..., :e], -1, unbiased=False) for e in widths]
    var = torch.stack([v for v, _ in var_mean], -1)
    mean = torch.stack([m for _, m in var_mean], -1)
    return mean, torch.rsqrt(var + eps)


class SuperposedLayerNorm(torch.autograd.Function):
    """sum_e w_e pad(LN_e(x[:e])) with one scale and shift per feature: ``(x * scale - shift) * weight (+ bias *
    sum_e w_e 1[j < e])``, where scale and shift superpose each width's statistics.

    Keeps ``x`` and each width's mean and reciprocal deviation for backward, and computes the gradients there
    width by width: of ``x`` the layer-norm gradient of each prefix, weighted by ``w_e``; of the scale, shift
    and mixing weights their sums. Autograd through the expression would keep ``x * scale``, the shift and the
    scale as well (three more [..., D] tensors per layer); recomputing it in backward costs a second forward.
    """

    @staticmethod
    def forward(ctx, x: Tensor, w: Tensor, ind: Tensor, weight: Tensor, bias: Tensor | None, widths: list[int],
                eps: float) -> Tensor:
        mean, rstd = width_statistics(x, widths, eps)
        scale = (w * rstd) @ ind  # sum_e w_e rstd_e 1[j < e]
        shift = (w * mean * rstd) @ ind
        y = (x * scale - shift) * weight
        y = y if bias is None else y + bias * (w @ ind)
        ctx.save_for_backward(x, w, ind, weight, bias, mean, rstd)
        ctx.widths = widths
        return y

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, w, ind, weight, bias, mean, rstd = ctx.saved_tensors
        shape, D = x.shape, x.shape[-1]
        x, grad = x.reshape(-1, D), grad.reshape(-1, D)
        mean, rstd = mean.reshape(-1, len(ctx.widths)), rstd.reshape(-1, len(ctx.widths))
        grad_scaled = grad * weight  # of the normalised features, before each width's w_e
        grad_sum = None if bias is None else grad.sum(0)  # each feature's, over the rows: for the bias terms
        grad_x = torch.zeros_like(x) if ctx.needs_input_grad[0] else None
        grad_weight = torch.zeros_like(weight) if ctx.needs_input_grad[3] else None
        grad_w = torch.empty_like(w)
        for i, e in enumerate(ctx.widths):
            r = rstd[:, i:i + 1]
            x_hat = (x[:, :e] - mean[:, i:i + 1]) * r
            g = grad_scaled[:, :e]
            g_x_hat = (g * x_hat).sum(-1, keepdim=True)
            grad_w[i] = g_x_hat.sum() if bias is None else g_x_hat.sum() + grad_sum[:e] @ bias[:e]
            if grad_x is not None:  # the layer-norm gradient of the prefix
                grad_x[:, :e] += (w[i] * r) * (g - g.sum(-1, keepdim=True) / e - x_hat * (g_x_hat / e))
            if grad_weight is not None:
                grad_weight[:e] += w[i] * (grad[:, :e] * x_hat).sum(0)
        grad_bias = None if bias is None or not ctx.needs_input_grad[4] else grad_sum * (w @ ind)
        grad_x = None if grad_x is None else grad_x.view(shape)
        return grad_x, grad_w, None, grad_weight, grad_bias, None, None
