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

    def mask(self, w: Tensor) -> Tensor:
        """sum_c w_c 1[i < out_c] 1[j < in_c]: the weight superposition as a mask on ``weight``."""
        ind_in = self.in_ind.to(w.dtype)
        return self.out_ind.to(w.dtype).t() @ (w[:, None] * ind_in)

    def _superpose(self, x: Tensor, w: Tensor) -> Tensor:
        w = w.to(self.weight.dtype)
        activations_smaller = x.numel() < self.weight.numel()
        if self.all_rows and activations_smaller:
            return F.linear(x * (w @ self.in_ind.to(w.dtype)), self.weight, self.bias)
        out_mask = w @ self.out_ind.to(w.dtype)
        if self.all_cols and activations_smaller:
            return F.linear(x, self.weight, self.bias) * out_mask
        bias = None if self.bias is None else self.bias * out_mask
        return F.linear(x, self.weight * self.mask(w), bias)

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
