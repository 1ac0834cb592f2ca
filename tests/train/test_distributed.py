"""Distributed supernet training on a local Ray cluster (CPU, gloo): equal to one process, resumable."""

import json
import random

import pytest
import torch

from tangle_ray.folders import load_supernet
from tangle_ray.models.gpt import GPT
from tangle_ray.train.checkpoint import latest_checkpoint, read_run_state
from tangle_ray.train.runner import run_training
from tests.train.states import assert_same_numbers, assert_same_state, final_state

pytestmark = pytest.mark.ray
_runs = {}


def _run(tiny_config, key, **overrides):
    """Each distinct run once per session: one TorchTrainer.fit() checks several properties."""
    if key not in _runs:
        _runs[key] = run_training(tiny_config(**overrides))
    return _runs[key]


@pytest.mark.parametrize("mixer", ["drnas"])  # DARTS: the same path with a deterministic mixing
def test_two_workers_equal_one_worker_for_the_same_global_batch(local_ray, tiny_config, mixer):
    """With dropout 0.2: 2 workers x 2 accumulation steps = 1 worker x 4 (2x the accumulation), micro-batch
    by micro-batch, because every dropout mask is keyed by (seed, step, micro-batch index, purpose)."""
    one = _run(tiny_config, f"{mixer}-w1-z2", mixer=mixer, scaling__num_workers=1, zero_stage=2)
    two = _run(tiny_config, f"{mixer}-w2-z2", mixer=mixer, scaling__num_workers=2, zero_stage=2)
    assert_same_numbers(one, two)
    _, a0 = final_state(one)
    assert any(not torch.allclose(a, torch.zeros_like(a), atol=1e-3) for a in a0.values()), "alphas did not move"
    assert [m["step"] for m in two.history.metrics] == [1, 2, 3, 4]


@pytest.mark.parametrize("stage", [0, 1, 3])
def test_zero_stages_agree(local_ray, tiny_config, stage):
    reference = _run(tiny_config, "drnas-w2-z2", mixer="drnas", scaling__num_workers=2, zero_stage=2)
    other = _run(tiny_config, f"drnas-w2-z{stage}", mixer="drnas", scaling__num_workers=2, zero_stage=stage)
    assert_same_state(reference, other, atol=2e-5)


def test_export_of_zero3_run_equals_the_supernet_single_path(local_ray, tiny_config):
    run = _run(tiny_config, "drnas-w2-z3", mixer="drnas", scaling__num_workers=2, zero_stage=3)
    arch = json.loads((run.export_dir / "arch.json").read_text())
    supernet = load_supernet(run.export_dir / "supernet").eval()
    model = GPT.from_pretrained(run.export_dir / "model").eval()
    idx = torch.randint(0, 50257, (3, 64))
    torch.testing.assert_close(model(idx)[0], supernet(idx, arch=arch)[0], rtol=0, atol=0)
    assert model.num_parameters() == supernet.space.param_count(arch)
    for name in ("summary.md", "arch.json", "alphas_mlp_ratio.png", "anytime.png", "alphas.csv", "metrics.csv"):
        assert (run.run_dir / name).is_file(), name
    assert list((run.run_dir / "tensorboard").glob("events.out.tfevents.*"))


@pytest.mark.parametrize("stage", [2, 3])  # the stages that partition gradients
def test_spos_with_changing_depth_runs_under_zero(local_ray, tiny_config, stage):
    run = _run(tiny_config, f"spos-z{stage}", method="spos", scaling__num_workers=2, zero_stage=stage, steps=6)
    assert [m["step"] for m in run.history.metrics] == list(range(1, 7))
    assert all(m["train_loss"] < 11.5 for m in run.history.metrics)
    assert run.arch is None and not (run.export_dir / "model").exists()  # SPOS chooses nothing
    supernet = load_supernet(run.export_dir / "supernet")
    arch = supernet.space.sample(random.Random(stage))
    assert supernet.space.param_count(arch) == supernet.extract(arch).num_parameters()
    assert "Next step" in (run.run_dir / "summary.md").read_text()


def test_spos_two_workers_equal_one_worker_under_zero2(local_ray, tiny_config):
    """Paths are keyed by the global micro-batch index, so the 2 x 2 micro-batches of a step on two workers
    train the same four paths as one worker's four accumulation steps."""
    one = _run(tiny_config, "spos-w1-z2", method="spos", scaling__num_workers=1, zero_stage=2, steps=6,
               run__name="null")  # named by its identity
    two = _run(tiny_config, "spos-z2", method="spos", scaling__num_workers=2, zero_stage=2, steps=6)
    assert_same_numbers(one, two)
    assert one.run_dir.name.startswith("gpt-nano-spos-s0-")
    assert list((one.run_dir / "tensorboard").glob("events.out.tfevents.*")), "events in the run's own folder"
    assert [line.split()[1] for line in (one.run_dir / "progress.log").read_text().splitlines()] == [
        "step"] * 6 and list((one.run_dir / "logs").glob("rank0.log"))


def test_fixed_two_workers_equal_one_worker_with_dropout(local_ray, tiny_config, tmp_path):
    arch = tmp_path / "arch.json"
    arch.write_text(json.dumps({"n_layer": 3, "n_embd": 48, "n_head": [4, 2, 8, 8], "mlp_ratio": [3, 2, 4, 4]}))
    runs = [run_training(tiny_config(method="fixed", arch=str(arch), scaling__num_workers=w, zero_stage=2))
            for w in (1, 2)]
    assert_same_numbers(*runs)
    assert runs[0].history.metrics[-1]["train_loss"] != runs[1].history.metrics[0]["train_loss"]


def test_spos_samples_a_path_per_micro_batch():
    """The reference (model_spos.py) samples a fresh path at every forward: G paths per step, not one."""
    from tangle_ray import load_space
    from tangle_ray.methods.spos import spos_path

    space = load_space("gpt-nano")
    for step in range(5):
        paths = [spos_path(space, 0, step, j) for j in range(4)]  # tiny_config: G = 8 / 2 = 4 micro-batches
        assert len({space.key(p) for p in paths}) == 4
    depths = {spos_path(space, 0, step, 0)["n_layer"] for step in range(6)}
    assert len(depths) > 1  # the SPOS runs above (seed 0, 6 steps) do see different depths


def test_killed_run_resumes_to_the_same_state(local_ray, tiny_config):
    """The run dies after its step-2 checkpoint with no restarts left; rerunning the same command resumes it."""
    uninterrupted = _run(tiny_config, "drnas-w2-z2", mixer="drnas", scaling__num_workers=2, zero_stage=2)
    cfg = tiny_config(mixer="drnas", scaling__num_workers=2, zero_stage=2, inject_failure_at_step=3, max_failures=0)
    with pytest.raises(Exception, match="injected failure"):
        run_training(cfg)
    assert read_run_state(latest_checkpoint(cfg.run_dir()))["step"] == 2
    resumed = run_training(cfg)
    assert [m["step"] for m in resumed.history.metrics] == [1, 2, 3, 4]
    assert_same_state(uninterrupted, resumed, atol=0)


def test_worker_failure_restarts_from_the_last_checkpoint(local_ray, tiny_config):
    uninterrupted = _run(tiny_config, "drnas-w2-z2", mixer="drnas", scaling__num_workers=2, zero_stage=2)
    run = run_training(tiny_config(mixer="drnas", scaling__num_workers=2, zero_stage=2,
                                   inject_failure_at_step=3, max_failures=1))
    assert [m["step"] for m in run.history.metrics] == [1, 2, 3, 4]
    assert_same_state(uninterrupted, run, atol=0)
