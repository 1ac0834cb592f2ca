"""A linear layer whose choices are slices of one weight matrix."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

Selection = Union[int, Tensor]  # a prefix length, or a tensor of indices


def prefix_indicators(lengths: Sequence[int], size: int) -> Tensor:
    """Row ``c`` is 1 on the first ``lengths[c]`` of ``size`` positions and 0 after."""
    return (torch.arange(size)[None, :] < torch.tensor(list(lengths))[:, None]).float()


def select(t: Tensor, dim: int, sel: Selection) -> Tensor:
    return t.narrow(dim, 0, sel) if isinstance(sel, int) else t.index_select(dim, sel)


class MaskedLinear(torch.autograd.Function):
    """``F.linear(x, weight * M, bias * m)`` with the superposition mask ``M = out_ind^T diag(w) in_ind`` and its
    row sums ``m = w @ out_ind``, keeping neither ``M`` nor the masked weight for the backward pass: both are
    rebuilt there from ``weight`` and the mixing weights ``w`` (a k x out x in product), so the step holds the
    layer's input and weight as a plain linear layer does instead of two more weight-sized tensors."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None, w: Tensor, out_ind: Tensor,
                in_ind: Tensor) -> Tensor:
        ctx.save_for_backward(x, weight, bias, w, out_ind, in_ind)
        y = F.linear(x, weight * _mask(w, out_ind, in_ind))
        return y if bias is None else y + bias * (w @ out_ind)

    @staticmethod
    def backward(ctx, grad_y: Tensor):
        x, weight, bias, w, out_ind, in_ind = ctx.saved_tensors
        mask = _mask(w, out_ind, in_ind)
        grad_x = grad_weight = grad_bias = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_x = grad_y @ (weight * mask)
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[3]:
            grad_masked = grad_y.reshape(-1, grad_y.size(-1)).t() @ x.reshape(-1, x.size(-1))  # d loss / d (W * M)
            if ctx.needs_input_grad[3]:  # d loss / d w_c: the sum of (grad * W) over choice c's block
                grad_w = ((out_ind @ (grad_masked * weight)) * in_ind).sum(-1)
            if ctx.needs_input_grad[1]:
                grad_weight = grad_masked.mul_(mask)
        if bias is not None:
            grad_rows = grad_y.reshape(-1, grad_y.size(-1)).sum(0)
            if ctx.needs_input_grad[2]:
                grad_bias = grad_rows * (w @ out_ind)
            if ctx.needs_input_grad[3]:
                grad_w = out_ind @ (grad_rows * bias) + (0 if grad_w is None else grad_w)
        return grad_x, grad_weight, grad_bias, grad_w, None, None


def _mask(w: Tensor, out_ind: Tensor, in_ind: Tensor) -> Tensor:
    """sum_c w_c 1[i < out_c] 1[j < in_c]."""
    return out_ind.t() @ (w[:, None] * in_ind)


class EntangledLinear(nn.Linear):
    """``nn.Linear`` of the largest shape; choice ``c`` uses ``weight[:out_c, :in_c]``.

    ``combos`` lists the (out_features, in_features) of every choice; for combi-superposition, every
    pair of two choices, in the order in which the caller flattens their mixing weights.
    Called with ``w`` (one mixing weight per combo) it superposes; with ``out``/``inp`` it runs one path
    on an input that is already at that path's width.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool, combos: Sequence[tuple[int, int]]):
        super().__init__(in_features, out_features, bias=bias)
        self.combos = [(int(o), int(i)) for o, i in combos]
        self.register_buffer("out_ind", prefix_indicators([o for o, _ in self.combos], out_features), False)
        self.register_buffer("in_ind", prefix_indicators([i for _, i in self.combos], in_features), False)
        # when every choice keeps all rows (or all columns) the mask is rank one: it can scale the input
        # (or the output) instead of the weight, whichever tensor is smaller
        self.all_rows = all(o == out_features for o, _ in self.combos)
        self.all_cols = all(i == in_features for _, i in self.combos)

    def forward(
        self,
        x: Tensor,
        w: Tensor | None = None,
        *,
        out: Selection | None = None,
        inp: Selection | None = None,
        output_mix: bool = False,
    ) -> Tensor:
        if w is None:
            return F.linear(x, *self.sliced(out, inp))
        return self._output_mix(x, w) if output_mix else self._superpose(x, w)

    def _superpose(self, x: Tensor, w: Tensor) -> Tensor:
        w = w.to(self.weight.dtype)
        activations_smaller = x.numel() < self.weight.numel()
        if self.all_rows and activations_smaller:
            return F.linear(x * (w @ self.in_ind.to(w.dtype)), self.weight, self.bias)
        out_ind, in_ind = self.out_ind.to(w.dtype), self.in_ind.to(w.dtype)
        if self.all_cols and activations_smaller:
            return F.linear(x, self.weight, self.bias) * (w @ out_ind)
        return MaskedLinear.apply(x, self.weight, self.bias, w, out_ind, in_ind)

    def _output_mix(self, x: Tensor, w: Tensor) -> Tensor:
        """Weight-sharing baseline: one matmul per choice on its own slice, outputs padded and mixed."""
        y = x.new_zeros(*x.shape[:-1], self.out_features)
        for wc, (o, i) in zip(w, self.combos):
            y = y + wc * F.pad(F.linear(x[..., :i], *self.sliced(o, i)), (0, self.out_features - o))
        return y

    def sliced(self, out: Selection, inp: Selection) -> tuple[Tensor, Tensor | None]:
        """The weight and bias of one path: rows ``out`` and columns ``inp`` (prefix lengths or indices)."""
        weight = select(select(self.weight, 0, out), 1, inp)
        return weight, None if self.bias is None else select(self.bias, 0, out)
