"""Entangled convolutions and batch norm: superposition is the sum of the choices' zero-padded slices, one-hot
superposition is the single path."""

import pytest
import torch
import torch.nn.functional as F

from tangle_ray.ops.conv import EntangledBatchNorm2d, EntangledConv2d, centred_indicators


def _padded(conv: EntangledConv2d, out: int, inp: int, kernel: int) -> torch.Tensor:
    """The slice of one choice, zero-padded back to the full weight (TangleNAS's padded slice)."""
    full = torch.zeros_like(conv.weight)
    start = (conv.kernel_size[0] - kernel) // 2
    window = full[:out] if conv.depthwise else full[:out, :inp]
    window[..., start:start + kernel, start:start + kernel] = conv.sliced(out, inp, kernel)
    return full


@pytest.mark.parametrize("combos, stride, depthwise", [
    ([(6, 4, 3), (8, 5, 5), (3, 5, 1), (8, 5, 5)], 1, False),  # out, in and kernel vary: the general mask
    ([(6, 5, 1), (8, 5, 1)], 2, False),  # outputs only (an expansion): scaled output channels
    ([(8, 3, 1), (8, 5, 1)], 1, False),  # inputs only (a projection): scaled input channels
    ([(m, m, k) for m in (4, 6, 8) for k in (3, 5)], 2, True),  # depthwise (ratio, kernel) pairs
    ([(4, 4, 5), (8, 8, 5)], 1, True),  # depthwise, one kernel: scaled output channels
])
def test_superposition_is_the_sum_of_padded_slices_and_one_hot_is_the_path(combos, stride, depthwise):
    torch.manual_seed(0)
    n_out, n_in, K = max(o for o, _, _ in combos), max(i for _, i, _ in combos), max(k for _, _, k in combos)
    conv = EntangledConv2d(n_out if depthwise else n_in, n_out, K, stride, combos, depthwise).double()
    x = torch.randn(2, conv.in_channels, 9, 9, dtype=torch.float64)
    w = torch.rand(len(combos), dtype=torch.float64)
    weight = sum(wc * _padded(conv, o, i, k) for wc, (o, i, k) in zip(w, conv.combos))
    expected = F.conv2d(x, weight, None, stride, K // 2, groups=conv.groups)
    torch.testing.assert_close(conv(x, w), expected, rtol=0, atol=1e-12)
    for c, (o, i, k) in enumerate(conv.combos):
        one_hot = F.one_hot(torch.tensor(c), len(combos)).double()
        inp = o if depthwise else i
        path = conv(x[:, :inp], out=o, inp=i, kernel=k)
        assert path.shape[1] == o and path.shape[-1] == (9 - 1) // stride + 1
        torch.testing.assert_close(conv(x * (torch.arange(conv.in_channels) < inp)[:, None, None], one_hot)[:, :o],
                                   path, rtol=0, atol=1e-12)


def test_kernel_windows_are_centred():
    ind = centred_indicators([1, 3, 5], 5)
    assert ind[0].sum() == 1 and ind[0, 2, 2] == 1
    assert ind[1, 1:4, 1:4].sum() == 9 and ind[1].sum() == 9 and ind[2].sum() == 25
    with pytest.raises(ValueError, match="odd"):
        EntangledConv2d(4, 4, 5, 1, [(4, 4, 4)])


@pytest.mark.parametrize("train", [False, True])
def test_batch_norm_superposes_the_widths_and_keeps_statistics_per_width(train):
    torch.manual_seed(0)
    bn = EntangledBatchNorm2d([3, 5, 8]).double().train(train)
    with torch.no_grad():
        bn.weight.add_(0.3 * torch.randn(8))
        bn.bias.add_(0.3 * torch.randn(8))
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 1.5)
    x = torch.randn(4, 8, 3, 3, dtype=torch.float64)
    w = torch.tensor([0.2, 0.0, 0.8], dtype=torch.float64)
    paths = [EntangledBatchNorm2d([3, 5, 8]).double().train(train) for _ in range(3)]
    for p in paths:
        p.load_state_dict(bn.state_dict())
    expected = sum(wc * F.pad(p(x[:, :e], width=e), (0, 0, 0, 0, 0, 8 - e)) for wc, p, e in zip(w, paths, bn.widths))
    before = bn.running_mean.clone()
    torch.testing.assert_close(bn(x, w), expected, rtol=0, atol=1e-12)
    if train:  # the chosen widths' statistics move as their paths' do; the width with weight 0 keeps its own
        for c, p in enumerate(paths):
            expected = p.running_mean[c] if w[c] else before[c]
            torch.testing.assert_close(bn.running_mean[c], expected, rtol=0, atol=1e-14)
        assert bn.num_batches_tracked.tolist() == [1, 0, 1]
        torch.testing.assert_close(bn.running_var[2], paths[2].running_var[2], rtol=0, atol=1e-14)
    state = bn.sliced_state(5)
    assert state["running_mean"].shape == (5,) and torch.equal(state["running_mean"], bn.running_mean[1, :5])


def test_batch_norm_without_tracking_updates_nothing():
    bn = EntangledBatchNorm2d([2, 4]).train()
    before = {k: v.clone() for k, v in bn.state_dict().items()}
    y = bn(torch.randn(1, 2, 1, 1), width=2, track=False)  # one value per channel: fine without batch statistics
    assert y.shape == (1, 2, 1, 1)
    assert all(torch.equal(v, before[k]) for k, v in bn.state_dict().items())
