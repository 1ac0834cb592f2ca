"""Weight-entangled building blocks.

Every op holds only the weights of its largest choice and runs in two ways from them:
``superpose`` (TangleNAS weight superposition: the choices' slices, zero-padded and weighted
by their mixing weights, summed into one weight, then one pass of the largest op) and ``path``
(one choice at its real width, as SPOS and extracted models compute it). ``output_mix`` is the
weight-sharing baseline (each choice computed on its own slice, outputs mixed) for benchmarks.
"""

from tangle_ray.ops.attention import EntangledAttention, head_layout
from tangle_ray.ops.conv import EntangledBatchNorm2d, EntangledConv2d
from tangle_ray.ops.embedding import EntangledEmbedding
from tangle_ray.ops.linear import EntangledLinear, prefix_indicators
from tangle_ray.ops.norm import EntangledLayerNorm

__all__ = [
    "EntangledAttention",
    "EntangledBatchNorm2d",
    "EntangledConv2d",
    "EntangledEmbedding",
    "EntangledLayerNorm",
    "EntangledLinear",
    "head_layout",
    "prefix_indicators",
]
