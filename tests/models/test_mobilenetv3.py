"""The MobileNetV3 (OFA) family: superposed, single-path and extracted models agree exactly, gradients and batch-norm
statistics included; counts as OFA counts them; per-stage depths in the space; batch-norm recalibration; files."""

import copy
import functools
import json
import random
import time

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from tangle_ray.errors import ConfigError
from tangle_ray.models import load_model, load_space, space_from_dict
from tangle_ray.models.mobilenetv3 import (
    BlockSpec,
    MBConv,
    MobileNetV3,
    block_count,
    make_divisible,
    middle_width,
    recalibrate_bn,
    se_width,
)
from tangle_ray.ops.conv import EntangledBatchNorm2d
from tangle_ray.space import space_to_dict


def _small_ofa():
    """ofa-mbv3 with 16 x 16 inputs and 10 classes: OFA's blocks and widths, cheap enough for float64 tests."""
    raw = space_to_dict(load_space("ofa-mbv3"))
    raw["fixed"].update(img_size=16, num_classes=10)
    return space_from_dict(raw, source="ofa-mbv3 at 16 x 16")


def _space(name: str):
    return _small_ofa() if name == "ofa-mbv3-16" else load_space(name)


def _randomise(net: torch.nn.Module) -> None:
    """Random biases, batch-norm scales, shifts and running statistics (every width its own), so that a slicing
    mistake cannot hide behind zeros and ones."""
    with torch.no_grad():
        for name, p in net.named_parameters():
            if name.endswith("bias") or ".bn." in name:
                p.add_(0.3 * torch.randn_like(p))
        for name, b in net.named_buffers():
            if name.endswith("running_var"):
                b.copy_(torch.rand_like(b) + 0.5)
            elif name.endswith("running_mean"):
                b.copy_(0.3 * torch.randn_like(b))


@functools.cache
def _net(name: str):
    space = _space(name)
    torch.manual_seed(0)
    net = space.family.build_net(space, dropout=0.0).double()
    _randomise(net)
    return space, net


def _images(space, batch: int, seed: int) -> torch.Tensor:
    f = space.fixed
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, f["in_chans"], f["img_size"], f["img_size"], generator=gen, dtype=torch.float64)


@pytest.mark.parametrize("name, seed, train", [("mbv3-tiny", s, t) for s in range(3) for t in (False, True)]
                         + [("ofa-mbv3-16", 0, False)])
def test_one_hot_superposition_equals_single_path_equals_extracted(name, seed, train):
    """Logits, loss, the input's and every weight's gradient, and (in training) the running statistics each pass
    leaves behind; evaluation normalises with the chosen widths' own statistics, training with the batch's (whose
    gradients are large on the last 1 x 1 or 2 x 2 maps of a few images: compared relatively)."""
    space, base = _net(name)
    rng = random.Random(seed)
    arch = space.sample(rng)
    batch = rng.randint(2, 4)
    img, targets = _images(space, batch, 100 + seed), torch.randint(0, space.fixed["num_classes"], (batch,))
    runs = {}
    for mode in ("superposed", "path", "extracted"):
        net = copy.deepcopy(base) if train else base  # training moves the running statistics
        net.train(train).zero_grad(set_to_none=True)
        model = net.extract(arch).train(train) if mode == "extracted" else net
        x = img.clone().requires_grad_()
        kwargs = {"superposed": {"weights": space.one_hot(arch, torch.float64)}, "path": {"arch": arch}}.get(mode, {})
        logits, loss = model(x, targets, **kwargs)
        loss.backward()
        if mode == "extracted":
            state, grads = model.state_dict(), {n: p.grad for n, p in model.named_parameters()}
        else:  # the supernet's statistics, and its gradients as the extracted model names them
            state = net.extract(arch).state_dict()
            params = list(net.parameters())
            values = [p.data for p in params]
            for p in params:
                p.data = torch.zeros_like(p) if p.grad is None else p.grad
            grads = {n: p.detach().clone() for n, p in net.extract(arch).named_parameters()}
            for p, v in zip(params, values, strict=True):
                p.data = v
        runs[mode] = {"logits": logits, "loss": loss, "x": x.grad, "state": state, "grads": grads}
    ext = runs["extracted"]
    for mode in ("superposed", "path"):
        run = runs[mode]
        torch.testing.assert_close(run["logits"], ext["logits"], rtol=0, atol=1e-12)
        torch.testing.assert_close(run["loss"], ext["loss"], rtol=0, atol=1e-12)
        torch.testing.assert_close(run["x"], ext["x"], rtol=0, atol=1e-12)
        assert run["grads"].keys() == ext["grads"].keys() and run["state"].keys() == ext["state"].keys()
        _assert_close_all(run["grads"], ext["grads"], rtol=1e-9, atol=1e-11)
        _assert_close_all(run["state"], ext["state"], rtol=0, atol=1e-13)


