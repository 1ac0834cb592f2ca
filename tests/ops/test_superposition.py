"""The heart of the project: superposed, single-path and extracted models agree exactly."""

import random

import pytest
import torch

from tangle_ray import load_space
from tangle_ray.keyed import keyed_generator
from tangle_ray.mixers import darts, drnas
from tangle_ray.models.gpt import GPT


@pytest.fixture(scope="module")
def space():
    return load_space("gpt-micro")


@pytest.fixture(scope="module")
def supernet(space):
    torch.manual_seed(0)
    net = space.build_supernet().double().eval()
    with torch.no_grad():  # random biases and norms, so a slicing mistake cannot hide behind zeros and ones
        for name, p in net.net.named_parameters():
            if "ln_" in name or name.endswith("bias"):
                p.add_(0.3 * torch.randn_like(p))
    return net


def _one_hot(space, arch):
    return {k: v.double() for k, v in space.one_hot(arch).items()}


@pytest.mark.parametrize("seed", range(6))
def test_one_hot_superposition_equals_single_path_equals_extracted(space, supernet, seed):
    rng = random.Random(seed)
    arch = space.sample(rng)
    B, T = rng.randint(1, 4), rng.randint(1, space.fixed["block_size"])
    idx = torch.randint(0, space.fixed["vocab_size"], (B, T))
    targets = torch.randint(0, space.fixed["vocab_size"], (B, T))
    sup, sup_loss = supernet(idx, targets, weights=_one_hot(space, arch))
    mix, _ = supernet(idx, targets, weights=_one_hot(space, arch), output_mix=True)
    path, path_loss = supernet(idx, targets, arch=arch)
    model = supernet.extract(arch).eval()
    ext, ext_loss = model(idx, targets)
    torch.testing.assert_close(sup, path, rtol=1e-5, atol=1e-9)
    torch.testing.assert_close(mix, path, rtol=1e-5, atol=1e-9)
    torch.testing.assert_close(ext, path, rtol=1e-5, atol=1e-9)
    torch.testing.assert_close(sup_loss, ext_loss, rtol=1e-5, atol=0)
    assert path_loss == ext_loss


def test_soft_superposition_is_the_mix_of_slices_for_one_layer(space, supernet):
    """Away from one-hot weights, every op still computes sum_c w_c pad(op_c(x)) of its own slices."""
    block = supernet.net.transformer.h[0]
    D = max(space.dims["n_embd"].values)
    x = torch.randn(2, 5, D, dtype=torch.float64)
    w_e = torch.tensor([0.2, 0.3, 0.5], dtype=torch.float64)
    w_r = torch.tensor([0.6, 0.1, 0.3], dtype=torch.float64)
    w_mlp = torch.outer(w_e, w_r).flatten()
    fc = block.mlp.c_fc
    torch.testing.assert_close(fc(x, w_mlp), fc(x, w_mlp, output_mix=True))
    ln = block.ln_1
    expected = sum(w * torch.nn.functional.pad(ln(x[..., :e], width=e), (0, D - e))
                   for w, e in zip(w_e, ln.widths))
    torch.testing.assert_close(ln(x, w_e), expected)


def test_superposition_runs_the_largest_op_once(space, supernet):
    """One matmul per linear layer, whatever the number of choices (the output-mixing baseline: one per choice)."""
    calls = []
    handle = torch.nn.functional.linear
    def counting_linear(*args, **kwargs):
        calls.append(1)
        return handle(*args, **kwargs)
    idx = torch.randint(0, 97, (2, 8))
    W = {k: v.double() for k, v in darts(supernet.alphas).items()}
    torch.nn.functional.linear = counting_linear
    try:
        supernet(idx, weights=W)
        n_super = len(calls)
        calls.clear()
        supernet(idx, weights=W, output_mix=True)
        n_mix = len(calls)
    finally:
        torch.nn.functional.linear = handle
    L = space.max_layers
    assert n_super == 4 * L + 1
    assert n_mix > 3 * n_super


