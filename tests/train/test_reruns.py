"""Reruns and refusals on the driver, without Ray (issue 22): a rerun with fewer steps than its checkpoint
reached is refused, and a run that cannot start (Ray not joined, workers that do not fit) has written nothing,
not even the paper recipe's data lock or its run folder."""

from __future__ import annotations

from pathlib import Path

import pytest

from tangle_ray.errors import ConfigError, DataError
from tangle_ray.train import runner
from tangle_ray.train.config import load_config
from tangle_ray.train.runner import preflight, run_training
from tests.train.test_config import _fake_checkpoint

RECIPES = Path(__file__).resolve().parents[2] / "recipes" / "runs"


def test_a_rerun_with_fewer_steps_than_reached_is_refused(tmp_path, data_dir):
    base = ["space=gpt-nano", f"data.dir={data_dir}", f"run.storage_path={tmp_path}", "run.name=reached-2"]
    cfg = load_config(None, [*base, "steps=1"])
    _fake_checkpoint(cfg.run_dir(), world_size=1, space_choices={})  # a checkpoint of step 2
    with pytest.raises(ConfigError, match=r"already at step 2 .*past steps = 1; rerun with steps >= 2") as e:
        preflight(cfg)
    assert "\n" not in str(e.value)
    preflight(load_config(None, [*base, "steps=2"]))  # as far as it got, or further: resumed
    preflight(load_config(None, [*base, "steps=30"]))


def _refused_by_ray(*args, **kwargs):
    raise ConfigError("--address x: refused for the test")


@pytest.mark.parametrize("recipe", ["tinystories-tanglenas.yaml", "tinystories-spos.yaml"])
def test_a_paper_recipe_refused_here_writes_nothing(recipe, tmp_path, monkeypatch):
    """The paper recipes prepare TinyStories into data.dir (a lock file first) when it is not there: only once
    Ray is joined and the workers fit, so a machine that refuses them is left as it was."""
    monkeypatch.setattr(runner, "connect", _refused_by_ray)
    cfg = load_config(RECIPES / recipe, [f"data.dir={tmp_path / 'data'}", f"run.storage_path={tmp_path / 'runs'}"])
    with pytest.raises(ConfigError, match="refused for the test"):
        run_training(cfg)
    assert list(tmp_path.iterdir()) == []


def test_a_run_that_cannot_join_ray_leaves_no_run_folder(tmp_path, data_dir, monkeypatch):
    monkeypatch.setattr(runner, "connect", _refused_by_ray)
    cfg = load_config(RECIPES / "tiny-cpu-tanglenas.yaml", [f"data.dir={data_dir}",
                                                             f"run.storage_path={tmp_path / 'runs'}"])
    with pytest.raises(ConfigError, match="refused for the test"):
        run_training(cfg)
    assert not (tmp_path / "runs").exists()


def test_checks_that_write_nothing_come_before_ray(tmp_path, data_dir, monkeypatch):
    """A mistake in the data or a run folder of another configuration is said before Ray is started."""
    monkeypatch.setattr(runner, "connect", lambda *a, **k: pytest.fail("Ray would start before the checks"))
    with pytest.raises(ConfigError, match="meta.json"):
        run_training(load_config(None, ["space=gpt-nano", f"data.dir={tmp_path / 'nothing'}",
                                        f"run.storage_path={tmp_path}"]))
    with pytest.raises(DataError, match="vocabulary"):
        run_training(load_config(None, ["space=gpt-micro", f"data.dir={data_dir}", f"run.storage_path={tmp_path}"]))
