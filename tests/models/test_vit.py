"""The ViT (AutoFormer) family: superposed, single-path and extracted models agree exactly; counts; files."""

import functools
import json
import random

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from tangle_ray.errors import ConfigError
from tangle_ray.models import load_model, load_space, space_from_dict
from tangle_ray.models.vit import ViT, classify_loss, hidden_width, patchify
from tangle_ray.ops.attention import fixed_head_attention
from tangle_ray.space import space_to_dict


@functools.cache
def _net(name: str):
    """The float64 supernet of a space, with random biases, norms, tokens and tables, so that a slicing mistake
    cannot hide behind zeros and ones."""
    space = load_space(name)
    torch.manual_seed(0)
    net = space.family.build_net(space).double().eval()
    with torch.no_grad():
        for key, p in net.named_parameters():
            if "norm" in key or key.endswith("bias"):
                p.add_(0.3 * torch.randn_like(p))
            elif "table" in key or "token" in key or "pos_embed" in key:
                p.normal_()
    return space, net


@pytest.fixture(scope="module")
def space():
    return load_space("vit-micro")


@pytest.fixture(scope="module")
def net():
    return _net("vit-micro")[1]


def _images(space, batch: int, seed: int) -> torch.Tensor:
    f = space.fixed
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, f["in_chans"], f["img_size"], f["img_size"], generator=gen, dtype=torch.float64)


