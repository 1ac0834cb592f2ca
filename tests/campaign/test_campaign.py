"""The tiny CPU campaign end to end on a simulated two-node Ray cluster: every stage real, stages overlapping,
a rerun that starts nothing, and a driver killed mid-way whose rerun gives the same results."""

from __future__ import annotations

import csv
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tangle_ray.campaign.config import load_campaign
from tangle_ray.campaign.plan import build_plan
from tangle_ray.campaign.run import run_campaign
from tangle_ray.data.text.prepare import prepare_text
from tangle_ray.data.text.sources import TextSource
from tangle_ray.data.text.synth import write_demo_corpus
from tangle_ray.errors import ClusterError

pytestmark = pytest.mark.ray

RECIPE = Path(__file__).resolve().parents[2] / "recipes" / "campaigns" / "tiny-cpu.yaml"
TIMING = {"wall_s", "device_hours", "inference_ms"}  # measured, so not repeatable
SHORT = [  # the recipe, shortened: every stage still trains, exports, searches and scores for real
    "stages.search.settings.steps=6", "stages.supernet.settings.steps=6", "stages.finetune.settings.steps=2",
    "stages.retrain.settings.steps=4", "test_samples=16",
    *[f"stages.{k}.settings.{s}={v}" for k in ("search", "supernet", "finetune", "retrain")
      for s, v in (("log_every", 2), ("eval_every", 2), ("checkpoint_every", 2), ("eval_samples", 8))],
    "stages.random.settings.random.num_trials=3", "stages.random.settings.eval.samples=8",
    "stages.evolution.settings.evolution={population: 2, generations: 2, parents: 1, mutations: 1, crossovers: 1}",
    "stages.evolution.settings.eval.samples=8",
]