def test_gradients_match_finite_differences_for_every_arch_parameter(space):
    torch.manual_seed(1)
    supernet = space.build_supernet().double().eval()
    with torch.no_grad():
        for a in supernet.arch_parameters():
            a.normal_(0, 0.5)
    idx = torch.randint(0, 97, (2, 6))
    targets = torch.randint(0, 97, (2, 6))

    def loss_fn():
        return supernet(idx, targets, weights=darts(supernet.alphas))[1]

    loss_fn().backward()
    eps = 1e-6
    for name, a in supernet.alphas.items():
        assert a.grad is not None and a.grad.abs().sum() > 0, name
        for flat in random.Random(0).sample(range(a.numel()), min(4, a.numel())):
            with torch.no_grad():
                a.view(-1)[flat] += eps
                up = loss_fn().item()
                a.view(-1)[flat] -= 2 * eps
                down = loss_fn().item()
                a.view(-1)[flat] += eps
            numeric = (up - down) / (2 * eps)
            assert a.grad.view(-1)[flat].item() == pytest.approx(numeric, rel=1e-4, abs=1e-9), name


def test_drnas_gradient_reaches_every_arch_parameter(space):
    supernet = space.build_supernet()
    idx = torch.randint(0, 97, (2, 8))
    W = drnas(supernet.alphas, keyed_generator(0, 1))
    supernet(idx, idx, weights=W)[1].backward()
    for name, a in supernet.alphas.items():
        rows = a.grad.reshape(-1, a.size(-1)).abs().sum(-1)
        assert (rows > 0).all(), name


@pytest.mark.parametrize("seed", range(3))
def test_param_count_equals_extracted_model(space, supernet, seed):
    arch = space.sample(random.Random(100 + seed))
    assert supernet.extract(arch).num_parameters() == space.param_count(arch)


def test_supernet_weight_count_equals_largest(space, supernet):
    assert sum(p.numel() for p in supernet.weight_parameters()) == space.param_count(space.largest())


def test_extracted_model_round_trips(space, supernet, tmp_path):
    arch = space.sample(random.Random(7))
    model = supernet.extract(arch).eval()
    model.save_pretrained(tmp_path / "m", arch=arch)
    loaded = GPT.from_pretrained(tmp_path / "m").double().eval()
    idx = torch.randint(0, 97, (3, 9))
    torch.testing.assert_close(loaded(idx)[0], model(idx)[0], rtol=0, atol=0)
    assert loaded.lm_head.weight is loaded.transformer.wte.weight


def test_single_path_can_touch_every_parameter(space):
    """SPOS under ZeRO: a shallow path still gives every weight a (zero) gradient."""
    supernet = space.build_supernet().train()
    arch = space.smallest()
    idx = torch.randint(0, 97, (2, 8))
    _, loss = supernet(idx, idx, arch=arch, keep_all_params=True)
    loss.backward()
    assert all(p.grad is not None for p in supernet.weight_parameters())
    _, plain = supernet(idx, idx, arch=arch)
    assert loss.item() == pytest.approx(plain.item())


def test_any_batch_and_length_up_to_the_context(space, supernet):
    W = {k: v.double() for k, v in darts(supernet.alphas).items()}
    for B, T in [(1, 1), (5, 3), (2, space.fixed["block_size"])]:
        logits, _ = supernet(torch.randint(0, 97, (B, T)), weights=W)
        assert logits.shape == (B, T, space.fixed["padded_vocab_size"])
    with pytest.raises(ValueError, match="context"):
        supernet(torch.zeros(1, space.fixed["block_size"] + 1, dtype=torch.long), weights=W)