def _assert_close_all(got: dict, expected: dict, rtol: float, atol: float) -> None:
    """``torch.testing.assert_close`` of every entry, one vectorised check first (millions of entries)."""
    a = torch.cat([got[k].double().flatten() for k in expected])
    b = torch.cat([v.double().flatten() for v in expected.values()])
    if not ((a - b).abs() <= atol + rtol * b.abs()).all():
        for k, v in expected.items():
            torch.testing.assert_close(got[k], v, rtol=rtol, atol=atol, msg=k)


def test_one_hot_superposition_leaves_the_other_widths_statistics_alone():
    """Per block, only the chosen width's statistics move. (Blocks past a stage's chosen depth run too, as depth is
    mixed after them, and update their chosen width with the input a deeper path would give them.)"""
    space, base = _net("mbv3-tiny")
    net = copy.deepcopy(base).train()
    arch = space.sample(random.Random(5))
    before = {k: v.clone() for k, v in net.named_buffers() if "running" in k}
    net(_images(space, 3, 5), weights=space.one_hot(arch, torch.float64))
    for i in space.active_layers(arch):
        bn = net.blocks[i].depth_conv.bn
        chosen = net.blocks[i].ratios.index(arch["expand_ratio"][i])
        key = f"blocks.{i}.depth_conv.bn.running_mean"
        for c in range(len(bn.widths)):
            assert torch.equal(bn.running_mean[c], before[key][c]) == (c != chosen)


