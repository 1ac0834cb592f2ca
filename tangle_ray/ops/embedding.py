"""Token and position embeddings whose width choices are the first ``n_embd`` columns."""

from __future__ import annotations

from torch import Tensor, nn


class EntangledEmbedding(nn.Embedding):
    def forward(self, idx: Tensor, width_mask: Tensor | None = None, *, width: int | None = None) -> Tensor:
        """Superposed with ``width_mask`` (m[j] = sum_e w_e 1[j < e], so sum_e w_e pad(E[idx, :e]) = E[idx] m),
        else the first ``width`` columns."""
        y = super().forward(idx)
        return y * width_mask.to(y.dtype) if width_mask is not None else y[..., :width]
