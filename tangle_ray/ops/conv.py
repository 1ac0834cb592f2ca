"""Convolutions and batch norm whose choices are slices of one weight: channel prefixes and centred kernels.

``EntangledConv2d`` is a dense or depthwise convolution of the largest shape; a choice is a prefix of its output
(and input) channels and the centred ``k x k`` window of its largest kernel. ``EntangledBatchNorm2d`` normalises a
prefix of the channels with running statistics of each width choice's own. Both superpose (``w``: one mixing
weight per choice) or run one path (the choice's real shape), as the other ops of this package do.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tangle_ray.ops.linear import prefix_indicators


def centred_indicators(kernels: Sequence[int], size: int) -> Tensor:
    """Row ``c`` is 1 on the centred ``kernels[c] x kernels[c]`` window of a ``size x size`` kernel, 0 around it."""
    rows = []
    for k in kernels:
        start = (size - k) // 2
        ind = torch.zeros(size, size)
        ind[start:start + k, start:start + k] = 1.0
        rows.append(ind)
    return torch.stack(rows)


class EntangledConv2d(nn.Conv2d):
    """``nn.Conv2d`` of the largest shape without bias, dense or depthwise (``depthwise=True``: one filter per
    channel, ``in_channels == out_channels``); choice ``c`` uses the first ``out_c`` filters over the first ``in_c``
    input channels (depthwise: the first ``out_c`` channels) and the centred ``k_c x k_c`` window of each filter,
    with 'same' padding ``k_c // 2``.

    ``combos`` lists (out_channels, in_channels, kernel_size) of every choice; for combi-superposition every pair of
    two choices, in the order in which the caller flattens their mixing weights (depthwise: ``in_channels`` is not
    read). Called with ``w`` it superposes: one convolution with ``weight * M``, ``M = sum_c w_c 1[o < out_c]
    1[i < in_c] 1[(u, v) in the centred k_c window]``, i.e. the sum of the choices' slices zero-padded back to the
    largest kernel, with that kernel's padding ``K // 2`` (for odd kernels it centres every window where the
    window's own padding does). Called with ``out`` / ``inp`` / ``kernel`` it runs one path on an input that is
    already at that path's width. Kernel sizes must be odd.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int,
                 combos: Sequence[tuple[int, int, int]], depthwise: bool = False):
        if depthwise and in_channels != out_channels:
            raise ValueError(f"a depthwise convolution maps channels to themselves, got {in_channels} -> "
                             f"{out_channels}")
        super().__init__(in_channels, out_channels, kernel_size, stride, kernel_size // 2,
                         groups=out_channels if depthwise else 1, bias=False)
        self.depthwise = depthwise
        self.combos = [(int(o), out_channels if depthwise else int(i), int(k)) for o, i, k in combos]
        if any(k % 2 == 0 or k > kernel_size for _, _, k in self.combos):
            raise ValueError(f"kernel sizes must be odd and at most {kernel_size}, got {self.combos}")
        in_width = 1 if depthwise else in_channels
        self.register_buffer("out_ind", prefix_indicators([o for o, _, _ in self.combos], out_channels), False)
        self.register_buffer("in_ind", prefix_indicators(
            [1 if depthwise else i for _, i, _ in self.combos], in_width), False)
        self.register_buffer("kernel_ind", centred_indicators([k for _, _, k in self.combos], kernel_size), False)
        # every choice with the whole kernel and all input channels (or all filters): the mask is one factor per
        # output (or input) channel, applied to the smaller activations instead of the weight
        self.all_kernels = all(k == kernel_size for _, _, k in self.combos)
        self.all_cols = depthwise or all(i == in_channels for _, i, _ in self.combos)
        self.all_rows = not depthwise and all(o == out_channels for o, _, _ in self.combos)

    def forward(self, x: Tensor, w: Tensor | None = None, *, out: int | None = None, inp: int | None = None,
                kernel: int | None = None) -> Tensor:
        if w is not None:
            return self._superpose(x, w)
        weight = self.sliced(out, inp, kernel)
        k = weight.size(-1)
        return F.conv2d(x, weight, None, self.stride, k // 2, groups=weight.size(0) if self.depthwise else 1)

    def _superpose(self, x: Tensor, w: Tensor) -> Tensor:
        w = w.to(self.weight.dtype)
        if self.all_kernels and self.all_cols:  # scale the output channels
            y = F.conv2d(x, self.weight, None, self.stride, self.padding, groups=self.groups)
            return y * (w @ self.out_ind.to(w.dtype))[:, None, None]
        if self.all_kernels and self.all_rows:  # scale the input channels
            return F.conv2d(x * (w @ self.in_ind.to(w.dtype))[:, None, None], self.weight, None, self.stride,
                            self.padding)
        mask = torch.einsum("c,co,ci,cuv->oiuv", w, self.out_ind.to(w.dtype), self.in_ind.to(w.dtype),
                            self.kernel_ind.to(w.dtype))
        return F.conv2d(x, self.weight * mask, None, self.stride, self.padding, groups=self.groups)

    def sliced(self, out: int | None = None, inp: int | None = None, kernel: int | None = None) -> Tensor:
        """The weight of one path: the first ``out`` filters over the first ``inp`` input channels (depthwise: the
        first ``out`` filters), their centred ``kernel x kernel`` window; ``None``: all of them."""
        K = self.kernel_size[0]
        k = K if kernel is None else kernel
        start = (K - k) // 2
        weight = self.weight if out is None else self.weight[:out]
        if not self.depthwise and inp is not None:
            weight = weight[:, :inp]
        return weight[..., start:start + k, start:start + k]


class EntangledBatchNorm2d(nn.Module):
    """Batch norm of the largest width; choice ``c`` normalises and scales the first ``widths[c]`` channels and keeps
    running statistics of its own (rows ``c`` of ``running_mean`` / ``running_var`` [choices, width], entries past
    ``widths[c]`` unused), so that a subnet's statistics are those gathered while its width was chosen.

    Superposition is ``sum_c w_c pad(BN_c(x[:, :widths[c]]))``. In training the batch statistics of a channel are
    the same for every width, so that is one batch norm with scale and shift times ``m = sum_c w_c 1[j < widths[c]]``;
    the running statistics of every choice with a non-zero weight move towards them (a one-hot mix moves exactly the
    chosen width's, as its single path does). In evaluation each width normalises by its own running statistics
    and the normalised outputs are mixed. A single path (``width=``) is ``F.batch_norm`` of the width's slice;
    ``track=False`` normalises by the running statistics and updates nothing (the zero-valued passes that keep a
    single path's unused layers in the graph).
    """

    def __init__(self, widths: Sequence[int], eps: float = 1e-5, momentum: float = 0.1):
        super().__init__()
        self.widths = [int(e) for e in widths]
        if len(set(self.widths)) != len(self.widths):
            raise ValueError(f"widths must be distinct, got {self.widths}")
        D, n = max(self.widths), len(self.widths)
        self.eps, self.momentum = eps, momentum
        self.weight = nn.Parameter(torch.ones(D))
        self.bias = nn.Parameter(torch.zeros(D))
        self.register_buffer("running_mean", torch.zeros(n, D))
        self.register_buffer("running_var", torch.ones(n, D))
        self.register_buffer("num_batches_tracked", torch.zeros(n, dtype=torch.long))
        self.register_buffer("ind", prefix_indicators(self.widths, D), False)

    def forward(self, x: Tensor, w: Tensor | None = None, *, width: int | None = None, track: bool = True) -> Tensor:
        if w is None:
            return self._path(x, max(self.widths) if width is None else width, track)
        return self._superpose(x, w)

    def _path(self, x: Tensor, width: int, track: bool) -> Tensor:
        c = self.widths.index(width)
        mean, var = self.running_mean[c, :width], self.running_var[c, :width]
        weight, bias = self.weight[:width], self.bias[:width]
        if not (self.training and track):
            return F.batch_norm(x, mean, var, weight, bias, False, 0.0, self.eps)
        self.num_batches_tracked[c] += 1
        return F.batch_norm(x, mean, var, weight, bias, True, self.momentum, self.eps)  # updates row c in place

    def _superpose(self, x: Tensor, w: Tensor) -> Tensor:
        w, ind = w.to(x.dtype), self.ind.to(x.dtype)
        keep = w @ ind  # sum_c w_c 1[j < widths[c]]
        if self.training:
            # momentum 1: the temporary buffers receive the batch mean and the unbiased batch variance
            mean = torch.zeros_like(self.running_mean[0])
            var = torch.ones_like(self.running_var[0])
            y = F.batch_norm(x, mean, var, self.weight * keep, self.bias * keep, True, 1.0, self.eps)
            with torch.no_grad():
                chosen = (w != 0).to(ind.dtype)
                rate = (self.momentum * chosen)[:, None] * ind
                self.running_mean.add_(rate.to(mean.dtype) * (mean - self.running_mean))
                self.running_var.add_(rate.to(var.dtype) * (var - self.running_var))
                self.num_batches_tracked.add_(chosen.long())
            return y
        wi = w[:, None] * ind  # [choices, D]
        rstd = torch.rsqrt(self.running_var.to(x.dtype) + self.eps)
        scale = (wi * rstd).sum(0)  # sum_c w_c rstd_c 1[j < widths[c]]
        shift = (wi * self.running_mean.to(x.dtype) * rstd).sum(0)
        return (x * scale[:, None, None] - shift[:, None, None]) * self.weight[:, None, None] \
            + (self.bias * keep)[:, None, None]

    def sliced_state(self, width: int | None = None) -> dict[str, Tensor]:
        """The state of one width as an ``nn.BatchNorm2d(width)`` holds it."""
        width = max(self.widths) if width is None else width
        c = self.widths.index(width)
        return {"weight": self.weight[:width], "bias": self.bias[:width], "running_mean": self.running_mean[c, :width],
                "running_var": self.running_var[c, :width], "num_batches_tracked": self.num_batches_tracked[c]}
