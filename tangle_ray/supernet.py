"""The supernet: a model family's entangled weights plus the architecture parameters, kept apart.

The weights (``net``) are what DeepSpeed trains and partitions; the architecture parameters
(``alphas``, one vector of logits per choice, one row per layer for per-layer choices) are small,
stay replicated and have their own optimizer. A mixer turns the alphas into mixing weights W.
Build one with ``space.build_supernet()``; ``tangle_ray.folders`` saves and loads it.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from tangle_ray.space import Arch, SearchSpace


class Supernet(nn.Module):
    def __init__(self, space: SearchSpace, net: nn.Module, alpha_init_std: float = 1e-3):
        super().__init__()
        self.space = space
        self.net = net
        self.alphas = nn.ParameterDict({
            name: nn.Parameter(alpha_init_std * torch.randn(shape)) for name, shape in space.arch_shapes().items()
        })

    def forward(self, idx: Tensor, targets: Tensor | None = None, **mode) -> tuple[Tensor, Tensor | None]:
        """``weights=W`` superposes, ``arch=A`` runs the single path (see the family's ``forward``)."""
        return self.net(idx, targets, **mode)

    def arch_parameters(self) -> list[nn.Parameter]:
        return list(self.alphas.values())

    def weight_parameters(self) -> list[nn.Parameter]:
        return list(self.net.parameters())

    def argmax_arch(self) -> Arch:
        return self.space.arch_from_weights(dict(self.alphas))

    def extract(self, arch: Arch) -> nn.Module:
        return self.net.extract(arch)

