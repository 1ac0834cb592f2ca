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


def prefix_sums(t: Tensor, widths: list[int]) -> Tensor:
    """Sums of ``t`` over each width's prefix of its last dimension, [..., len(widths)] in the order of
    ``widths``: one pass, over the segments between the sorted widths, then added up."""
    order = sorted(range(len(widths)), key=widths.__getitem__)
    bounds = [0, *(widths[i] for i in order)]
    sums = torch.stack([t[..., a:b].sum(-1) for a, b in zip(bounds, bounds[1:])], -1).cumsum(-1)
    return sums[..., [order.index(i) for i in range(len(widths))]]


def width_statistics(x: Tensor, widths: list[int], eps: float) -> tuple[Tensor, Tensor]:
    """Each width's mean and reciprocal standard deviation over its prefix of the features: [..., widths] each.

    From the prefix sums of ``d = x - c`` and ``d**2``, where ``c`` is the smallest prefix's mean (near every
    prefix's mean, so that ``E[d**2] - E[d]**2`` does not cancel). ``torch.var_mean`` per prefix gives the same
    to float32 round-off at 10x the CPU time (it is not vectorised over a sliced last dimension).
    """
    c = x[..., :min(widths)].mean(-1, keepdim=True)
    d = x - c
    n = x.new_tensor(widths)
    d_mean = prefix_sums(d, widths) / n
    var = (prefix_sums(d.square(), widths) / n - d_mean.square()).clamp_min(0)
    return c + d_mean, torch.rsqrt(var + eps)


class SuperposedLayerNorm(torch.autograd.Function):
    """sum_e w_e pad(LN_e(x[:e])) with one scale and shift per feature: ``(x * scale - shift) * weight (+ bias *
    sum_e w_e 1[j < e])``, where scale and shift superpose each width's statistics.

    Keeps ``x`` and each width's mean and reciprocal deviation for backward, and computes the gradients there:
    of ``x`` each prefix's layer-norm gradient, weighted by ``w_e`` and summed, as three per-feature
    coefficients (sums over the widths that cover a feature, ``[rows, widths] @ ind``) from per-width prefix
    sums of the output gradient; of the scale, shift and mixing weights their sums. Autograd through the
    expression would keep ``x * scale``, the shift and the scale as well (three more [..., D] tensors per
    layer); recomputing it in backward costs a second forward.
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
        widths, shape, D = ctx.widths, x.shape, x.shape[-1]
        x, grad = x.reshape(-1, D), grad.reshape(-1, D)
        mean, rstd = mean.reshape(-1, len(widths)), rstd.reshape(-1, len(widths))
        c = mean[:, [widths.index(min(widths))]]  # centred, as in the forward statistics
        d, m = x - c, mean - c
        g = grad * weight  # of the normalised features, before each width's w_e
        # per row and width e: the prefix sums of g, and A_e = sum_{j<e} g_j x_hat_ej
        g_sum = prefix_sums(g, widths)
        a = rstd * (prefix_sums(g * d, widths) - m * g_sum)
        scale = (w * rstd) @ ind
        grad_x = None
        if ctx.needs_input_grad[0]:  # sum_e w_e r_e (g - g_sum_e / e - x_hat_e A_e / e) over the widths e > j
            k = w * rstd / x.new_tensor(widths)
            grad_x = (g * scale - d * ((k * rstd * a) @ ind) + (k * (rstd * a * m - g_sum)) @ ind).view(shape)
        grad_w, grad_bias = a.sum(0), None
        if bias is not None:  # each feature's output gradient summed over the rows, for the bias terms
            grad_sum = grad.sum(0)
            grad_w = grad_w + prefix_sums(grad_sum * bias, widths)
            grad_bias = grad_sum * (w @ ind) if ctx.needs_input_grad[4] else None
        grad_weight = None
        if ctx.needs_input_grad[3]:  # the normalised features, superposed: x * scale - shift
            grad_weight = (grad * (d * scale - (w * rstd * m) @ ind)).sum(0)
        return grad_x, grad_w, None, grad_weight, grad_bias, None, None
