"""Claims of docs/fidelity.md: where tangle_ray follows TangleNAS (automl/TangleNAS) and where it departs.

Functions named ``reference_*`` transcribe the reference code (search_spaces/nanoGPT/...) line for line, minus
dropout and CUDA, so a claim about it is checked against its own arithmetic.
"""

import copy
import math
import random
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from torch import nn

from tangle_ray import load_space
from tangle_ray.keyed import keyed_generator
from tangle_ray.mixers import drnas
from tangle_ray.models.gpt import EntangledGPT
from tangle_ray.ops.norm import EntangledLayerNorm
from tangle_ray.train.config import TrainConfig
from tangle_ray.train.deepspeed import param_groups, weight_optimizer

REPO = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- layer norm


def reference_mixed_layer_norm(ln: EntangledLayerNorm, x, weights):
    """MixedLayerNormV2.forward (mixed_layer_norm.py), superposition branch."""
    D = ln.weight.shape[0]
    weights_mix, bias_mix = 0, 0
    for i, e in enumerate(ln.widths):
        weights_mix = weights_mix + weights[i] * F.pad(ln.weight[:e], (0, D - e))
        bias_mix = None if ln.bias is None else bias_mix + weights[i] * F.pad(ln.bias[:e], (0, D - e))
    return F.layer_norm(x, weights_mix.shape, weight=weights_mix, bias=bias_mix, eps=ln.eps)


def pre_change_layer_norm(ln: EntangledLayerNorm, x, w):
    """EntangledLayerNorm.forward's superposition before the ``reference`` option (commit 6769985): each
    width's statistics by ``var_mean``."""
    var_mean = [torch.var_mean(x[..., :e], -1, unbiased=False) for e in ln.widths]
    var = torch.stack([v for v, _ in var_mean], -1)
    mean = torch.stack([m for _, m in var_mean], -1)
    rstd = torch.rsqrt(var + ln.eps)
    ind, w = ln.ind.to(x.dtype), w.to(x.dtype)
    scale = (w * rstd) @ ind
    shift = (w * mean * rstd) @ ind
    y = (x * scale - shift) * ln.weight
    return y if ln.bias is None else y + ln.bias * (w @ ind)


@pytest.fixture
def norm():
    torch.manual_seed(0)
    ln = EntangledLayerNorm(24, [8, 12, 24], bias=True)
    with torch.no_grad():
        ln.weight.add_(0.3 * torch.randn(24))
        ln.bias.add_(0.3 * torch.randn(24))
    return ln


def test_default_layer_norm_equals_the_per_width_statistics_to_round_off(norm):
    """The default superposition's statistics come from prefix sums (one pass) since 2026-12; they agree with
    ``var_mean`` per width to float32 round-off (measured: 2.4e-7 here) and float64 round-off (8.9e-16)."""
    x, w = torch.randn(3, 5, 24), torch.tensor([0.2, 0.5, 0.3])
    assert not norm.reference
    torch.testing.assert_close(norm(x, w), pre_change_layer_norm(norm, x, w), rtol=1e-6, atol=1e-6)
    x64, w64, norm64 = x.double(), w.double(), copy.deepcopy(norm).double()
    torch.testing.assert_close(norm64(x64, w64), pre_change_layer_norm(norm64, x64, w64), rtol=1e-13, atol=1e-13)
    sliced = F.layer_norm(x[..., :12], (12,), norm.weight[:12], norm.bias[:12])
    assert torch.equal(norm(x[..., :12], width=12), sliced)


