"""The README's main command, shortened: a local Ray cluster, the offline corpus, a 2-worker ZeRO-2 search."""

import json

import pytest

from tangle_ray.cli import main

pytestmark = pytest.mark.ray


def test_demo_runs_end_to_end(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path), "steps=4", "log_every=2", "eval_every=2", "checkpoint_every=2"]) == 0
    out = capsys.readouterr().out
    run_dir = next(p for p in tmp_path.iterdir() if p.name.startswith("gpt-nano-drnas-s0-"))  # OUT/<run name>/
    assert f"report:     {run_dir / 'summary.md'}" in out
    arch = json.loads((run_dir / "arch.json").read_text())
    assert json.loads((run_dir / "export" / "arch.json").read_text()) == arch
    summary = (run_dir / "summary.md").read_text()
    assert "gpt-nano" in summary and "ZeRO stage 2" in summary and "2 worker(s)" in summary
    assert f"arch:       {json.dumps(arch)}" in out  # the active layers, as arch.json
    verdict = json.loads((run_dir / "against_random.json").read_text())["against_median"]
    assert verdict["low"] <= verdict["estimate"] <= verdict["high"] and "95% interval [" in summary
    assert f"vs random:  {verdict['verdict']}" in out
