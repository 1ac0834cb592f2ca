"""Token and position embeddings whose width choices are the first ``n_embd`` columns."""

from __future__ import annotations

from torch import Tensor, nn


class EntangledEmbedding(nn.Embedding):
    """Width ``e`` uses the first ``e`` columns. The superposition sum_e w_e pad(E[idx, :e]) is E[idx] * m with
    m[j] = sum_e w_e 1[j < e]: the caller applies m once to the sum of the token and position embeddings."""

    def forward(self, idx: Tensor, *, width: int | None = None) -> Tensor:
        y = super().forward(idx)
        return y if width is None else y[..., :width]
