"""MobileNetV3 (Once-for-All): the weight-entangled supernet of an OFA space and the standalone model it extracts to.

The network is OFA's ``OFAMobileNetV3`` (mit-han-lab/once-for-all, ``elastic_nn/networks/ofa_mbv3.py``): a 3 x 3
stride-2 convolution (batch norm, hard swish); a fixed first block (3 x 3 depthwise, expansion 1, ReLU, no
squeeze-excitation, identity shortcut where the widths agree); stages of inverted-residual blocks, the first of a
stage with the stage's stride, the others with stride 1 and an identity shortcut; a 1 x 1 final expansion (batch
norm, hard swish); global average pooling; a 1 x 1 feature mix without batch norm or bias (hard swish); dropout and
the classifier. A searchable block is a 1 x 1 expansion to ``make_divisible(round(in * ratio), 8)`` channels, a
``k x k`` depthwise convolution, each with batch norm and the stage's activation, squeeze-excitation where the stage
has it (reduction 4 rounded by ``make_divisible``, ReLU, hard sigmoid), and a 1 x 1 projection with batch norm. The
choices are a kernel size and an expansion ratio per block and a depth per stage (``depth_1``, ``depth_2``, ...: the
stage's first blocks). Widths are the fixed settings times ``width_mult``, rounded by ``make_divisible`` as OFA does.
``docs/fidelity.md`` lists what is taken from OFA and what differs.

``EntangledMobileNetV3`` holds the largest block of every position under the standalone model's names and runs
superposition (``weights=W``: a kernel size is the centred slice of the largest kernel, an expansion ratio a prefix
of the middle channels; the depthwise weight mixes the (ratio, kernel) pairs), single path (``arch=A``) and
extraction (``extract(A)`` -> ``MobileNetV3``). Batch norms keep running statistics per width choice.
``recalibrate_bn`` resets a standalone model's batch-norm statistics on training batches, as OFA does before it
scores a subnet. ``MobileNetV3Family`` registers the family: its space files, parameter and FLOP counts.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tangle_ray.errors import ConfigError, shorten
from tangle_ray.models.registry import ModelFamily, Pretrained, Setting, register
from tangle_ray.models.vit import classify_loss
from tangle_ray.ops import EntangledBatchNorm2d, EntangledConv2d, EntangledLinear
from tangle_ray.ops.depth import path_depth, superpose_depth
from tangle_ray.space import Arch, SearchSpace

CHANNEL_DIVISIBLE = 8  # OFA's MyNetwork.CHANNEL_DIVISIBLE
SE_REDUCTION = 4  # OFA's SEModule.REDUCTION
BN_MOMENTUM, BN_EPS = 0.1, 1e-5  # OFA's bn_param
ACTIVATIONS = {"relu": F.relu, "h_swish": F.hardswish}  # F.hardswish(x) = x relu6(x + 3) / 6, OFA's Hswish


def make_divisible(v: float, divisor: int = CHANNEL_DIVISIBLE) -> int:
    """OFA's (and TensorFlow's MobileNet) channel rounding: the nearest multiple of ``divisor``, at least ``divisor``
    and not below 90% of ``v``."""
    new = max(divisor, int(v + divisor / 2) // divisor * divisor)
    return new + divisor if new < 0.9 * v else new


def middle_width(in_channels: int, ratio: float) -> int:
    """The expanded width of a block: ``make_divisible(round(in * ratio), 8)`` (OFA's ``active_middle_channel``)."""
    return make_divisible(round(in_channels * ratio))


def se_width(channels: int) -> int:
    """The hidden width of squeeze-excitation over ``channels``: ``make_divisible(channels // 4, 8)``."""
    return make_divisible(channels // SE_REDUCTION)


def conv_size(size: int, stride: int) -> int:
    """Output side of an odd-kernel convolution with 'same' padding ``k // 2``: ``ceil(size / stride)``."""
    return (size - 1) // stride + 1


def _init_weights(model: nn.Module) -> None:
    """OFA's ``init_models(net, "he_fout")``: convolutions N(0, 2 / (k k out_channels)); squeeze-excitation's layers
    (1 x 1 convolutions in OFA, linear layers here) the same with k = 1; other linear layers U(+-1/sqrt(in_features));
    biases zero; batch norms one and zero."""
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d):
            m.weight.data.normal_(0.0, math.sqrt(2.0 / (m.kernel_size[0] * m.kernel_size[1] * m.out_channels)))
        elif isinstance(m, nn.Linear):
            if ".se." in f".{name}.":
                m.weight.data.normal_(0.0, math.sqrt(2.0 / m.out_features))
            else:
                bound = 1.0 / math.sqrt(m.in_features)
                m.weight.data.uniform_(-bound, bound)
            if m.bias is not None:
                m.bias.data.zero_()
        elif isinstance(m, (nn.BatchNorm2d, EntangledBatchNorm2d)):
            m.weight.data.fill_(1.0)
            m.bias.data.zero_()


# ===================================================================== standalone model


@dataclass
class MobileNetV3Config:
    img_size: int
    in_chans: int
    num_classes: int
    first_width: int  # channels of the stem (width multiplier applied, as every width here)
    first_block_width: int
    stage_widths: list[int]
    stage_strides: list[int]
    stage_acts: list[str]
    stage_se: list[bool]
    depths: list[int]  # blocks of each stage
    kernel_size: list[int]  # one per block, the stages' blocks in order
    expand_ratio: list[float]
    final_expand_width: int
    last_channel: int
    dropout: float = 0.0  # before the classifier


@dataclass(frozen=True)
class BlockSpec:
    """The fixed shape of one searchable block: channels in and out, stride, activation, squeeze-excitation."""

    cin: int
    cout: int
    stride: int
    act: str
    se: bool

    @property
    def residual(self) -> bool:
        return self.stride == 1 and self.cin == self.cout


def block_specs(c: MobileNetV3Config) -> list[BlockSpec]:
    """The blocks of ``c``: stage after stage, ``c.depths[s]`` blocks in stage ``s``."""
    specs, ch = [], c.first_block_width
    for width, stride, act, se, depth in zip(c.stage_widths, c.stage_strides, c.stage_acts, c.stage_se, c.depths):
        for i in range(depth):
            specs.append(BlockSpec(ch, width, stride if i == 0 else 1, act, se))
            ch = width
    return specs


class ConvBN(nn.Module):
    """Convolution without bias, batch norm, activation (OFA's ``ConvLayer``): the stem and the final expansion."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int, act: str):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, stride, kernel // 2, bias=False)
        self.bn = nn.BatchNorm2d(cout, BN_EPS, BN_MOMENTUM)
        self.act = act

    def forward(self, x: Tensor) -> Tensor:
        return ACTIVATIONS[self.act](self.bn(self.conv(x)))


class SqueezeExcite(nn.Module):
    """x times hard_sigmoid(expand(relu(reduce(mean of x over the image)))) (OFA's ``SEModule``)."""

    def __init__(self, channels: int):
        super().__init__()
        self.reduce = nn.Linear(channels, se_width(channels))
        self.expand = nn.Linear(se_width(channels), channels)

    def forward(self, x: Tensor) -> Tensor:
        s = F.hardsigmoid(self.expand(F.relu(self.reduce(x.mean((2, 3))))))
        return x * s[:, :, None, None]


class MBConv(nn.Module):
    """An inverted-residual block (OFA's ``MBConvLayer`` in a ``ResidualBlock``), under OFA's module names."""

    def __init__(self, spec: BlockSpec, kernel: int, mid: int, expand: bool = True):
        super().__init__()
        self.act, self.residual = spec.act, spec.residual
        if expand:
            self.inverted_bottleneck = nn.Module()
            self.inverted_bottleneck.conv = nn.Conv2d(spec.cin, mid, 1, bias=False)
            self.inverted_bottleneck.bn = nn.BatchNorm2d(mid, BN_EPS, BN_MOMENTUM)
        else:
            self.inverted_bottleneck = None
        self.depth_conv = nn.Module()
        self.depth_conv.conv = nn.Conv2d(mid, mid, kernel, spec.stride, kernel // 2, groups=mid, bias=False)
        self.depth_conv.bn = nn.BatchNorm2d(mid, BN_EPS, BN_MOMENTUM)
        self.depth_conv.se = SqueezeExcite(mid) if spec.se else None
        self.point_linear = nn.Module()
        self.point_linear.conv = nn.Conv2d(mid, spec.cout, 1, bias=False)
        self.point_linear.bn = nn.BatchNorm2d(spec.cout, BN_EPS, BN_MOMENTUM)

    def forward(self, x: Tensor) -> Tensor:
        act, h = ACTIVATIONS[self.act], x
        if self.inverted_bottleneck is not None:
            h = act(self.inverted_bottleneck.bn(self.inverted_bottleneck.conv(h)))
        h = act(self.depth_conv.bn(self.depth_conv.conv(h)))
        if self.depth_conv.se is not None:
            h = self.depth_conv.se(h)
        y = self.point_linear.bn(self.point_linear.conv(h))
        return x + y if self.residual else y


def _first_block(first: int, first_block: int) -> MBConv:
    """OFA's fixed first block: 3 x 3 depthwise at stride 1, expansion 1 (no expansion layer), ReLU, no SE."""
    return MBConv(BlockSpec(first, first_block, 1, "relu", False), 3, first, expand=False)


def _head(m: nn.Module, x: Tensor) -> Tensor:
    """Final expansion, global average pooling, feature mix (1 x 1, no norm, hard swish), dropout, classifier."""
    x = m.final_expand_layer(x).mean((2, 3), keepdim=True)
    x = F.hardswish(m.feature_mix_layer.conv(x)).flatten(1)
    return m.classifier(m.dropout(x))


def _make_head(m: nn.Module, last_stage: int, final_expand: int, last_channel: int, num_classes: int,
               dropout: float) -> None:
    m.final_expand_layer = ConvBN(last_stage, final_expand, 1, 1, "h_swish")
    m.feature_mix_layer = nn.Module()
    m.feature_mix_layer.conv = nn.Conv2d(final_expand, last_channel, 1, bias=False)
    m.dropout = nn.Dropout(dropout)
    m.classifier = nn.Linear(last_channel, num_classes)


class MobileNetV3(Pretrained):
    """A MobileNetV3 of one architecture of an OFA space (OFA's ``MobileNetV3`` subnet)."""

    family = "mobilenetv3"
    config_class = MobileNetV3Config

    def __init__(self, config: MobileNetV3Config):
        super().__init__()
        self.config = c = config
        self.first_conv = ConvBN(c.in_chans, c.first_width, 3, 2, "h_swish")
        self.first_block = _first_block(c.first_width, c.first_block_width)
        self.blocks = nn.ModuleList(MBConv(spec, k, middle_width(spec.cin, e))
                                    for spec, k, e in zip(block_specs(c), c.kernel_size, c.expand_ratio))
        _make_head(self, c.stage_widths[-1], c.final_expand_width, c.last_channel, c.num_classes, c.dropout)
        _init_weights(self)

    def forward(self, img: Tensor, targets: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        x = self.first_block(self.first_conv(img))
        for block in self.blocks:
            x = block(x)
        logits = _head(self, x)
        return logits, classify_loss(logits, targets)


@torch.no_grad()
def recalibrate_bn(model: nn.Module, batches: Iterable[Any], num_batches: int | None = None) -> int:
    """OFA's ``set_running_statistics`` (``elastic_nn/utils.py``) on a standalone model: every batch norm's running
    mean and variance become the averages over the batches, weighted by their images, of the batch mean and biased
    batch variance of its input, each batch norm normalising by its batch's statistics on the way (dropout off).
    A subnet's statistics inherited from the supernet were gathered under other subnets (and under superposition),
    so OFA resets them on a few thousand training images before it scores the subnet. ``batches`` yields images
    or (images, labels); the first ``num_batches`` are used (all if None). Returns how many were."""
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    sums: dict[nn.Module, list[Any]] = {m: [0.0, 0.0, 0] for m in norms}

    def gather(bn: nn.Module, inputs: tuple[Tensor, ...]) -> None:
        x = inputs[0]
        mean = x.mean((0, 2, 3))
        var = (x - mean[:, None, None]).square().mean((0, 2, 3))
        acc = sums[bn]
        acc[0], acc[1], acc[2] = acc[0] + mean * len(x), acc[1] + var * len(x), acc[2] + len(x)

    training, momenta = model.training, [m.momentum for m in norms]
    param = next(model.parameters())
    handles = [m.register_forward_pre_hook(gather) for m in norms]
    model.eval()
    for m in norms:  # batch statistics, running statistics left as they are
        m.train()
        m.momentum = 0.0
    used = 0
    try:
        for batch in batches:
            if num_batches is not None and used >= num_batches:
                break
            x = batch[0] if isinstance(batch, (tuple, list)) else batch
            model(x.to(param.device, param.dtype))
            used += 1
    finally:
        for h in handles:
            h.remove()
        for m, momentum in zip(norms, momenta):
            m.momentum = momentum
        model.train(training)
    for m, (mean, var, n) in sums.items():
        if n:
            m.running_mean.copy_(mean / n)
            m.running_var.copy_(var / n)
    return used


# ===================================================================== supernet


class EntangledMBConv(nn.Module):
    """The largest block of one position: every expansion ratio is a prefix of the middle channels, every kernel
    size the centred window of the largest kernel; batch norms keep statistics per middle width."""

    def __init__(self, spec: BlockSpec, kernels: list[int], ratios: list[float]):
        super().__init__()
        self.spec, self.kernels, self.ratios = spec, [int(k) for k in kernels], list(ratios)
        self.mids = [middle_width(spec.cin, r) for r in ratios]
        M, K = max(self.mids), max(self.kernels)
        self.inverted_bottleneck = nn.Module()
        self.inverted_bottleneck.conv = EntangledConv2d(spec.cin, M, 1, 1, [(m, spec.cin, 1) for m in self.mids])
        self.inverted_bottleneck.bn = EntangledBatchNorm2d(self.mids, BN_EPS, BN_MOMENTUM)
        self.depth_conv = nn.Module()
        # combi-superposition: the (ratio, kernel) pairs in the order of outer(w_ratio, w_kernel).flatten()
        pairs = [(m, m, k) for m in self.mids for k in self.kernels]
        self.depth_conv.conv = EntangledConv2d(M, M, K, spec.stride, pairs, depthwise=True)
        self.depth_conv.bn = EntangledBatchNorm2d(self.mids, BN_EPS, BN_MOMENTUM)
        if spec.se:
            ses = [se_width(m) for m in self.mids]
            self.depth_conv.se = nn.Module()
            self.depth_conv.se.reduce = EntangledLinear(M, max(ses), True, list(zip(ses, self.mids)))
            self.depth_conv.se.expand = EntangledLinear(max(ses), M, True, list(zip(self.mids, ses)))
        else:
            self.depth_conv.se = None
        self.point_linear = nn.Module()
        self.point_linear.conv = EntangledConv2d(M, spec.cout, 1, 1, [(spec.cout, m, 1) for m in self.mids])
        self.point_linear.bn = EntangledBatchNorm2d([spec.cout], BN_EPS, BN_MOMENTUM)

    def forward(self, x: Tensor, w_ratio: Tensor | None = None, w_kernel: Tensor | None = None, *,
                ratio: float = 0.0, kernel: int = 0, track: bool = True) -> Tensor:
        if w_ratio is None:
            return self._path(x, ratio, kernel, track)
        act, ib, dc, pl = ACTIVATIONS[self.spec.act], self.inverted_bottleneck, self.depth_conv, self.point_linear
        h = act(ib.bn(ib.conv(x, w_ratio), w_ratio))
        h = act(dc.bn(dc.conv(h, torch.outer(w_ratio, w_kernel).flatten()), w_ratio))
        if dc.se is not None:
            s = F.hardsigmoid(dc.se.expand(F.relu(dc.se.reduce(h.mean((2, 3)), w_ratio)), w_ratio))
            h = h * s[:, :, None, None]
        y = pl.bn(pl.conv(h, w_ratio))
        return x + y if self.spec.residual else y

    def _path(self, x: Tensor, ratio: float, kernel: int, track: bool) -> Tensor:
        act, ib, dc, pl = ACTIVATIONS[self.spec.act], self.inverted_bottleneck, self.depth_conv, self.point_linear
        m = self.mids[self.ratios.index(ratio)]
        h = act(ib.bn(ib.conv(x, out=m, inp=self.spec.cin), width=m, track=track))
        h = act(dc.bn(dc.conv(h, out=m, kernel=kernel), width=m, track=track))
        if dc.se is not None:
            r = se_width(m)
            s = dc.se.expand(F.relu(dc.se.reduce(h.mean((2, 3)), out=r, inp=m)), out=m, inp=r)
            h = h * F.hardsigmoid(s)[:, :, None, None]
        y = pl.bn(pl.conv(h, out=self.spec.cout, inp=m), track=track)
        return x + y if self.spec.residual else y

    def sliced_state(self, ratio: float, kernel: int) -> dict[str, Tensor]:
        """The weights and statistics of one path, named as in ``MBConv``."""
        ib, dc, pl = self.inverted_bottleneck, self.depth_conv, self.point_linear
        m = self.mids[self.ratios.index(ratio)]
        state = {"inverted_bottleneck.conv.weight": ib.conv.sliced(m, self.spec.cin),
                 "depth_conv.conv.weight": dc.conv.sliced(m, kernel=kernel),
                 "point_linear.conv.weight": pl.conv.sliced(self.spec.cout, m)}
        for name, bn, width in (("inverted_bottleneck.bn", ib.bn, m), ("depth_conv.bn", dc.bn, m),
                                ("point_linear.bn", pl.bn, self.spec.cout)):
            state.update({f"{name}.{k}": v for k, v in bn.sliced_state(width).items()})
        if dc.se is not None:
            r = se_width(m)
            for name, lin, o, i in (("reduce", dc.se.reduce, r, m), ("expand", dc.se.expand, m, r)):
                state[f"depth_conv.se.{name}.weight"], state[f"depth_conv.se.{name}.bias"] = lin.sliced(o, i)
        return state


def _one_pixel(x: Tensor) -> Tensor:
    """What the unused blocks of a single path run on to stay in the graph: one pixel of one image."""
    return x[:1, :, :1, :1]


class EntangledMobileNetV3(nn.Module):
    """The largest MobileNetV3 of a space, every architecture of the space a slice of it."""

    def __init__(self, space: SearchSpace, **overrides):
        super().__init__()
        self.space = space
        self.fixed = f = {**space.fixed, **overrides}
        c = mbv3_config(space, space.largest(), **overrides)
        self.kernels = list(space.dims["kernel_size"].values)
        self.ratios = list(space.dims["expand_ratio"].values)
        self.first_conv = ConvBN(f["in_chans"], c.first_width, 3, 2, "h_swish")
        self.first_block = _first_block(c.first_width, c.first_block_width)
        self.blocks = nn.ModuleList(EntangledMBConv(spec, self.kernels, self.ratios) for spec in block_specs(c))
        _make_head(self, c.stage_widths[-1], c.final_expand_width, c.last_channel, c.num_classes, c.dropout)
        _init_weights(self)

    def forward(self, img: Tensor, targets: Tensor | None = None, *, weights: dict[str, Tensor] | None = None,
                arch: Arch | None = None, output_mix: bool = False,
                keep_all_params: bool = False) -> tuple[Tensor, Tensor | None]:
        """Logits and loss, superposed over mixing ``weights`` or on the single path ``arch``.

        ``keep_all_params`` (single path) adds a zero-valued term that runs each stage's unused blocks on one
        pixel of one image, with their batch norms normalising by the running statistics and updating none, so
        every parameter gets a (zero) gradient: ZeRO needs the same parameters in each step.
        """
        if (weights is None) == (arch is None):
            raise ValueError("pass exactly one of weights= (superposition) or arch= (single path)")
        if output_mix:
            raise NotImplementedError("the mobilenetv3 family has no output-mixing baseline")
        x = self.first_block(self.first_conv(img))
        zero: Tensor | float = 0.0
        space = self.space
        if arch is not None:  # validated: lists may hold the active blocks only
            arch = space.validate(arch)
            keep = keep_all_params and self.training
            for name, stage in zip(space.depth_dims, space.stages):
                d = arch[name]
                layers = [partial(self.blocks[i], ratio=arch["expand_ratio"][i], kernel=arch["kernel_size"][i],
                                  track=j < d) for j, i in enumerate(stage)]
                x, z = path_depth(x, layers, d, keep, probe=_one_pixel)
                zero = zero + z
        else:
            for name, stage in zip(space.depth_dims, space.stages):
                layers = [partial(self.blocks[i], w_ratio=weights["expand_ratio"][i],
                                  w_kernel=weights["kernel_size"][i]) for i in stage]
                x = superpose_depth(x, layers, list(space.dims[name].values), weights[name])
        logits = _head(self, x)
        loss = classify_loss(logits, targets)
        return logits, (loss + zero if loss is not None and keep_all_params and arch is not None else loss)

    def extract(self, arch: Arch) -> MobileNetV3:
        """A standalone ``MobileNetV3`` of exactly ``arch`` holding copies of the supernet's weights and the running
        statistics of its widths (recalibrate them with ``recalibrate_bn`` before scoring it)."""
        arch = self.space.validate(arch)
        model = MobileNetV3(self.arch_config(arch)).to(self.classifier.weight.device, self.classifier.weight.dtype)
        state: dict[str, Tensor] = {}
        for name in ("first_conv", "first_block", "final_expand_layer", "feature_mix_layer", "classifier"):
            state.update({f"{name}.{k}": v for k, v in getattr(self, name).state_dict().items()})
        for j, i in enumerate(self.space.active_layers(arch)):
            block = self.blocks[i].sliced_state(arch["expand_ratio"][i], arch["kernel_size"][i])
            state.update({f"blocks.{j}.{k}": v for k, v in block.items()})
        with torch.no_grad():
            model.load_state_dict({k: v.detach().clone() for k, v in state.items()}, strict=True)
        return model

    def arch_config(self, arch: Arch) -> MobileNetV3Config:
        return mbv3_config(self.space, arch, dropout=self.fixed["dropout"])


def scaled_widths(fixed: dict[str, Any]) -> dict[str, Any]:
    """The fixed widths of a space times ``width_mult``, each rounded by ``make_divisible`` (OFA rounds them all,
    also at width 1.0)."""
    m = fixed["width_mult"]
    out = {k: make_divisible(fixed[k] * m) for k in ("first_width", "first_block_width", "final_expand_width",
                                                         "last_channel")}
    out["stage_widths"] = [make_divisible(w * m) for w in fixed["stage_widths"]]
    return out


def mbv3_config(space: SearchSpace, arch: Arch, **overrides) -> MobileNetV3Config:
    """The standalone model of one architecture of ``space`` (``overrides`` replace fixed settings)."""
    f = {**space.fixed, **overrides}
    active = space.active_layers(arch)
    return MobileNetV3Config(
        img_size=f["img_size"], in_chans=f["in_chans"], num_classes=f["num_classes"],
        stage_strides=list(f["stage_strides"]), stage_acts=list(f["stage_acts"]), stage_se=list(f["stage_se"]),
        depths=[int(arch[name]) for name in space.depth_dims], kernel_size=[arch["kernel_size"][i] for i in active],
        expand_ratio=[arch["expand_ratio"][i] for i in active], dropout=f["dropout"], **scaled_widths(f),
    )


def count(c: MobileNetV3Config) -> tuple[int, int]:
    """(parameters, multiply-accumulates of one image) of a standalone model, as OFA counts them
    (``count_parameters``, ``count_net_flops``): every weight, bias and batch-norm scale and shift; the MACs of
    convolutions (in / groups x k x k per output element) and linear layers (in x out), squeeze-excitation's
    included; nothing for batch norms, activations, pooling, the SE product or shortcuts."""
    size = conv_size(c.img_size, 2)
    params = 9 * c.in_chans * c.first_width + 2 * c.first_width
    macs = 9 * c.in_chans * c.first_width * size * size
    p, m, size = block_count(BlockSpec(c.first_width, c.first_block_width, 1, "relu", False), 3, c.first_width,
                             size, expand=False)
    params, macs = params + p, macs + m
    for spec, k, e in zip(block_specs(c), c.kernel_size, c.expand_ratio):
        p, m, size = block_count(spec, k, middle_width(spec.cin, e), size)
        params, macs = params + p, macs + m
    fe, lc = c.final_expand_width, c.last_channel
    params += c.stage_widths[-1] * fe + 2 * fe + fe * lc + (lc + 1) * c.num_classes
    macs += c.stage_widths[-1] * fe * size * size + fe * lc + lc * c.num_classes
    return params, macs


def block_count(spec: BlockSpec, kernel: int, mid: int, size: int, expand: bool = True) -> tuple[int, int, int]:
    """(parameters, MACs, output side) of one block with ``mid`` middle channels on a ``size x size`` input;
    ``expand=False``: no expansion layer (the first block)."""
    out = conv_size(size, spec.stride)
    params = kernel * kernel * mid + 2 * mid + mid * spec.cout + 2 * spec.cout
    macs = kernel * kernel * mid * out * out + mid * spec.cout * out * out
    if expand:
        params += spec.cin * mid + 2 * mid
        macs += spec.cin * mid * size * size
    if spec.se:
        r = se_width(mid)
        params += (mid + 1) * r + (r + 1) * mid
        macs += 2 * mid * r
    return params, macs, out


# ===================================================================== the family

_ACT_NAMES = tuple(ACTIVATIONS)


@register
class MobileNetV3Family(ModelFamily):
    """OFA's MobileNetV3 space: a kernel size and an expansion ratio per block, a depth per stage (``depth_1``,
    ``depth_2``, ..., as many as ``fixed.stage_widths`` has stages)."""

    name = "mobilenetv3"
    model_class = MobileNetV3
    task = "classify"
    dims = {"kernel_size": True, "expand_ratio": True}  # and one depth per stage: ``stage_dims``
    integer_dims = ("kernel_size",)
    fixed = {
        "img_size": Setting(int), "in_chans": Setting(int, 3), "num_classes": Setting(int),
        "width_mult": Setting(float, 1.0), "first_width": Setting(int), "first_block_width": Setting(int),
        "stage_widths": Setting(list), "stage_strides": Setting(list), "stage_acts": Setting(list),
        "stage_se": Setting(list), "final_expand_width": Setting(int), "last_channel": Setting(int),
        "dropout": Setting(float, 0.1),
    }

    def stage_dims(self, fixed: dict[str, Any], source: str) -> tuple[dict[str, bool], tuple[str, ...]]:
        """The choices of a space with these fixed settings: ``depth_1`` ... ``depth_S`` for its S stages, then the
        per-block kernel size and expansion ratio."""
        widths = fixed["stage_widths"]
        if not widths or len(widths) > 64:
            raise ConfigError(f"{source}: fixed.stage_widths = {shorten(widths)} must list 1 to 64 stage widths")
        depths = tuple(f"depth_{s + 1}" for s in range(len(widths)))
        return {**dict.fromkeys(depths, False), **self.dims}, depths

    def check(self, space: SearchSpace) -> None:
        src, f = space.source, space.fixed
        for key in ("img_size", "in_chans", "num_classes", "first_width", "first_block_width", "final_expand_width",
                    "last_channel"):
            if f[key] < 1:
                raise ConfigError(f"{src}: fixed.{key} = {f[key]} must be a positive integer")
        if not 0.0 < f["width_mult"] <= 64.0:
            raise ConfigError(f"{src}: fixed.width_mult = {f['width_mult']} must be in (0, 64]")
        if not 0.0 <= f["dropout"] < 1.0:
            raise ConfigError(f"{src}: fixed.dropout = {f['dropout']} must be in [0, 1)")
        n = len(f["stage_widths"])
        kinds = {"stage_widths": (lambda v: _is_int(v) and 1 <= v <= 1 << 16, "integers in [1, 65536]"),
                 "stage_strides": (lambda v: _is_int(v) and 1 <= v <= 8, "integers in [1, 8]"),
                 "stage_acts": (lambda v: v in _ACT_NAMES, f"one of {list(_ACT_NAMES)}"),
                 "stage_se": (lambda v: isinstance(v, bool), "true or false")}
        for key, (ok, what) in kinds.items():
            values = f[key]
            if len(values) != n:
                raise ConfigError(f"{src}: fixed.{key} has {len(values)} entries, fixed.stage_widths {n}: "
                                  "one per stage")
            bad = [v for v in values if not ok(v)]
            if bad:
                raise ConfigError(f"{src}: fixed.{key} = {shorten(values)}: {shorten(bad[0])} is not allowed; "
                                  f"entries must be {what}")
        kernels = space.dims["kernel_size"].values
        if any(k % 2 == 0 for k in kernels):
            raise ConfigError(f"{src}: per_layer.kernel_size = {list(kernels)}: kernel sizes must be odd ('same' "
                              "padding k // 2 as OFA)")
        widths = scaled_widths(f)
        ratios = space.dims["expand_ratio"].values
        for cin in {widths["first_block_width"], *widths["stage_widths"]}:
            mids = [middle_width(cin, r) for r in ratios]
            if len(set(mids)) != len(mids):
                raise ConfigError(f"{src}: per_layer.expand_ratio = {list(ratios)} gives middle widths {mids} for "
                                  f"{cin} input channels: two ratios give the same width; choose ratios further apart")
        if max(f["first_width"], f["first_block_width"], f["final_expand_width"], f["last_channel"]) > 1 << 16:
            raise ConfigError(f"{src}: fixed widths must be at most 65536")

    calibrates = True

    def prepare_for_eval(self, model: nn.Module, batches) -> nn.Module:
        """OFA's ``set_running_statistics`` before a subnet is scored: every batch norm's running statistics
        recomputed on ``batches`` (the task's calibration images, ``recalibrate_bn``)."""
        if not batches:
            raise ValueError("recalibrating batch norms needs at least one batch of images")
        recalibrate_bn(model, batches)
        return model

    def build_net(self, space: SearchSpace, **overrides) -> EntangledMobileNetV3:
        return EntangledMobileNetV3(space, **overrides)

    def build_model(self, space: SearchSpace, arch: Arch, **overrides) -> MobileNetV3:
        return MobileNetV3(mbv3_config(space, space.validate(arch), **overrides))

    def model_settings(self, model: MobileNetV3) -> dict:
        return {k: getattr(model.config, k) for k in ("img_size", "in_chans", "num_classes")}

    def param_count(self, space: SearchSpace, arch: Arch) -> int:
        """Every parameter of the extracted model, as OFA's ``count_parameters`` counts a subnet (batch-norm
        scales and shifts included, running statistics not)."""
        return count(mbv3_config(space, arch))[0]

    def flops(self, space: SearchSpace, arch: Arch) -> int:
        """One image: 2 per multiply-add of what OFA's ``count_net_flops`` counts (see ``count``), i.e. twice the
        MACs OFA reports (its "FLOPs")."""
        return 2 * count(mbv3_config(space, arch))[1]

    def superposed_flops(self, space: SearchSpace, samples: int, backward: bool = False) -> int:
        """Every block at its largest width and kernel (depth is mixed after all blocks run), i.e. the largest
        architecture, plus the products that build the weight masks once per pass: the depthwise masks of the
        (ratio, kernel) pairs and squeeze-excitation's two masks (masks that only scale an input or an output are
        vectors, left out). The backward pass doubles the convolutions and repeats each mask product once."""
        c = mbv3_config(space, space.largest())
        pairs = len(space.dims["kernel_size"].values) * len(space.dims["expand_ratio"].values)
        K, ratios = max(space.dims["kernel_size"].values), space.dims["expand_ratio"].values
        masks = 0
        for spec in block_specs(c):
            M = max(middle_width(spec.cin, r) for r in ratios)
            masks += 2 * pairs * M * K * K + (2 * 2 * len(ratios) * M * se_width(M) if spec.se else 0)
        return (3 if backward else 1) * samples * self.flops(space, space.largest()) + (2 if backward else 1) * masks


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)
