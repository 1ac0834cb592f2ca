"""Causal self-attention with entangled embedding width and head count.

Head layout: for ``h`` heads the largest width ``D`` is cut into ``h`` blocks of ``D/h`` rows, and a
width ``e`` uses the first ``e/h`` rows of every block (``head_layout``). For a fixed head count,
every width is then a prefix of every head, so the q/k/v projection is computed once for all widths;
each width's 1/sqrt(head dim) and its mixing weight are folded into q alone (k and v stay unmasked:
the zeros in q and the column mask of the output projection remove what a width does not own).
Softmax is not linear, so the head counts each run their attention (same FLOPs as one attention of
width D) and are mixed after it. The extracted model holds the same numbers in compact order.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tangle_ray.ops.linear import EntangledLinear


def head_layout(max_width: int, n_head: int, width: int, device=None) -> Tensor:
    """Indices, among ``max_width`` features, of the features of width ``width`` split into ``n_head`` heads."""
    block, head_dim = max_width // n_head, width // n_head
    starts = torch.arange(n_head, device=device)[:, None] * block
    return (starts + torch.arange(head_dim, device=device)[None, :]).flatten()


class EntangledAttention(nn.Module):
    def __init__(self, widths: list[int], heads: list[int], bias: bool, dropout: float):
        super().__init__()
        self.widths, self.heads = [int(e) for e in widths], [int(h) for h in heads]
        self.width = D = max(self.widths)
        self.dropout = dropout
        self.c_attn = EntangledLinear(D, 3 * D, bias, [(3 * D, e) for e in self.widths])
        self.c_proj = EntangledLinear(D, D, bias, [(e, D) for e in self.widths])
        # head_ind[h, e, j] = 1 if feature j belongs to width e under the layout of head count h
        pos = torch.arange(D)
        ind = [(pos[None, :] % (D // h) < torch.tensor([e // h for e in self.widths])[:, None]).float()
               for h in self.heads]
        self.register_buffer("head_ind", torch.stack(ind), False)
        inv_sqrt = [[1.0 / math.sqrt(e // h) for e in self.widths] for h in self.heads]
        self.register_buffer("inv_sqrt_head_dim", torch.tensor(inv_sqrt), False)

    def forward(
        self,
        x: Tensor,
        w_embd: Tensor | None = None,
        w_head: Tensor | None = None,
        *,
        width: int | None = None,
        n_head: int | None = None,
        output_mix: bool = False,
    ) -> Tensor:
        if w_embd is None:
            return self._path(x, width, n_head)
        if output_mix:
            return self._output_mix(x, w_embd, w_head)
        return self._superpose(x, w_embd, w_head)

    def _attend(self, q: Tensor, k: Tensor, v: Tensor, n_head: int, scale: float | None) -> Tensor:
        B, T, C = q.shape
        q, k, v = (t.view(B, T, n_head, C // n_head).transpose(1, 2) for t in (q, k, v))
        p = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True, scale=scale)
        return y.transpose(1, 2).reshape(B, T, C)

    def _superpose(self, x: Tensor, w_embd: Tensor, w_head: Tensor) -> Tensor:
        q, k, v = self.c_attn(x, w_embd).split(self.width, dim=-1)
        w_embd = w_embd.to(x.dtype)
        ind = self.head_ind.to(x.dtype)
        q_scale = (w_embd * self.inv_sqrt_head_dim.to(x.dtype))[:, None, :] @ ind  # [heads, 1, D]
        keep = (w_head.to(x.dtype)[:, None] * w_embd)[:, None, :] @ ind  # mixing weight of every feature
        z = None
        for i, h in enumerate(self.heads):
            y = self._attend(q * q_scale[i, 0], k, v, h, scale=1.0)
            z = y * keep[i, 0] if z is None else torch.addcmul(z, y, keep[i, 0])
        return self.c_proj(z, w_embd)

    def _output_mix(self, x: Tensor, w_embd: Tensor, w_head: Tensor) -> Tensor:
        """Weight-sharing baseline: every (width, heads) path on its own slice, outputs padded and mixed."""
        y = 0.0
        for we, e in zip(w_embd, self.widths):
            for wh, h in zip(w_head, self.heads):
                y = y + we * wh * F.pad(self._path(x[..., :e], e, h), (0, self.width - e))
        return y

    def _selections(self, width: int, n_head: int) -> tuple[Tensor, Tensor]:
        """Rows of q, k and v in ``c_attn``, and the matching columns of ``c_proj``, of one path."""
        rows = head_layout(self.width, n_head, width, self.c_attn.weight.device)
        return torch.cat([rows, rows + self.width, rows + 2 * self.width]), rows

    def _path(self, x: Tensor, width: int, n_head: int) -> Tensor:
        qkv_rows, rows = self._selections(width, n_head)
        q, k, v = self.c_attn(x, out=qkv_rows, inp=width).split(width, dim=-1)
        return self.c_proj(self._attend(q, k, v, n_head, scale=None), out=width, inp=rows)

    def sliced_state(self, width: int, n_head: int) -> dict[str, Tensor]:
        """The weights of one path, named as in a standalone attention layer."""
        qkv_rows, rows = self._selections(width, n_head)
        out = {}
        for name, lin, o, i in (("c_attn", self.c_attn, qkv_rows, width), ("c_proj", self.c_proj, width, rows)):
            weight, bias = lin.sliced(o, i)
            out[f"{name}.weight"] = weight
            if bias is not None:
                out[f"{name}.bias"] = bias
        return out