def test_compiled_superposition_equals_eager(space):
    """The fused (torch.compile) superposition computes the same logits and gradients as eager."""
    torch.manual_seed(3)
    eager = space.build_supernet()
    compiled = space.build_supernet()
    compiled.load_state_dict(eager.state_dict())
    compiled.net.compile_superposition()
    idx = torch.randint(0, 97, (2, 12))
    W = {k: v.detach() for k, v in darts(eager.alphas).items()}
    (a, la), (b, lb) = eager(idx, idx, weights=W), compiled(idx, idx, weights=W)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    la.backward()
    lb.backward()
    for (name, p), q in zip(eager.net.named_parameters(), compiled.net.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("bias, seed", [(True, 0), (False, 1), (True, 2)])
def test_masked_linear_gradients_match_finite_differences_and_autograd(bias, seed):
    """The masked linear keeps neither the mask nor the masked weight for backward and rebuilds both there: its
    gradients (input, weight, bias, mixing weights) against float64 finite differences and against autograd
    through the plain expression ``F.linear(x, W * M, b * m)``."""
    from tangle_ray.ops.linear import EntangledLinear, MaskedLinear

    torch.manual_seed(seed)
    combos = [(hid, e) for e in (3, 5, 7) for hid in (4, 6)]  # (width, ratio) pairs: never rank one
    layer = EntangledLinear(7, 6, bias, combos).double()
    out_ind, in_ind = layer.out_ind.double(), layer.in_ind.double()
    x = torch.randn(2, 3, 7, dtype=torch.float64, requires_grad=True)
    w = torch.softmax(torch.randn(len(combos), dtype=torch.float64), 0).requires_grad_()
    inputs = (x, layer.weight, layer.bias, w)
    assert torch.autograd.gradcheck(lambda x, W, b, w: MaskedLinear.apply(x, W, b, w, out_ind, in_ind), inputs)

    grad_out = torch.randn(2, 3, 6, dtype=torch.float64)
    ours = torch.autograd.grad(MaskedLinear.apply(x, layer.weight, layer.bias, w, out_ind, in_ind), [
        t for t in inputs if t is not None], grad_out)
    mask = out_ind.t() @ (w[:, None] * in_ind)
    bias = None if layer.bias is None else layer.bias * (w @ out_ind)
    plain = torch.nn.functional.linear(x, layer.weight * mask, bias)
    reference = torch.autograd.grad(plain, [t for t in inputs if t is not None], grad_out)
    for a, b in zip(ours, reference, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("bias, seed, widths", [(True, 0, [3, 5, 8]), (False, 1, [5, 8, 3])])
def test_superposed_layer_norm_gradients_match_finite_differences_and_autograd(bias, seed, widths):
    """The superposed layer norm keeps x and each width's statistics and computes its gradients from per-width
    prefix sums: against float64 finite differences, and against autograd through sum_e w_e pad(LN_e(x[:e]))
    (widths in any order; the input off zero mean, where centring matters)."""
    from tangle_ray.ops.norm import EntangledLayerNorm, SuperposedLayerNorm

    torch.manual_seed(seed)
    norm = EntangledLayerNorm(8, widths, bias).double()
    with torch.no_grad():
        norm.weight.normal_()
        if bias:
            norm.bias.normal_()
    x = (torch.randn(2, 3, 8, dtype=torch.float64) * 2 + 5).requires_grad_()
    w = torch.softmax(torch.randn(3, dtype=torch.float64), 0).requires_grad_()
    ind = norm.ind.double()
    inputs = [t for t in (x, w, norm.weight, norm.bias) if t is not None]

    def ours(x, w, weight, bias=None):
        return SuperposedLayerNorm.apply(x, w, ind, weight, bias, widths, norm.eps)

    assert torch.autograd.gradcheck(ours, inputs)
    grad_out = torch.randn(2, 3, 8, dtype=torch.float64)
    got = torch.autograd.grad(ours(*inputs), inputs, grad_out)
    plain = sum(w[i] * torch.nn.functional.pad(torch.nn.functional.layer_norm(
        x[..., :e], (e,), norm.weight[:e], None if norm.bias is None else norm.bias[:e], norm.eps), (0, 8 - e))
        for i, e in enumerate(widths))
    torch.testing.assert_close(ours(*inputs), plain, rtol=1e-12, atol=1e-12)
    for a, b in zip(got, torch.autograd.grad(plain, inputs, grad_out), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