def _soft(space, seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {k: torch.rand(shape, generator=gen, dtype=torch.float64).softmax(-1)
            for k, shape in space.arch_shapes().items()}


@pytest.mark.parametrize("name, seed", [("vit-micro", s) for s in range(6)] + [("vit-tiny", s) for s in range(2)])
def test_one_hot_superposition_equals_single_path_equals_extracted(name, seed):
    """vit-micro reads the class token, vit-tiny pools the patch tokens; both have relative positions."""
    space, net = _net(name)
    rng = random.Random(seed)
    arch = space.sample(rng)
    batch = rng.randint(1, 4)
    img, targets = _images(space, batch, seed), torch.randint(0, space.fixed["num_classes"], (batch,))
    sup, sup_loss = net(img, targets, weights=space.one_hot(arch, torch.float64))
    path, path_loss = net(img, targets, arch=arch)
    ext, ext_loss = net.extract(arch).eval()(img, targets)
    torch.testing.assert_close(sup, path, rtol=0, atol=1e-12)
    torch.testing.assert_close(ext, path, rtol=0, atol=1e-12)
    torch.testing.assert_close(sup_loss, ext_loss, rtol=0, atol=1e-12)
    torch.testing.assert_close(path_loss, ext_loss, rtol=0, atol=1e-12)


@pytest.mark.parametrize("name, seed", [("vit-micro", s) for s in range(4)] + [("vit-tiny", 0)])
def test_one_hot_output_mixing_equals_single_path(name, seed):
    """The weight-sharing baseline (``output_mix=True``: every choice on its own slice, outputs mixed) is the
    sliced subnet at one-hot weights. At soft weights its linear patch embedding still equals superposition,
    while attention (softmax after the mix vs before it) makes the two nets differ."""
    space, net = _net(name)
    rng = random.Random(100 + seed)
    arch = space.sample(rng)
    batch = rng.randint(1, 4)
    img, targets = _images(space, batch, seed), torch.randint(0, space.fixed["num_classes"], (batch,))
    mix, mix_loss = net(img, targets, weights=space.one_hot(arch, torch.float64), output_mix=True)
    path, path_loss = net(img, targets, arch=arch)
    torch.testing.assert_close(mix, path, rtol=0, atol=1e-12)
    torch.testing.assert_close(mix_loss, path_loss, rtol=0, atol=1e-12)
    soft = _soft(space, seed)
    patches = patchify(img, space.fixed["patch_size"])
    torch.testing.assert_close(net.embed(patches, soft["embed_dim"], output_mix=True),
                               net.embed(patches, soft["embed_dim"]), rtol=0, atol=1e-12)
    assert not torch.allclose(net(img, weights=soft, output_mix=True)[0], net(img, weights=soft)[0])


def test_one_attention_serves_every_head_count(space, net):
    """Soft weights: one attention of the largest head count equals TangleNAS's mix of one attention per
    head count, sum_e w_e pad(proj_e(sum_h w_h pad(attn_h(qkv))))."""
    attn = net.blocks[0].attn
    D, d = max(space.dims["embed_dim"].values), space.fixed["head_dim"]
    x = torch.randn(2, 17, D, dtype=torch.float64)
    w_e = torch.tensor([0.2, 0.3, 0.5], dtype=torch.float64)
    w_h = torch.tensor([0.6, 0.1, 0.3], dtype=torch.float64)
    qkv = attn.c_attn(x, torch.outer(w_e, w_h).flatten())
    rel = (attn.rel_k, attn.rel_v)
    inner = max(attn.heads) * d
    z = sum(wh * F.pad(fixed_head_attention(qkv[..., : 3 * h * d], d, causal=False, rel=rel), (0, inner - h * d))
            for wh, h in zip(w_h, attn.heads))
    expected = sum(we * F.pad(F.linear(z, attn.c_proj.weight[:e], attn.c_proj.bias[:e]), (0, D - e))
                   for we, e in zip(w_e, attn.widths))
    torch.testing.assert_close(attn(x, w_e, w_h), expected, rtol=0, atol=1e-12)


def test_every_parameter_gets_a_gradient_in_every_mode(space):
    torch.manual_seed(1)
    net = space.family.build_net(space, drop_path=0.2, dropout=0.1).train()
    img, targets = _images(space, 3, 1).float(), torch.tensor([0, 3, 4])
    net(img, targets, weights={k: v.float() for k, v in _soft(space, 1).items()})[1].backward()
    for name, p in net.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    net.zero_grad(set_to_none=True)
    shallow = space.smallest()
    _, loss = net(img, targets, arch=shallow, keep_all_params=True)
    loss.backward()
    assert all(p.grad is not None for p in net.parameters())
    model = net.extract(space.largest()).train()
    model(img, targets)[1].backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name


def test_soft_targets_and_class_ids_give_the_same_loss():
    logits = torch.randn(5, 7)
    ids = torch.tensor([0, 6, 2, 2, 1])
    torch.testing.assert_close(classify_loss(logits, F.one_hot(ids, 7).float()), classify_loss(logits, ids))


@pytest.mark.parametrize("name", ["vit-micro", "vit-tiny"])
def test_param_count_equals_extracted_model(name):
    space = load_space(name)
    net = space.family.build_net(space)
    for seed in range(3):
        arch = space.sample(random.Random(10 + seed))
        assert net.extract(arch).num_parameters() == space.param_count(arch)
    assert sum(p.numel() for p in net.parameters()) == space.param_count(space.largest())


@pytest.mark.parametrize("name", ["autoformer-t", "autoformer-s", "autoformer-b"])
def test_param_count_equals_standalone_model_of_autoformer_spaces(name):
    space = load_space(name)
    for seed in range(2):
        arch = space.sample(random.Random(seed))
        with torch.device("meta"):
            model = space.family.build_model(space, arch)
        assert model.num_parameters() == space.param_count(arch)


def test_autoformer_b_published_subnet_has_53_7m_parameters():
    space = load_space("autoformer-b")
    heads = [9, 9, 9, 9, 9, 10, 9, 9, 10, 9, 10, 9, 9, 10]
    ratios = [3.5, 3.5, 4, 3.5, 4, 3.5, 3.5, 3, 4, 4, 3, 4, 3, 3.5]
    arch = {"embed_dim": 576, "depth": 14, "num_heads": heads + [9, 9], "mlp_ratio": ratios + [4, 4]}
    n = space.param_count(arch)
    assert n == pytest.approx(53.7e6, rel=0.01)
    with torch.device("meta"):
        assert space.family.build_model(space, arch).num_parameters() == n


def test_hidden_width_truncates_as_autoformer():
    assert hidden_width(216, 3.5) == 756 and hidden_width(7, 2.5) == 17 and hidden_width(10, 1.5) == 15


@pytest.mark.parametrize("relative_position", [True, False])
def test_flops_count_every_matmul(relative_position):
    raw = space_to_dict(load_space("vit-tiny"))
    raw["fixed"]["relative_position"] = relative_position
    space = space_from_dict(raw)
    arch = space.sample(random.Random(3))
    model = space.family.build_model(space, arch).eval()
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad(), sdpa_kernel(SDPBackend.MATH):  # the math kernel's matmuls are counted
        model(torch.randn(1, 1, 28, 28))
    assert counter.get_total_flops() == space.flops(arch)


def test_extracted_model_round_trips(space, net, tmp_path):
    arch = space.sample(random.Random(7))
    model = net.extract(arch).eval()
    model.save_pretrained(tmp_path / "m", arch=arch)
    meta = json.loads((tmp_path / "m" / "config.json").read_text())
    assert meta["model"] == "vit" and meta["arch"] == arch
    for loaded in (load_model(tmp_path / "m"), ViT.from_pretrained(tmp_path / "m")):
        assert loaded.config == model.config and next(loaded.parameters()).dtype == torch.float64
        img = _images(space, 3, 7)
        torch.testing.assert_close(loaded.eval()(img)[0], model(img)[0], rtol=0, atol=0)


def test_space_checks_name_file_key_and_value():
    raw = space_to_dict(load_space("vit-tiny"))
    raw["fixed"]["img_size"] = 30
    with pytest.raises(ConfigError, match=r"bad\.yaml: fixed\.img_size = 30 is not divisible by fixed\.patch_size = 4; "
                                          r"allowed patch sizes: \[1, 2, 3, 5, 6, 10, 15, 30\]"):
        space_from_dict(raw, source="bad.yaml")


def test_weight_decay_spares_tokens_tables_norms_and_biases(space, net):
    params = {f"{m}.{n}".lstrip("."): (p, mod) for m, mod in net.named_modules()
              for n, p in mod.named_parameters(recurse=False)}
    decayed = sorted(k for k, (p, mod) in params.items() if not space.family.no_weight_decay(k, p, mod))
    assert decayed and all(k.endswith("weight") and "norm" not in k for k in decayed)
    assert not any(k.endswith(("cls_token", "pos_embed", "table_v", "table_h")) for k in decayed)


@pytest.mark.parametrize("name, n", [("vit-micro", 17), ("vit-micro", 9), ("vit-tiny", 50)])
def test_relative_positions_against_the_tables_equal_the_embeddings(name, n):
    """Logits and values computed against the two tables (a gather, a scatter-add) equal the products with the
    materialised [n, n, d] embeddings R[i, j] = T_v[index_v[i, j]] + T_h[index_h[i, j]], gradients included, to
    float64 round-off (the sums run in another order)."""
    from tangle_ray.ops.attention import RelativePosition2D

    space = load_space(name)
    f = space.fixed
    grid = f["img_size"] // f["patch_size"]
    torch.manual_seed(n)
    rel = RelativePosition2D(f["head_dim"], grid, f["max_relative_position"]).double()
    with torch.no_grad():
        for p in rel.parameters():
            p.normal_()
    q = torch.randn(2, 3, n, f["head_dim"], dtype=torch.float64, requires_grad=True)
    a = torch.softmax(torch.randn(2, 3, n, n, dtype=torch.float64), -1).requires_grad_()
    R = rel.table_v[rel.index_v[:n, :n]] + rel.table_h[rel.index_h[:n, :n]]
    ours = rel(q).sum() * 1.3 + rel(a, values=True).square().sum()
    reference = torch.einsum("bhid,ijd->bhij", q, R).sum() * 1.3 + torch.einsum("bhij,ijd->bhid", a, R).square().sum()
    torch.testing.assert_close(ours, reference, rtol=1e-12, atol=1e-12)
    inputs = [q, a, rel.table_v, rel.table_h]
    for g, h in zip(torch.autograd.grad(ours, inputs), torch.autograd.grad(reference, inputs), strict=True):
        torch.testing.assert_close(g, h, rtol=1e-12, atol=1e-12)