def test_soft_superposition_is_the_mix_of_each_ops_slices():
    """Away from one-hot weights every op computes sum_c w_c pad(op_c(x)) of its own slices: the depthwise
    convolution over (ratio, kernel) pairs with weight w_ratio * w_kernel, the batch norms per width."""
    space, net = _net("mbv3-tiny")
    block = net.blocks[1]
    dc, M = block.depth_conv, max(block.mids)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, M, 7, 7, generator=gen, dtype=torch.float64)
    w_r = torch.tensor([0.2, 0.3, 0.5], dtype=torch.float64)
    w_k = torch.tensor([0.6, 0.1, 0.3], dtype=torch.float64)
    expected = 0
    for wr, m in zip(w_r, block.mids):
        for wk, k in zip(w_k, block.kernels):
            y = torch.nn.functional.conv2d(x[:, :m], dc.conv.sliced(m, kernel=k), None, 1, k // 2, groups=m)
            expected = expected + wr * wk * torch.nn.functional.pad(y, (0, 0, 0, 0, 0, M - m))
    torch.testing.assert_close(dc.conv(x, torch.outer(w_r, w_k).flatten()), expected, rtol=0, atol=1e-12)
    bn = dc.bn.eval()
    expected = sum(wr * torch.nn.functional.pad(bn(x[:, :m], width=m), (0, 0, 0, 0, 0, M - m))
                   for wr, m in zip(w_r, block.mids))
    torch.testing.assert_close(bn(x, w_r), expected, rtol=0, atol=1e-12)
    bn = copy.deepcopy(bn).train()
    expected = sum(wr * torch.nn.functional.pad(copy.deepcopy(bn)(x[:, :m], width=m), (0, 0, 0, 0, 0, M - m))
                   for wr, m in zip(w_r, block.mids))
    torch.testing.assert_close(bn(x, w_r), expected, rtol=0, atol=1e-12)


def test_every_parameter_gets_a_gradient_and_unused_blocks_keep_their_statistics():
    space = load_space("mbv3-tiny")
    torch.manual_seed(1)
    net = space.family.build_net(space).train()
    img, targets = _images(space, 3, 1).float(), torch.tensor([0, 3, 4])
    gen = torch.Generator().manual_seed(1)
    soft = {k: torch.rand(shape, generator=gen).softmax(-1) for k, shape in space.arch_shapes().items()}
    net(img, targets, weights=soft)[1].backward()
    for name, p in net.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    net.zero_grad(set_to_none=True)
    shallow = space.smallest()
    stats = {k: v.clone() for k, v in net.named_buffers()}
    net(img, targets, arch=shallow, keep_all_params=True)[1].backward()
    assert all(p.grad is not None for p in net.parameters())
    unused = set(range(space.max_layers)) - set(space.active_layers(shallow))
    assert unused
    for k, v in net.named_buffers():
        block = int(k.split(".")[1]) if k.startswith("blocks.") else None
        if block in unused:
            assert torch.equal(v, stats[k]), k


@pytest.mark.parametrize("name", ["mbv3-tiny", "ofa-mbv3"])
def test_param_count_equals_extracted_model(name):
    space = load_space(name)
    for seed in range(3):
        arch = space.sample(random.Random(10 + seed))
        with torch.device("meta"):
            model = space.family.build_model(space, arch)
        assert model.num_parameters() == space.param_count(arch)
    if name == "mbv3-tiny":
        net = space.family.build_net(space)
        assert sum(p.numel() for p in net.parameters()) == space.param_count(space.largest())
        arch = space.sample(random.Random(3))
        assert net.extract(arch).num_parameters() == space.param_count(arch)


# Measured with OFA's own code (mit-han-lab/once-for-all f03b267: OFAMobileNetV3(width_mult=1.2, ks_list=[3, 5, 7],
# expand_ratio_list=[3, 4, 6], depth_list=[2, 3, 4]), set_active_subnet, get_active_subnet, count_parameters, and
# the MACs of count_net_flops' hooks summed as integers; count_net_flops itself sums them in float32, which gives
# 843,101,056 / 193,078,208 / 453,502,400 / 452,267,040 / 438,347,488). Per-layer lists: the active blocks.
OFA_SUBNETS = [
    ([4] * 5, [7] * 20, [6] * 20, 10_701_632, 843_101_040),
    ([2] * 5, [3] * 10, [3] * 10, 4_602_456, 193_078_200),
    ([3, 3, 2, 3, 4], [5, 5, 5, 5, 7, 3, 3, 5, 7, 5, 7, 7, 3, 5, 3], [6, 3, 6, 4, 6, 3, 4, 4, 3, 6, 4, 6, 4, 3, 6],
     7_637_672, 453_502_384),
    ([2, 2, 4, 3, 4], [7, 7, 5, 5, 5, 7, 3, 3, 7, 3, 3, 7, 5, 3, 3], [4, 6, 4, 6, 3, 6, 4, 6, 3, 6, 6, 4, 4, 3, 6],
     7_787_456, 452_267_040),
    ([3, 3, 4, 2, 3], [3, 3, 3, 7, 7, 5, 3, 3, 7, 3, 3, 3, 7, 7, 5], [6, 4, 6, 3, 6, 6, 6, 4, 4, 4, 6, 6, 3, 4, 6],
     6_939_720, 438_347_480),
]


@pytest.mark.parametrize("depths, kernels, ratios, params, macs", OFA_SUBNETS)
def test_ofa_mbv3_counts_equal_ofas_own(depths, kernels, ratios, params, macs):
    """OFA's largest w1.2 subnet has 10.7M parameters (7.66M is the largest of the w1.0 supernet)."""
    space = load_space("ofa-mbv3-w12")
    arch = {**{f"depth_{s + 1}": d for s, d in enumerate(depths)}, "kernel_size": kernels, "expand_ratio": ratios}
    assert space.param_count(arch) == params
    assert space.flops(arch) == 2 * macs
    with torch.device("meta"):
        assert space.family.build_model(space, arch).num_parameters() == params


def test_ofa_mbv3_is_the_papers_table_7_space():
    """TangleNAS's Table 7: the largest architecture has 7.66M parameters and 566.17M multiply-adds (OFA's w1.0
    supernet; its own code counts 7,664,760 and 566,170,656)."""
    space = load_space("ofa-mbv3")
    assert space.param_count(space.largest()) == 7_664_760 == pytest.approx(7.66e6, rel=0.01)
    assert space.flops(space.largest()) / 2 == 566_170_656 == pytest.approx(566.17e6, rel=1e-4)
    assert space.num_architectures() == pytest.approx(2.2e19, rel=0.05)


def test_flops_of_one_block_by_hand():
    """A stage-2 block of ofa-mbv3-w12 (48 -> 48 channels, stride 1, SE) at ratio 4, kernel 5 on a 28 x 28 map: middle
    width make_divisible(round(48 * 4), 8) = 192, SE width make_divisible(192 // 4, 8) = 48."""
    spec = BlockSpec(48, 48, 1, "relu", True)
    assert middle_width(48, 4) == 192 and se_width(192) == 48 and spec.residual
    params, macs, out = block_count(spec, 5, 192, 28)
    assert out == 28
    assert params == (48 * 192 + 2 * 192) + (25 * 192 + 2 * 192) + (192 * 48 + 48) + (48 * 192 + 192) \
        + (192 * 48 + 2 * 48)
    assert macs == 48 * 192 * 784 + 25 * 192 * 784 + 192 * 48 + 48 * 192 + 192 * 48 * 784 == 18_232_320
    block = MBConv(spec, 5, 192).eval()
    assert sum(p.numel() for p in block.parameters()) == params
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        block(torch.randn(1, 48, 28, 28))
    assert counter.get_total_flops() == 2 * macs
    # the first block of a stage: stride 2, no shortcut; the output side is ceil(28 / 2)
    params, macs, out = block_count(BlockSpec(32, 48, 2, "relu", True), 7, 96, 28)
    assert out == 14 and macs == 32 * 96 * 784 + 49 * 96 * 196 + 2 * 96 * 24 + 96 * 48 * 196


@pytest.mark.parametrize("name", ["mbv3-tiny", "ofa-mbv3-16"])
def test_flops_equal_the_flop_counter(name):
    space = _space(name)
    for seed in range(2):
        arch = space.sample(random.Random(seed))
        model = space.family.build_model(space, arch).eval()
        counter = FlopCounterMode(display=False)
        with counter, torch.no_grad():
            model(_images(space, 1, 0).float())
        assert counter.get_total_flops() == space.flops(arch)


def test_superposed_flops_are_the_largest_architectures_plus_masks():
    space = load_space("mbv3-tiny")
    largest = space.flops(space.largest())
    forward = space.superposed_flops(64)
    assert 64 * largest < forward < 64 * largest * 1.01  # the masks are built once per pass
    assert space.superposed_flops(64, backward=True) > 3 * 64 * largest


def test_weight_decay_spares_batch_norms_and_biases_as_ofa():
    """OFA: no_decay_keys = "bn#bias" (train_ofa_net.py): convolutions, SE and classifier weights decay."""
    space, net = _net("mbv3-tiny")
    params = {f"{m}.{n}".lstrip("."): (p, mod) for m, mod in net.named_modules()
              for n, p in mod.named_parameters(recurse=False)}
    decayed = {k for k, (p, mod) in params.items() if not space.family.no_weight_decay(k, p, mod)}
    assert decayed == {k for k in params if "bn" not in k and "bias" not in k}
    assert any(".se." in k for k in decayed) and "classifier.weight" in decayed


def test_make_divisible_is_ofas():
    assert [make_divisible(w * 1.2) for w in (16, 16, 24, 40, 80, 112, 160, 960, 1280)] == \
        [24, 24, 32, 48, 96, 136, 192, 1152, 1536]
    assert make_divisible(18) == 24 and make_divisible(19.2) == 24 and make_divisible(3) == 8


def test_tiny_forward_and_backward_take_a_fraction_of_a_second():
    space = load_space("mbv3-tiny")
    torch.manual_seed(0)
    supernet = space.build_supernet().train()
    img, targets = _images(space, 32, 0).float(), torch.randint(0, 10, (32,))
    weights = {k: v.detach().softmax(-1) for k, v in supernet.alphas.items()}
    supernet(img, targets, weights=weights)[1].backward()  # warm-up
    best = {}
    for mode, kwargs in (("superposed", {"weights": weights}), ("path", {"arch": space.largest()})):
        times = []
        for _ in range(2):
            start = time.perf_counter()
            supernet(img, targets, **kwargs)[1].backward()
            times.append(time.perf_counter() - start)
        best[mode] = min(times)
    assert best["superposed"] < 1.5 and best["path"] < 1.0, best


def test_recalibrated_statistics_are_ofas_batch_averages():
    """After recalibrating on one batch, evaluation (running statistics) equals training-mode batch norm on that
    batch: OFA keeps the biased variance. On several batches, the stem's statistics are the image-weighted means of
    the batches' means and biased variances."""
    space = load_space("mbv3-tiny")
    torch.manual_seed(0)
    model = space.family.build_net(space).extract(space.sample(random.Random(0))).double().eval()
    img = _images(space, 6, 0)
    assert recalibrate_bn(model, [(img, None)]) == 1
    assert not model.training and all(m.momentum == 0.1 for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))
    reference = copy.deepcopy(model).train()
    torch.testing.assert_close(model(img)[0], reference(img)[0], rtol=0, atol=1e-10)
    batches = [_images(space, n, 10 + n) for n in (2, 5, 3)]
    assert recalibrate_bn(model.train(), batches + [img], num_batches=3) == 3 and model.training
    conv = model.first_conv.conv
    with torch.no_grad():
        outs = [conv(b) for b in batches]
    mean = sum(o.mean((0, 2, 3)) * len(o) for o in outs) / 10
    var = sum(o.var((0, 2, 3), unbiased=False) * len(o) for o in outs) / 10
    torch.testing.assert_close(model.first_conv.bn.running_mean, mean, rtol=0, atol=1e-12)
    torch.testing.assert_close(model.first_conv.bn.running_var, var, rtol=0, atol=1e-12)