def test_reference_layer_norm_is_mixed_layer_norm_v2_and_differs_below_the_largest_width(norm):
    x, w = torch.randn(3, 5, 24, dtype=torch.float64), torch.tensor([0.2, 0.5, 0.3], dtype=torch.float64)
    norm.double()
    default = norm(x, w)
    norm.reference = True
    torch.testing.assert_close(norm(x, w), reference_mixed_layer_norm(norm, x, w), rtol=1e-12, atol=1e-12)
    for i, e in enumerate(norm.widths):  # one-hot, on an input that is zero beyond e (as in the supernet)
        xe = x * (torch.arange(24) < e)
        one_hot = F.one_hot(torch.tensor(i), 3).double()
        sliced = F.layer_norm(xe[..., :e], (e,), norm.weight[:e], norm.bias[:e])
        got = norm(xe, one_hot)[..., :e]
        assert torch.allclose(got, sliced) == (e == 24)
    assert not torch.allclose(norm(x, w), default)


def test_one_hot_supernet_with_the_reference_norm_is_the_extracted_model_only_at_the_largest_width():
    """bench/fidelity.py in small: rel. logit error of the one-hot supernet against its extracted model."""
    space = load_space("gpt-nano")
    torch.manual_seed(0)
    net = EntangledGPT(space).double().eval()
    idx = torch.randint(0, space.fixed["vocab_size"], (1, 16))
    rng = random.Random(0)
    errors = {}
    for e in space.dims["n_embd"].values:
        arch = {**space.sample(rng), "n_embd": e}
        w = {k: v.double() for k, v in space.one_hot(arch).items()}
        with torch.no_grad():
            ext = net.extract(arch).eval()(idx)[0]
            for reference in (False, True):
                for m in net.modules():
                    if isinstance(m, EntangledLayerNorm):
                        m.reference = reference
                errors[e, reference] = float((net(idx, weights=w)[0] - ext).norm() / ext.norm())
    assert all(errors[e, False] < 1e-8 for e in (32, 48, 64))
    assert errors[64, True] < 1e-8 and errors[48, True] > 0.05 and errors[32, True] > 0.2


# ----------------------------------------------------------------------------- attention


def reference_mixed_attention(x, weights, heads, widths, B, T):
    """MixedAttnHeadEmbed.forward (mixed_attn_head_embed.py), superposition branch, no dropout."""
    D = max(widths)
    max_head_dim = D // min(heads)
    mask = torch.tril(torch.ones(T, T)).view(1, 1, T, T)

    def forward_attention(k, q, v):
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))
        att = F.softmax(att.masked_fill(mask == 0, float("-inf")), dim=-1)
        return (att @ v).transpose(1, 2).contiguous().view(B, T, -1)

    q_m, k_m, v_m = x.split(D, dim=2)
    out, l_ = 0, 0
    for h in heads:
        k_mix, q_mix, v_mix = 0, 0, 0
        for e in widths:
            k, q, v = (t[:, :, :e].view(B, T, h, e // h).transpose(1, 2) for t in (k_m, q_m, v_m))
            k_mix = k_mix + weights[l_] * F.pad(k, (0, max_head_dim - k.shape[-1]))
            q_mix = q_mix + weights[l_] * F.pad(q, (0, max_head_dim - q.shape[-1]))
            v_mix = v_mix + weights[l_] * F.pad(v, (0, max_head_dim - v.shape[-1]))
            l_ += 1
        out_curr = forward_attention(k_mix, q_mix, v_mix)
        out = out + F.pad(out_curr, (0, D - out_curr.shape[-1]))  # a negative pad crops
    return out


def test_reference_attention_keeps_six_heads_scaled_by_1_over_sqrt_128():
    """TinyStories space: heads (6, 8, 12), widths (384, 576, 768). One-hot on 12 heads at width 768: the
    reference pads each 64-wide head to 128, scales by 1/sqrt(128), and the padded 12 x 128 = 1536 columns
    are cropped to 768, so only heads 0-5 reach the output projection (at columns 128 i .. 128 i + 63)."""
    heads, widths, B, T, D = [6, 8, 12], [384, 576, 768], 1, 5, 768
    torch.manual_seed(0)
    x = torch.randn(B, T, 3 * D, dtype=torch.float64)
    weights = torch.zeros(9, dtype=torch.float64)
    weights[2 * 3 + 2] = 1.0  # (12 heads, width 768) in the reference's head-major combi order
    got = reference_mixed_attention(x, weights, heads, widths, B, T)
    q, k, v = (t.view(B, T, 12, 64).transpose(1, 2) for t in x.split(D, dim=2))
    heads_out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=128**-0.5).transpose(1, 2)
    expected = torch.zeros(B, T, 6, 128, dtype=torch.float64)
    expected[..., :64] = heads_out[:, :, :6]
    torch.testing.assert_close(got, expected.reshape(B, T, D))
    weights[:] = 0
    weights[0 * 3 + 2] = 1.0  # 6 heads of 128 at width 768: the standard layer
    q, k, v = (t.view(B, T, 6, 128).transpose(1, 2) for t in x.split(D, dim=2))
    six = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, T, D)
    torch.testing.assert_close(reference_mixed_attention(x, weights, heads, widths, B, T), six)


