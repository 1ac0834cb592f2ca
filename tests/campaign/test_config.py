"""Campaign files: every recipe validates and dry-runs; mistakes are named before Ray starts; identities change
exactly where settings change."""

from __future__ import annotations

from pathlib import Path

import pytest

from tangle_ray.campaign.config import load_campaign
from tangle_ray.campaign.plan import build_plan
from tangle_ray.campaign.run import dry_run, place
from tangle_ray.cli import main
from tangle_ray.errors import ConfigError

RECIPES = sorted((Path(__file__).resolve().parents[2] / "recipes" / "campaigns").glob("*.yaml"))
TINY = next(p for p in RECIPES if p.name == "tiny-cpu.yaml")


def _plan(path: Path, overrides: list[str] = ()):
    config, base = load_campaign(path, list(overrides))
    return config, build_plan(config, base, str(path))


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.stem)
def test_every_recipe_validates_and_dry_runs(recipe, tmp_path, capsys):
    config, plan = _plan(recipe)
    assert len(plan.stages) == len(config.seeds) * (1 + 1 + 2 + 2 * len(config.methods))
    assert main(["campaign", str(recipe), "--dry-run", "--out", str(tmp_path / "c")]) == 0
    out = capsys.readouterr().out
    assert all(f"{s.name} " in out for s in plan.stages) and "device-hours" in out
    assert not (tmp_path / "c").exists()  # a dry run starts and writes nothing


@pytest.mark.parametrize("overrides, words", [
    (["bogus=1"], ["override bogus=1", "unknown setting(s) ['bogus']", "allowed: ['name', 'space', 'data'"]),
    (["methods=[tanglenas,spos-grid]"],
     ["methods = ['tanglenas', 'spos-grid']", "allowed: a non-empty list of ['tanglenas', 'spos-random', 'spos-ev"]),
    (["reference=spos-random", "methods=[tanglenas]"], ["reference = 'spos-random'", "one of the methods"]),
    (["seeds=[0,0]"], ["seeds = [0, 0]", "distinct"]),
    (["seeds=[-1]"], ["seeds[]"]),
    (["stages.search.settings.stepz=3"], ["stages.search", "unknown setting(s) ['stepz']", "allowed"]),
    (["stages.random.settings.random.num_trials=0"], ["stages.random", "random.num_trials = 0", "at least 1"]),
    (["stages.retrain.file=nowhere.yaml"], ["stages.retrain.file = 'nowhere.yaml'", "no such file"]),
    (["stages.tune.file=x"], ["unknown setting(s) ['stages.tune']", "'stages.random'"]),
])
def test_mistakes_name_file_key_value_and_what_is_allowed(overrides, words, capsys):
    assert main(["campaign", str(TINY), "--dry-run", *overrides]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and all(w in err for w in words), err


def test_a_campaign_file_without_a_space_is_refused(tmp_path):
    bare = tmp_path / "c.yaml"
    bare.write_text("name: c\ndata: {dir: x}\n")
    with pytest.raises(ConfigError, match=r"c.yaml: missing setting\(s\) \['space'\]"):
        load_campaign(bare)


def test_identities_change_only_downstream_of_a_changed_setting(tmp_path):
    ids = {p.name: p.identity for p in place(_plan(TINY)[1], tmp_path)}
    longer = {p.name: p.identity for p in place(_plan(TINY, ["stages.supernet.settings.steps=31"])[1], tmp_path)}
    changed = {n for n in ids if ids[n] != longer[n]}
    assert changed == {f"s{s}-{n}" for s in (0, 1) for n in (
        "supernet", "random", "evolution", "spos-random-finetune", "spos-random-retrain", "spos-evolution-finetune",
        "spos-evolution-retrain")}
    more = {p.name: p.identity for p in place(_plan(TINY, ["seeds=[0,1,2]"])[1], tmp_path)}
    assert {n: more[n] for n in ids} == ids and len(more) == 30  # a new seed adds its stages, keeps the rest
    config, plan = _plan(TINY)
    table = dry_run(config, plan, tmp_path)
    assert table.count(" new ") == 20
