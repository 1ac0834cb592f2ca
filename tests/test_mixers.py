import pytest
import torch

from tangle_ray import ConfigError, load_space
from tangle_ray.mixers import MIXERS, entropy, gdas_tau, get_mixer, keyed_generator


@pytest.fixture
def alphas():
    space = load_space("gpt-micro")
    torch.manual_seed(0)
    return {k: torch.randn(shape, requires_grad=True) for k, shape in space.arch_shapes().items()}


@pytest.mark.parametrize("name", sorted(MIXERS))
def test_every_mixer_gives_probability_rows(alphas, name):
    W = get_mixer(name)(alphas, keyed_generator(0, 0), 0.5)
    for key, w in W.items():
        assert w.shape == alphas[key].shape
        torch.testing.assert_close(w.sum(-1), torch.ones(w.shape[:-1]))
        assert (w >= 0).all()
    if name in ("gdas", "spos", "argmax"):
        assert all(((w == 0) | (w == 1)).all() for w in W.values())


@pytest.mark.parametrize("name", ["drnas", "gdas", "spos"])
def test_random_mixers_are_keyed_not_stateful(alphas, name):
    mixer = get_mixer(name)
    a = mixer(alphas, keyed_generator(3, 7))
    torch.manual_seed(123)  # process-local state must not matter
    b = mixer(alphas, keyed_generator(3, 7))
    c = mixer(alphas, keyed_generator(3, 8))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a) or name == "spos"


def test_drnas_rows_are_independent_and_differentiable(alphas):
    W = get_mixer("drnas")(alphas, keyed_generator(1))
    rows = W["n_head"]
    assert not torch.equal(rows[0], rows[1])
    sum(w[..., 0].sum() for w in W.values()).backward()  # reparameterised: gradients reach the alphas
    assert alphas["n_embd"].grad is not None


def test_gdas_straight_through_gradient_and_annealing(alphas):
    W = get_mixer("gdas")(alphas, keyed_generator(2), 0.0)
    (W["n_embd"] * torch.arange(3.0)).sum().backward()
    assert alphas["n_embd"].grad.abs().sum() > 0
    assert gdas_tau(0.0) == 10.0 and gdas_tau(1.0) == pytest.approx(0.1)


def test_unknown_mixer_names_the_allowed_ones():
    with pytest.raises(ConfigError, match="darts.*drnas"):
        get_mixer("enas")


def test_entropy_of_uniform_rows_is_log_n(alphas):
    zeros = {k: torch.zeros_like(v) for k, v in alphas.items()}
    assert entropy(zeros) == pytest.approx(torch.log(torch.tensor(3.0)).item())