def reference_mixed_qkv(weight, x, weights, widths):
    """MixedEmbeddingAttention.forward (mixed_embedding_attn.py), superposition branch, no bias."""
    D, mix = max(widths), 0
    for i, e in enumerate(widths):
        w = weight[: e * 3, :e]
        mix = mix + weights[i] * F.pad(w, (0, D - w.shape[-1], 0, 3 * D - w.shape[-2]))
    return F.linear(x, mix)


def test_reference_qkv_superposition_leaves_small_widths_without_values():
    """Width e takes rows [:3e] of the (q; k; v) weight, but attention splits the output at D: at e = 384
    the value rows (from 2D = 1536 on) are all outside [:3e], at e = 576 only 3e - 2D = 192 of them inside.
    (The reference's argmax path, GDAS's, instead splits the sliced output at e: v = rows [2e, 3e).)"""
    widths, D = [384, 576, 768], 768
    torch.manual_seed(0)
    weight = torch.randn(3 * D, D, dtype=torch.float64)
    for i, (e, live) in enumerate(zip(widths, (0, 192, 768))):
        x = torch.randn(1, 3, D, dtype=torch.float64) * (torch.arange(D) < e)
        v = reference_mixed_qkv(weight, x, F.one_hot(torch.tensor(i), 3).double(), widths).split(D, -1)[2]
        assert (v[..., :live] != 0).all() and (v[..., live:e] == 0).all()


def test_gdas_hard_sample_gives_every_choice_a_gradient():
    """tangle_ray runs GDAS's one-hot sample through the superposition, which is linear in each mixing weight,
    so the choices not drawn get gradients too; the reference (GDASMixOpV2) runs the drawn op alone."""
    space = load_space("gpt-micro")
    torch.manual_seed(0)
    net = EntangledGPT(space).double()
    W = {k: v.double().requires_grad_() for k, v in space.one_hot(space.smallest()).items()}
    idx = torch.randint(0, space.fixed["vocab_size"], (2, 8))
    net(idx, idx, weights=W)[1].backward()
    assert (W["n_embd"].grad != 0).all() and (W["n_layer"].grad != 0).all()


# ----------------------------------------------------------------------------- weight decay


def reference_decay_split(net: nn.Module) -> tuple[set[str], set[str]]:
    """GPT.configure_optimizers (model_search.py): decay Linear weights; exempt biases and LayerNorm and
    Embedding weights; the tied LM head is exempt as the token embedding (named_parameters' first name)."""
    decay, no_decay = set(), set()
    for mn, m in net.named_modules():
        for pn, _ in m.named_parameters(recurse=False):
            fpn = f"{mn}.{pn}" if mn else pn
            if pn.endswith("bias"):
                no_decay.add(fpn)
            elif pn.endswith("weight") and isinstance(m, nn.Linear):
                decay.add(fpn)
            elif pn.endswith("weight") and isinstance(m, (nn.LayerNorm, EntangledLayerNorm, nn.Embedding)):
                no_decay.add(fpn)
    names = dict(net.named_parameters())
    return decay & names.keys(), no_decay & names.keys()


