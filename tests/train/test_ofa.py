"""OFA progressive shrinking: its phases, paths and distillation, and one run that goes through every phase."""

import random

import pytest
import torch

from tangle_ray import load_space
from tangle_ray.campaign.pipelines import DEFAULT_PIPELINES, PIPELINES
from tangle_ray.errors import ConfigError
from tangle_ray.folders import load_supernet
from tangle_ray.methods.ofa import distillation_loss, phase_of, shrink_order, shrink_path
from tangle_ray.train.config import load_config
from tangle_ray.train.runner import run_training


def test_ofa_order_is_kernel_then_depth_then_expansion():
    assert shrink_order(load_space("mbv3-tiny"), []) == [["kernel_size"], ["depth_1", "depth_2", "depth_3"],
                                                         ["expand_ratio"]]
    assert shrink_order(load_space("gpt-nano"), []) == [["n_head"], ["n_layer"], ["mlp_ratio"], ["n_embd"]]
    assert shrink_order(load_space("gpt-nano"), ["depth", "n_embd"]) == [["n_layer"], ["n_embd"]]
    for bad in (["depth", "depth"], ["kernel_size"]):
        with pytest.raises(ConfigError, match="each of"):
            shrink_order(load_space("gpt-nano"), bad)


def test_phases_cover_the_steps_in_order():
    phases = [phase_of(s, 100, 3, 0.25) for s in range(100)]
    assert phases == sorted(phases) and phases[0] == 0 and phases[-1] == 3
    assert [phases.count(p) for p in range(4)] == [25, 25, 25, 25]
    assert [phase_of(s, 10, 2, 0.0) for s in (0, 4, 5, 9)] == [1, 1, 2, 2]


def test_paths_draw_only_the_elastic_choices():
    space = load_space("mbv3-tiny")
    largest = space.largest()
    assert shrink_path(space, [], 0, 1, 0) == largest
    archs = [shrink_path(space, ["kernel_size"], 0, step, 0) for step in range(20)]
    assert all({k: a[k] for k in a if k != "kernel_size"} == {k: largest[k] for k in a if k != "kernel_size"}
               for a in archs)
    assert len({tuple(a["kernel_size"]) for a in archs}) > 1
    assert shrink_path(space, ["kernel_size"], 0, 3, 1) == shrink_path(space, ["kernel_size"], 0, 3, 1)


def test_distillation_is_the_soft_target_cross_entropy_less_the_teachers_entropy():
    logits = torch.randn(4, 7, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(4, 7, dtype=torch.float64)
    soft_ce = torch.nn.functional.cross_entropy(logits, teacher.softmax(-1))  # OFA's loss
    entropy = -(teacher.softmax(-1) * teacher.log_softmax(-1)).sum(-1).mean()
    kl = distillation_loss(logits, teacher)
    torch.testing.assert_close(kl, soft_ce - entropy)
    (g_kl,), (g_ce,) = torch.autograd.grad(kl, logits), torch.autograd.grad(soft_ce, logits)
    torch.testing.assert_close(g_kl, g_ce)
    assert float(distillation_loss(teacher, teacher)) == pytest.approx(0.0, abs=1e-12)


def test_settings_are_the_methods_own_and_checked():
    cfg = load_config(None, ["method=ofa", "space=mbv3-tiny", "method_settings={largest_share: 0.5}"])
    assert cfg.method_class.settings_of(cfg).largest_share == 0.5
    with pytest.raises(ConfigError, match=r"method_settings.kd_ratio = 'x' must be a number"):
        load_config(None, ["method=ofa", "space=mbv3-tiny", "method_settings={kd_ratio: x}"])
    with pytest.raises(ConfigError, match=r"method_settings.order = \['width'\]"):
        load_config(None, ["method=ofa", "space=mbv3-tiny", "method_settings={order: [width]}"])
    with pytest.raises(ConfigError, match="has no settings of its own"):
        load_config(None, ["method=spos", "method_settings={kd_ratio: 1}"])
    assert {"ofa-random", "ofa-evolution"} <= set(PIPELINES) and not {"ofa-random"} & set(DEFAULT_PIPELINES)


@pytest.mark.ray
def test_a_shrinking_run_goes_through_every_phase_on_two_workers(local_ray, tiny_config):
    run = run_training(tiny_config(method="ofa", steps=8, scaling__num_workers=2,
                                   method_settings="{largest_share: 0.25}"))
    phases = [int(m["shrink_phase"]) for m in run.history.metrics]
    assert phases == [0, 0, 1, 1, 2, 3, 3, 4] and all(m["train_loss"] < 12 for m in run.history.metrics)
    assert run.arch is None and not (run.export_dir / "model").exists()
    supernet = load_supernet(run.export_dir / "supernet")
    arch = supernet.space.sample(random.Random(0))
    assert supernet.space.param_count(arch) == supernet.extract(arch).num_parameters()
    assert "distillation" in (run.run_dir / "summary.md").read_text()
