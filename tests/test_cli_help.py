"""Every training command lists the settings it accepts with their defaults; `config show` prints a resolved run."""

from pathlib import Path

import pytest
import yaml

from tangle_ray.cli import main
from tangle_ray.methods import METHODS

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "runs" / "tiny-cpu-tanglenas.yaml"


@pytest.mark.parametrize("command", sorted(m.command for m in METHODS.values()))
def test_help_lists_settings_with_defaults(command, capsys):
    with pytest.raises(SystemExit):
        main([command, "--help"])
    out = capsys.readouterr().out
    for line in ("steps = 6000", "optimizer.lr = 0.0005", "scaling.num_workers = 1", "zero_stage = 2", "data.*"):
        assert f"  {line}" in out, line


def test_config_show_prints_the_resolved_config(capsys):
    assert main(["config", "show", str(RECIPE), "steps=7", "optimizer.lr=1e-3"]) == 0
    shown = yaml.safe_load(capsys.readouterr().out)
    assert shown["steps"] == 7 and shown["optimizer"]["lr"] == 1e-3 and shown["space"] == "gpt-nano"
    assert shown["run"]["name"].startswith("gpt-nano-drnas-s0-")
    assert main(["config", "show", str(RECIPE), "stepz=7"]) == 2
    assert "unknown setting(s) ['stepz']" in capsys.readouterr().err
