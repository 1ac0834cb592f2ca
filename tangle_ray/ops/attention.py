"""Self-attention with entangled embedding width and head count: causal (GPT) or not (ViT), two head-width rules.

``head_dim=None`` (GPT): the heads split the width, head dim ``e/h``. For ``h`` heads the largest width ``D`` is
cut into ``h`` blocks of ``D/h`` rows, and a width ``e`` uses the first ``e/h`` rows of every block
(``head_layout``). For a fixed head count, every width is then a prefix of every head, so the q/k/v projection
is computed once for all widths; each width's 1/sqrt(head dim) and its mixing weight are folded into q alone
(k and v stay unmasked: the zeros in q and the column mask of the output projection remove what a width does
not own). Softmax is not linear, so the head counts each run their attention (same FLOPs as one attention of
width D) and are mixed after it; only q, k and v are kept for the backward pass, which recomputes the head
counts' attentions (so the superposition keeps the activations of one attention, as the fixed layer does).

``head_dim=d`` (AutoFormer): every head is ``d`` wide whatever the width, so q, k and v of ``h`` heads are
``h*d`` wide. The rows of ``c_attn`` are ordered (head, q/k/v, feature): ``h`` heads are its first ``3hd`` rows
and the first ``hd`` columns of ``c_proj``, so every (width, heads) pair is a prefix slice and both layers
superpose by combi-superposition over the pairs (outer product of the two mixing weight vectors). Heads are
independent, so one attention of the largest head count serves every head count: through the column mask of
``c_proj``, head ``j`` comes out weighted by the total weight of the head counts that contain it, which is
exactly TangleNAS's mix of one attention per head count. Optional 2-D relative positions (AutoFormer's
``RelativePosition2D``, one table for keys and one for values) are ``d`` wide and shared by every choice.

The extracted model holds the same numbers in compact order.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from tangle_ray.ops.linear import EntangledLinear


def head_layout(max_width: int, n_head: int, width: int, device=None) -> Tensor:
    """Indices, among ``max_width`` features, of the features of width ``width`` split into ``n_head`` heads."""
    block, head_dim = max_width // n_head, width // n_head
    starts = torch.arange(n_head, device=device)[:, None] * block
    return (starts + torch.arange(head_dim, device=device)[None, :]).flatten()


def attention(q: Tensor, k: Tensor, v: Tensor, *, causal: bool, dropout: float = 0.0, scale: float | None = None,
              rel: tuple[RelativePosition2D, RelativePosition2D] | None = None) -> Tensor:
    """softmax(q k^T scale) v over [B, heads, T, d]. With ``rel = (R_k, R_v)`` (Shaw et al. as in AutoFormer) the
    logits gain ``q_i . R_k[i, j]`` (scaled alike) and the output ``sum_j a_ij R_v[i, j]``."""
    if rel is None:
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=causal, scale=scale)
    r_k, r_v = rel
    scale = q.size(-1) ** -0.5 if scale is None else scale
    logits = (q @ k.transpose(-2, -1) + r_k(q)) * scale
    if causal:
        T = q.size(-2)
        logits = logits.masked_fill(torch.ones(T, T, dtype=torch.bool, device=q.device).triu(1), float("-inf"))
    a = F.dropout(logits.softmax(-1), dropout)
    return a @ v + r_v(a, values=True)


def fixed_head_attention(qkv: Tensor, head_dim: int, *, causal: bool, dropout: float = 0.0,
                         rel: tuple[RelativePosition2D, RelativePosition2D] | None = None) -> Tensor:
    """Attention of heads ``head_dim`` wide from ``qkv`` [B, T, 3 h head_dim], rows in (head, q/k/v, feature)
    order; returns [B, T, h head_dim] (head-major), scaled by 1/sqrt(head_dim)."""
    B, T, C = qkv.shape
    n_head = C // (3 * head_dim)
    q, k, v = qkv.view(B, T, n_head, 3, head_dim).permute(3, 0, 2, 1, 4)
    y = attention(q, k, v, causal=causal, dropout=dropout, scale=head_dim**-0.5, rel=rel)
    return y.transpose(1, 2).reshape(B, T, n_head * head_dim)


class RelativePosition2D(nn.Module):
    """AutoFormer's 2-D relative position embedding for a class token followed by a ``grid`` x ``grid`` patch grid.

    Two tables of (2 max_distance + 2) x head_dim: one for the vertical and one for the horizontal offset between
    two patches (key minus query, clipped to +-max_distance, stored at 1 .. 2 max_distance + 1); index 0 serves
    every pair that involves the class token. The [n, n, head_dim] embeddings ``R[i, j]`` (the sum of the two
    tables' rows) are never built: ``forward`` works against the tables (see there).
    """

    def __init__(self, head_dim: int, grid: int, max_distance: int):
        super().__init__()
        rows = 2 * max_distance + 2
        self.table_v = nn.Parameter(torch.zeros(rows, head_dim))
        self.table_h = nn.Parameter(torch.zeros(rows, head_dim))
        patch = torch.arange(grid * grid)

        def index(coord: Tensor) -> Tensor:
            offset = (coord[None, :] - coord[:, None]).clamp(-max_distance, max_distance) + max_distance + 1
            return F.pad(offset, (1, 0, 1, 0))  # the class token's row and column: index 0

        self.register_buffer("index_v", index(patch // grid), False)
        self.register_buffer("index_h", index(patch % grid), False)

    def forward(self, x: Tensor, values: bool = False) -> Tensor:
        """Keys: the logits ``q_i . R[i, j]`` of queries ``x`` [..., n, d], as [..., n, n]: ``x`` times each table,
        gathered by offset. Values (``values``): ``sum_j a_ij R[i, j]`` of attention weights ``x`` [..., n, n], as
        [..., n, d]: the weights summed per offset (a scatter-add), times each table. Equal to the products with
        the [n, n, d] embeddings up to the order of float additions; n x rows products instead of n x n x d."""
        n = x.size(-2)
        out = None
        for table, index in ((self.table_v, self.index_v), (self.table_h, self.index_h)):
            idx = index[:n, :n].expand(*x.shape[:-2], n, n)
            if values:
                part = x.new_zeros(*x.shape[:-1], table.size(0)).scatter_add_(-1, idx, x) @ table
            else:
                part = (x @ table.t()).gather(-1, idx)
            out = part if out is None else out + part
        return out


def _as_bits(values: list) -> Tensor:
    """Float64 values stored as their int64 bit patterns: a buffer that dtype conversions of a module leave alone."""
    return torch.tensor(values, dtype=torch.float64).view(torch.int64)


def _from_bits(bits: Tensor, dtype: torch.dtype) -> Tensor:
    """The float64 values of ``_as_bits``, exact in float64; other dtypes get them rounded to float32 first (as a
    Python float becomes a float32 tensor), so their results never depend on a past conversion of the module."""
    values = bits.view(torch.float64)
    return values if dtype == torch.float64 else values.float().to(dtype)


class EntangledAttention(nn.Module):
    """Attention over every (width, head count) choice. ``head_dim``: None (GPT, ``e/h``) or a fixed head width;
    ``rel_pos``: ``(grid, max_distance)`` for 2-D relative positions (fixed head width only); ``proj_bias``
    defaults to ``bias``."""

    def __init__(self, widths: list[int], heads: list[int], bias: bool, dropout: float, *,
                 head_dim: int | None = None, causal: bool = True, proj_bias: bool | None = None,
                 rel_pos: tuple[int, int] | None = None):
        super().__init__()
        self.widths, self.heads = [int(e) for e in widths], [int(h) for h in heads]
        self.width = D = max(self.widths)
        self.dropout, self.head_dim, self.causal = dropout, head_dim, causal
        proj_bias = bias if proj_bias is None else proj_bias
        if head_dim is None:
            if rel_pos is not None:
                raise ValueError("relative positions need a fixed head_dim")
            self.c_attn = EntangledLinear(D, 3 * D, bias, [(3 * D, e) for e in self.widths])
            self.c_proj = EntangledLinear(D, D, proj_bias, [(e, D) for e in self.widths])
            # head_ind[h, e, j] = 1 if feature j belongs to width e under the layout of head count h
            pos = torch.arange(D)
            ind = [(pos[None, :] % (D // h) < torch.tensor([e // h for e in self.widths])[:, None]).float()
                   for h in self.heads]
            self.register_buffer("head_ind", torch.stack(ind), False)
            inv_sqrt = [[1.0 / math.sqrt(e // h) for e in self.widths] for h in self.heads]
            self.register_buffer("inv_sqrt_head_dim", _as_bits(inv_sqrt), False)
        else:
            inner = max(self.heads) * head_dim
            pairs = [(e, h * head_dim) for e in self.widths for h in self.heads]  # the order of outer(w_embd, w_head)
            self.c_attn = EntangledLinear(D, 3 * inner, bias, [(3 * hd, e) for e, hd in pairs])
            self.c_proj = EntangledLinear(inner, D, proj_bias, pairs)
        self.rel_k = None if rel_pos is None else RelativePosition2D(head_dim, *rel_pos)  # keys
        self.rel_v = None if rel_pos is None else RelativePosition2D(head_dim, *rel_pos)  # values

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
        if self.head_dim is not None:
            w = torch.outer(w_embd, w_head).flatten()
            return self.c_proj(self._fixed_heads(self.c_attn(x, w)), w)
        return self._superpose(x, w_embd, w_head)

    def _attend(self, q: Tensor, k: Tensor, v: Tensor, n_head: int, scale: float | None) -> Tensor:
        B, T, C = q.shape
        q, k, v = (t.view(B, T, n_head, C // n_head).transpose(1, 2) for t in (q, k, v))
        p = self.dropout if self.training else 0.0
        y = attention(q, k, v, causal=self.causal, dropout=p, scale=scale)
        return y.transpose(1, 2).reshape(B, T, C)

    def _fixed_heads(self, qkv: Tensor) -> Tensor:
        rel = None if self.rel_k is None else (self.rel_k, self.rel_v)
        p = self.dropout if self.training else 0.0
        return fixed_head_attention(qkv, self.head_dim, causal=self.causal, dropout=p, rel=rel)

    def _superpose(self, x: Tensor, w_embd: Tensor, w_head: Tensor) -> Tensor:
        q, k, v = self.c_attn(x, w_embd).split(self.width, dim=-1)
        w_embd = w_embd.to(x.dtype)
        ind = self.head_ind.to(x.dtype)
        q_scale = (w_embd * _from_bits(self.inv_sqrt_head_dim, x.dtype))[:, None, :] @ ind  # [heads, 1, D]
        keep = (w_head.to(x.dtype)[:, None] * w_embd)[:, None, :] @ ind  # mixing weight of every feature
        if torch.is_grad_enabled():  # keep q, k, v for backward; each head count's attention is recomputed there
            z = checkpoint(self._mix_head_counts, q, k, v, q_scale, keep, use_reentrant=False)
        else:
            z = self._mix_head_counts(q, k, v, q_scale, keep)
        return self.c_proj(z, w_embd)

    def _mix_head_counts(self, q: Tensor, k: Tensor, v: Tensor, q_scale: Tensor, keep: Tensor) -> Tensor:
        """sum over head counts h of keep_h * attention_h(q * q_scale_h, k, v). The dropout of a recomputation
        draws what the forward drew (checkpoint restores the generator state)."""
        z = None
        for i, h in enumerate(self.heads):
            y = self._attend(q * q_scale[i, 0], k, v, h, scale=1.0)
            z = y * keep[i, 0] if z is None else torch.addcmul(z, y, keep[i, 0])
        return z

    def _output_mix(self, x: Tensor, w_embd: Tensor, w_head: Tensor) -> Tensor:
        """Weight-sharing baseline: every (width, heads) path on its own slice, outputs padded and mixed."""
        y = 0.0
        for we, e in zip(w_embd, self.widths):
            for wh, h in zip(w_head, self.heads):
                y = y + we * wh * F.pad(self._path(x[..., :e], e, h), (0, self.width - e))
        return y

    def _selections(self, width: int, n_head: int) -> tuple[Tensor | int, Tensor | int]:
        """Rows of q, k and v in ``c_attn``, and the matching columns of ``c_proj``, of one path."""
        if self.head_dim is not None:
            return 3 * n_head * self.head_dim, n_head * self.head_dim
        rows = head_layout(self.width, n_head, width, self.c_attn.weight.device)
        return torch.cat([rows, rows + self.width, rows + 2 * self.width]), rows

    def _path(self, x: Tensor, width: int, n_head: int) -> Tensor:
        qkv_rows, rows = self._selections(width, n_head)
        qkv = self.c_attn(x, out=qkv_rows, inp=width)
        if self.head_dim is not None:
            return self.c_proj(self._fixed_heads(qkv), out=width, inp=rows)
        q, k, v = qkv.split(width, dim=-1)
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
        for name in ("rel_k", "rel_v"):
            if getattr(self, name) is not None:
                out.update({f"{name}.{n}": p for n, p in getattr(self, name).named_parameters()})
        return out