def test_extracted_model_round_trips(tmp_path):
    space, net = _net("mbv3-tiny")
    arch = space.sample(random.Random(7))
    model = net.extract(arch).eval()
    model.save_pretrained(tmp_path / "m", arch=space.active(arch))
    meta = json.loads((tmp_path / "m" / "config.json").read_text())
    assert meta["model"] == "mobilenetv3" and space.key(space.validate(meta["arch"])) == space.key(arch)
    for loaded in (load_model(tmp_path / "m"), MobileNetV3.from_pretrained(tmp_path / "m")):
        assert loaded.config == model.config and next(loaded.parameters()).dtype == torch.float64
        img = _images(space, 3, 7)
        torch.testing.assert_close(loaded.eval()(img)[0], model(img)[0], rtol=0, atol=0)
    assert space.family.model_settings(model) == {"img_size": 28, "in_chans": 1, "num_classes": 10}


# ----------------------------------------------------------------------------- a depth per stage in the space


def test_a_depth_per_stage():
    space = load_space("ofa-mbv3")
    assert space.depth_dims == tuple(f"depth_{s}" for s in range(1, 6)) and space.max_layers == 20
    assert [list(r) for r in space.stages] == [list(range(4 * s, 4 * s + 4)) for s in range(5)]
    assert space.num_architectures() == (9**2 + 9**3 + 9**4) ** 5  # about 2e19, OFA's count
    with pytest.raises(AttributeError, match="depth per stage"):
        space.depth_dim
    arch = space.sample(random.Random(0))
    arch.update(depth_1=2, depth_2=4, depth_3=3, depth_4=2, depth_5=4)
    active = space.active_layers(arch)
    assert active == [0, 1, 4, 5, 6, 7, 8, 9, 10, 12, 13, 16, 17, 18, 19]
    compact = space.active(arch)
    assert len(compact["kernel_size"]) == 15 and compact["kernel_size"] == [arch["kernel_size"][i] for i in active]
    restored = space.validate(compact)
    assert [restored["kernel_size"][i] for i in active] == compact["kernel_size"]
    assert all(restored["kernel_size"][i] == 3 for i in set(range(20)) - set(active))
    assert space.key(restored) == space.key(arch)
    other = {**arch, "kernel_size": list(arch["kernel_size"])}
    other["kernel_size"][2] = 10 - other["kernel_size"][2]  # an inactive block of stage 1
    assert space.key(other) == space.key(arch)
    assert space.describe(arch).startswith("depth_1=2 depth_2=4 depth_3=3 depth_4=2 depth_5=4 kernel_size=")
    with pytest.raises(ConfigError, match=r"one value per layer \(20\) or per active layer \(15 active"):
        space.validate({**compact, "expand_ratio": compact["expand_ratio"] + [3]})


