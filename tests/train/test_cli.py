"""The command line end to end: retraining an architecture from inherited weights, export, evaluate."""

import json
from pathlib import Path

import pytest
import torch

from tangle_ray import load_space
from tangle_ray.cli import main
from tangle_ray.evaluate import evaluate_on_split
from tangle_ray.folders import save_supernet
from tangle_ray.models.gpt import GPT

pytestmark = pytest.mark.ray


def test_retrain_with_inherited_weights_starts_from_the_supernet(local_ray, tmp_path, data_dir, capsys):
    space = load_space("gpt-nano")
    torch.manual_seed(5)
    supernet = space.build_supernet()
    save_supernet(supernet, tmp_path / "supernet")
    arch = {"n_layer": 2, "n_embd": 48, "n_head": [4, 2, 8, 8], "mlp_ratio": [3, 2, 4, 4]}
    (tmp_path / "arch.json").write_text(json.dumps(arch))
    code = main(["retrain", "--arch", str(tmp_path / "arch.json"), "--init", "inherit", "--supernet",
                 str(tmp_path / "supernet"), "space=gpt-nano", f"data.dir={data_dir}", "steps=2",
                 "global_batch_size=4", "micro_batch_size=4", "zero_stage=0", "optimizer.lr=1e-12",
                 "optimizer.min_lr=1e-12", "optimizer.warmup_steps=1", f"run.storage_path={tmp_path / 'runs'}",
                 "run.name=retrain", "checkpoint_every=2", "eval_every=2", "eval_samples=2"])
    assert code == 0
    out = capsys.readouterr().out
    assert "test:       loss " in out
    run = tmp_path / "runs" / "retrain"
    retrained = GPT.from_pretrained(run / "export" / "model")
    inherited = supernet.extract(arch)
    for (name, a), b in zip(retrained.state_dict().items(), inherited.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-9, msg=name)
    scores = json.loads((run / "test_scores.json").read_text())
    assert scores["params"] == space.param_count(arch)
    again = evaluate_on_split(data_dir, "test", model=run / "export" / "model")
    assert scores["loss"] == again["loss"]


def test_cli_reports_user_errors_without_a_traceback(capsys):
    recipe = Path(__file__).resolve().parents[2] / "recipes" / "runs" / "tiny-cpu-tanglenas.yaml"
    assert main(["search", str(recipe), "zero_stage=7"]) == 2
    assert "zero_stage = 7 does not exist" in capsys.readouterr().err


def test_settings_may_follow_options(capsys):
    recipe = Path(__file__).resolve().parents[2] / "recipes" / "runs" / "tiny-cpu-tanglenas.yaml"
    assert main(["search", str(recipe), "--no-export", "zero_stage=7"]) == 2  # reached the run config
    assert "zero_stage = 7 does not exist" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["search", str(recipe), "--no-export", "--bogus"])
