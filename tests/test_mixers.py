import pytest
import torch

from tangle_ray import ConfigError, load_space
from tangle_ray.keyed import keyed_generator
from tangle_ray.mixers import GDAS_SCHEDULES, MIXERS, entropy, gdas, gdas_tau, get_mixer


@pytest.fixture
def alphas():
    space = load_space("gpt-micro")
    torch.manual_seed(0)
    return {k: torch.randn(shape, requires_grad=True) for k, shape in space.arch_shapes().items()}


@pytest.mark.parametrize("name", sorted(MIXERS))
def test_every_mixer_gives_probability_rows(alphas, name):
    W = get_mixer(name)(alphas, keyed_generator(0, 0), step=50, steps=100)
    for key, w in W.items():
        assert w.shape == alphas[key].shape
        torch.testing.assert_close(w.sum(-1), torch.ones(w.shape[:-1]))
        assert (w >= 0).all()
    if name in ("gdas", "uniform", "argmax"):
        assert all(((w == 0) | (w == 1)).all() for w in W.values())


@pytest.mark.parametrize("name", ["drnas", "gdas", "uniform"])
def test_random_mixers_are_keyed_not_stateful(alphas, name):
    mixer = get_mixer(name)
    a = mixer(alphas, keyed_generator(3, 7))
    torch.manual_seed(123)  # process-local state must not matter
    b = mixer(alphas, keyed_generator(3, 7))
    c = mixer(alphas, keyed_generator(3, 8))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a) or name == "uniform"


def test_drnas_rows_are_independent_and_differentiable(alphas):
    W = get_mixer("drnas")(alphas, keyed_generator(1))
    rows = W["n_head"]
    assert not torch.equal(rows[0], rows[1])
    sum(w[..., 0].sum() for w in W.values()).backward()  # reparameterised: gradients reach the alphas
    assert alphas["n_embd"].grad is not None


def test_gdas_straight_through_gradient(alphas):
    W = get_mixer("gdas")(alphas, keyed_generator(2), step=0, steps=10)
    (W["n_embd"] * torch.arange(3.0)).sum().backward()
    assert alphas["n_embd"].grad.abs().sum() > 0


def test_gdas_reference_schedule_steps_down_by_0_1_every_100_steps_whatever_the_run_length():
    """TangleNAS train_search.py: GDASSampler taus (0.1, 10) over 100 "epochs", advanced before the loop
    and at every step divisible by eval_interval = 100 (also step 0): tau = 10 - 0.1 (step // 100 + 1)."""
    for steps in (200, 6000, 50_000):
        taus = [gdas_tau(s, steps) for s in (0, 99, 100, 199, 5999, 9799, 9800, 20_000)]
        assert taus == pytest.approx([9.9, 9.9, 9.8, 9.8, 4.0, 0.2, 0.1, 0.1])


def test_gdas_linear_schedule_is_the_old_one_and_schedules_are_bound_by_get_mixer(alphas):
    assert gdas_tau(0, 6000, "linear") == 10.0 and gdas_tau(3000, 6000, "linear") == pytest.approx(5.05)
    assert gdas_tau(6000, 6000, "linear") == pytest.approx(0.1)
    assert set(GDAS_SCHEDULES) == {"reference", "linear"}
    # tau matters only through the soft sample's gradient: compare gradients at step 3000 of 6000
    grads = {}
    for schedule in GDAS_SCHEDULES:
        a = {k: v.detach().clone().requires_grad_() for k, v in alphas.items()}
        W = get_mixer("gdas", gdas_schedule=schedule)(a, keyed_generator(5), step=3000, steps=6000)
        (W["n_embd"] * torch.arange(3.0)).sum().backward()
        grads[schedule] = a["n_embd"].grad
        b = {k: v.detach().clone().requires_grad_() for k, v in alphas.items()}
        V = gdas(b, keyed_generator(5), step=3000, steps=6000, schedule=schedule)
        (V["n_embd"] * torch.arange(3.0)).sum().backward()
        assert torch.equal(b["n_embd"].grad, grads[schedule])
    assert not torch.allclose(grads["reference"], grads["linear"])  # tau 6.9 vs 5.05
    with pytest.raises(ConfigError, match="gdas_schedule.*reference.*linear"):
        get_mixer("gdas", gdas_schedule="cosine")


def test_mixers_take_step_and_steps_by_keyword_only(alphas):
    """The old call mixer(alphas, gen, progress) must fail loudly, not read progress as a step."""
    for name in MIXERS:
        with pytest.raises(TypeError):
            get_mixer(name)(alphas, keyed_generator(0), 0.5)


def test_unknown_mixer_names_the_allowed_ones():
    with pytest.raises(ConfigError, match="darts.*drnas"):
        get_mixer("enas")


def test_entropy_of_uniform_rows_is_log_n(alphas):
    zeros = {k: torch.zeros_like(v) for k, v in alphas.items()}
    assert entropy(zeros) == pytest.approx(torch.log(torch.tensor(3.0)).item())