def test_mutation_grows_a_stage_with_fresh_blocks():
    space = load_space("ofa-mbv3")
    rng = random.Random(1)
    parent = space.smallest()
    grown = [c for c in (space.mutate(parent, rng, p_layer=0.0, p_global=1.0) for _ in range(100)) if c["depth_3"] == 4]
    assert grown and any(c["kernel_size"][10] != 3 for c in grown)
    assert all(c["kernel_size"][i] == 3 for c in grown for i in space.active_layers(parent))
    seen = {space.key(space.sample(rng)) for _ in range(200)}
    assert len(seen) == 200


def _raw(**fixed):
    raw = space_to_dict(load_space("mbv3-tiny"))
    raw["fixed"].update(fixed)
    return raw


@pytest.mark.parametrize("change, words", [
    ({"fixed": {"stage_strides": [2, 2]}}, ["fixed.stage_strides has 2 entries", "3"]),
    ({"fixed": {"stage_acts": ["relu", "gelu", "h_swish"]}}, ["stage_acts", "'gelu'", "h_swish"]),
    ({"fixed": {"stage_se": [False, 1, True]}}, ["stage_se", "true or false"]),
    ({"fixed": {"stage_widths": []}}, ["stage_widths", "1 to 64"]),
    ({"fixed": {"stage_widths": [16, 24]}}, ["unknown choice", "depth_3"]),
    ({"fixed": {"stage_widths": [16, 24, 24, 32]}}, ["missing choice", "depth_4"]),
    ({"per_layer": {"kernel_size": [3, 4]}}, ["kernel_size", "odd"]),
    ({"choices": {"depth_2": [1, 2.5]}}, ["depth_2", "integers"]),
    ({"per_layer": {"expand_ratio": [3, 3.1]}}, ["expand_ratio", "same width"]),
    ({"fixed": {"width_mult": 0.0}}, ["width_mult", "(0, 64]"]),
])
def test_malformed_space_is_refused_with_a_clear_error(change, words):
    raw = _raw()
    for section, entries in change.items():
        raw[section].update(entries)
    with pytest.raises(ConfigError) as err:
        space_from_dict(raw, source="bad.yaml")
    for word in ["bad.yaml", *words]:
        assert word in str(err.value)


def test_batch_norm_widths_must_be_distinct():
    with pytest.raises(ValueError, match="distinct"):
        EntangledBatchNorm2d([8, 8])
