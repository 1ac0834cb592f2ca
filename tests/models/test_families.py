"""Every registered model family, in each mode (as timm tests every model): forward and backward reach every
parameter, and one-hot superposition = single path = extracted standalone model, in float64."""

import random

import pytest
import torch

from tangle_ray.folders import unique_tensors
from tangle_ray.keyed import keyed_generator
from tangle_ray.mixers import drnas
from tangle_ray.models import FAMILIES, available_spaces, load_space
from tangle_ray.tasks import get_task


def smallest_space(family: str):
    """The family's space whose largest architecture is smallest (its test space)."""
    spaces = [s for s in map(load_space, available_spaces()) if s.model == family]
    assert spaces, f"family {family!r} has no space file in spaces/"
    return min(spaces, key=lambda s: s.param_count(s.largest()))


@pytest.fixture(params=sorted(FAMILIES))
def space(request):
    return smallest_space(request.param)


def _batch(space, n=2, seed=0):
    return get_task(space.family.task).random_batch(space.fixed, n, torch.Generator().manual_seed(seed))


def _grads_everywhere(module, loss):
    module.zero_grad(set_to_none=True)
    loss.backward()
    params = unique_tensors(dict(module.named_parameters()))
    missing = [name for name, p in module.named_parameters() if name in params and p.grad is None]
    assert not missing, f"no gradient for {missing}"


def test_every_parameter_gets_a_gradient_in_each_mode(space):
    torch.manual_seed(0)
    supernet = space.build_supernet().train()
    x, y = _batch(space)
    weights = drnas(supernet.alphas, keyed_generator(0, 0))
    _grads_everywhere(supernet.net, supernet(x, y, weights=weights)[1])
    arch = space.sample(random.Random(1))
    _grads_everywhere(supernet.net, supernet(x, y, arch=arch, keep_all_params=True)[1])
    model = supernet.extract(arch)
    _grads_everywhere(model, model(x, y)[1])
    assert model.num_parameters() == space.param_count(arch)
    assert sum(t.numel() for t in unique_tensors(supernet.net.state_dict()).values() if t.is_floating_point()) \
        >= space.param_count(space.largest())


def test_one_hot_superposition_equals_single_path_equals_extracted(space):
    torch.manual_seed(0)
    supernet = space.build_supernet(dropout=0.0).double().eval()
    for seed in range(3):
        arch = space.sample(random.Random(seed))
        x, _ = _batch(space, n=3, seed=seed)
        x = x.double() if x.is_floating_point() else x
        superposed = supernet(x, weights=space.one_hot(arch, torch.float64))[0]
        path = supernet(x, arch=arch)[0]
        extracted = supernet.extract(arch).eval()(x)[0]
        torch.testing.assert_close(superposed, path, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(extracted, path, rtol=1e-10, atol=1e-10)