def _group_names(net: nn.Module, groups) -> tuple[set[str], set[str]]:
    name = {id(p): n for n, p in net.named_parameters()}
    by_decay = {g["weight_decay"] > 0: {name[id(p)] for p in g["params"]} for g in groups}
    return by_decay.get(True, set()), by_decay.get(False, set())


def test_weight_decay_on_linear_weights_only_as_in_the_reference():
    """Rule: decay the weight matrices of linear layers (q/k/v, attention and MLP projections); exempt biases,
    layer norms, the token and position embeddings, and the LM head, which is the tied token embedding."""
    space = load_space("gpt-nano")
    net = EntangledGPT(space)
    decay, no_decay = _group_names(net, param_groups(net, 0.1, space.family.no_weight_decay))
    linear = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
    assert decay == {f"transformer.h.{i}.{m}.weight" for i in range(4) for m in linear}
    assert no_decay == {"transformer.wte.weight", "transformer.wpe.weight", "transformer.ln_f.weight"} | {
        f"transformer.h.{i}.{ln}.weight" for i in range(4) for ln in ("ln_1", "ln_2")
    }
    assert (decay, no_decay) == reference_decay_split(net)
    assert net.lm_head.weight is net.transformer.wte.weight
    model = net.extract(space.largest())  # the standalone model: the same rule, the same names
    assert _group_names(model, param_groups(model, 0.1, space.family.no_weight_decay)) == (decay, no_decay)
    micro = load_space("gpt-micro")  # biases on
    net = EntangledGPT(micro)
    decay, no_decay = _group_names(net, param_groups(net, 0.1, micro.family.no_weight_decay))
    assert (decay, no_decay) == reference_decay_split(net) and any(n.endswith("bias") for n in no_decay)
    opt = weight_optimizer(net, TrainConfig(), micro.family.no_weight_decay)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0]
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(net.parameters()))


# ----------------------------------------------------------------------------- DrNAS


def test_drnas_is_a_fresh_dirichlet_of_elu_plus_one_per_key():
    """DRNASSampler.sample: Dirichlet(ELU(alpha) + 1).rsample(), one per forward (here: per generator key)."""
    alpha = torch.tensor([[-2.0, 0.0, 1.5]])
    samples = torch.cat([drnas({"a": alpha}, keyed_generator(0, j))["a"] for j in range(4000)])
    concentration = F.elu(alpha) + 1
    torch.testing.assert_close(samples.mean(0), (concentration / concentration.sum())[0], atol=0.01, rtol=0)
    assert len({tuple(s.tolist()) for s in samples}) == 4000


# ----------------------------------------------------------------------------- recipes


def test_every_run_recipe_states_its_weight_architecture_split():
    """Paper-scale searches use the reference's train_portion 0.5; retraining holds out little (the reference
    retrains on all of train.bin), from a folder of its own (a prepared folder keeps its split)."""
    fractions = {}
    for path in sorted((REPO / "recipes" / "runs").glob("*.yaml")):
        text = path.read_text()
        data = yaml.safe_load(text)["data"]
        fractions[path.stem] = data["valid_fraction"], data["dir"]
        line = next(ln for ln in text.splitlines() if ln.strip().startswith("valid_fraction:"))
        assert "#" in line, f"{path.name}: explain the split in a comment"
    search = (0.5, "/shared/data/tinystories")
    assert fractions["tinystories-tanglenas"] == fractions["tinystories-spos"] == search
    fraction, folder = fractions["tinystories-retrain"]
    assert fraction <= 0.05 and folder != "/shared/data/tinystories"


def test_paper_scale_search_recipes_score_on_200_batches_of_12():
    for path in sorted((REPO / "recipes" / "tune").glob("tinystories-*.yaml")):
        assert yaml.safe_load(path.read_text())["eval"]["samples"] == 200 * 12, path.name