@pytest.fixture(scope="module")
def tokens(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("campaign-data")
    corpus = write_demo_corpus(root / "raw", n_train=300, n_valid=40, seed=0)
    return prepare_text(TextSource(kind="jsonl", path=str(corpus)), root / "tokens")


def _rows(folder: Path) -> list[dict]:
    with (folder / "results.csv").open() as f:
        return list(csv.DictReader(f))


def _scores(rows: list[dict]) -> dict[tuple, str]:
    return {(r["method"], r["seed"], r["stage"], r["metric"]): r["value"] for r in rows if r["metric"] not in TIMING}


def test_campaign_on_two_nodes_overlaps_stages_reports_and_resumes(tokens, tmp_path):
    import ray
    from ray.cluster_utils import Cluster

    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
    config, base = load_campaign(RECIPE, [f"data.dir={tokens}", *SHORT])
    plan = build_plan(config, base, str(RECIPE))
    out = tmp_path / "campaign"
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    cluster.add_node(num_cpus=1)
    try:
        ray.init(address=cluster.address, log_to_driver=False)
        too_big, _ = load_campaign(RECIPE, [f"data.dir={tokens}", "stages.retrain.settings.scaling.num_workers=4",
                                            "stages.retrain.settings.micro_batch_size=4"])
        with pytest.raises(ClusterError, match=r"stage s0-tanglenas-retrain: 4 workers x 1 CPU \(PACK\) do not "
                                              r"fit: at most 2 fit; the cluster has 2 CPU"):
            run_campaign(too_big, build_plan(too_big, base, str(RECIPE)), tmp_path / "refused")
        assert not (tmp_path / "refused" / "stages").exists()  # refused before any stage started

        result = run_campaign(config, plan, out)
        stages = result["stages"]
        assert len(stages) == 20 and all(s["status"] == "done" for s in stages)
        spans = sorted((s["started_at"], s["finished_at"]) for s in stages)
        assert any(b[0] < a[1] for a, b in zip(spans, spans[1:])), "no two stages ran at the same time"
        assert result["stage_wall_s"] > result["wall_s"] > 0  # the overlap the report states

        rows = _rows(out)
        methods, seeds = {"tanglenas", "spos-random", "spos-evolution"}, {"0", "1"}
        assert {(r["method"], r["seed"]) for r in rows} == {(m, s) for m in methods for s in seeds}
        for stage, metrics in {"inherited": {"loss", "perplexity"}, "finetune": {"loss", "perplexity", "inference_ms"},
                               "retrain": {"loss", "perplexity", "inference_ms"},
                               "search": {"params", "macs", "device_hours", "wall_s"}}.items():
            for m in methods:
                for s in seeds:
                    got = {r["metric"] for r in rows if (r["method"], r["seed"], r["stage"]) == (m, s, stage)}
                    assert got == metrics, (m, s, stage)
        assert all(math.isfinite(float(r["value"])) for r in rows)
        spos = {r["value"] for r in rows if r["metric"] == "device_hours" and r["method"] != "tanglenas"}
        assert len(spos) == 4  # RS and ES each count the shared supernet plus their own search
        comparisons = result["comparisons"]
        assert {(c["baseline"], c["stage"], c["metric"]) for c in comparisons} >= {
            (b, "retrain", "loss") for b in ("spos-random", "spos-evolution")}
        for c in comparisons:
            assert 0 <= c["welch_p"] <= 1 and 0 <= c["paired_p"] <= 1 and c["n"] == 2
            assert c["ci_low"] <= c["mean_diff"] <= c["ci_high"]
            if c["ci_low"] <= 0 <= c["ci_high"]:
                assert c["verdict"] == "indistinguishable"
        assert len(result["per_sample"]) == 4 and all(0 <= t["p"] <= 1 and t["n"] == 16 for t in result["per_sample"])
        assert sorted(r["rank"] for r in result["ranks"] if r["seed"] == 0) in ([1, 2, 3], [1, 2.5, 2.5], [1.5, 1.5, 3],
                                                                                [2, 2, 2])
        report = (out / "report.md").read_text()
        for png in ("anytime_wall.png", "anytime_device.png", "score_vs_params.png"):
            assert (out / png).stat().st_size > 10_000 and f"]({png})" in report
        assert "mean ± std" in report and "overlap" in report and "Per-sample paired tests" in report

        records = {p: p.stat().st_mtime_ns for p in out.glob("stages/*/stage.json")}
        start = time.time()
        again = run_campaign(config, plan, out)
        assert time.time() - start < 30 and _rows(out) == rows
        assert {p: p.stat().st_mtime_ns for p in out.glob("stages/*/stage.json")} == records  # nothing reran
        assert again["comparisons"] == comparisons and again["wall_s"] == result["wall_s"]
    finally:
        ray.shutdown()
        cluster.shutdown()

    # a driver killed once its first stage is done; the rerun completes, with the same results (same seed)
    killed = tmp_path / "killed"
    argv = [sys.executable, "-m", "tangle_ray.cli", "campaign", str(RECIPE), "--out", str(killed),
            f"data.dir={tokens}", *SHORT, "seeds=[0]", "methods=[tanglenas]"]
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2"}
    driver = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not list(killed.glob("stages/*/stage.json")) and time.time() < deadline and driver.poll() is None:
        time.sleep(0.5)
    assert driver.poll() is None, "the campaign ended before it could be killed"
    driver.send_signal(signal.SIGKILL)
    driver.wait()
    done_before = {p.parent.name for p in killed.glob("stages/*/stage.json")}
    assert 1 <= len(done_before) < 3
    finished = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=600)
    assert finished.returncode == 0, finished.stderr[-2000:]
    assert f"{len(done_before)} of 3 stages done before this run" in finished.stderr
    resumed = _scores(_rows(killed))
    whole = {k: v for k, v in _scores(rows).items() if k[:2] == ("tanglenas", "0")}
    assert resumed == whole
    assert json.loads((killed / "campaign.json").read_text())["seeds"] == [0]
