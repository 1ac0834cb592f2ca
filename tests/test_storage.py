"""Runs on object storage, against a real S3 API (moto's server on 127.0.0.1, reached through plain ``s3://``
URIs and ``AWS_ENDPOINT_URL_S3``): a search with 2 workers on 2 simulated nodes whose only shared place is the
bucket (plus each node's cache), then export, tune and evaluate from the bucket; a resume after a killed worker
equals the uninterrupted run."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from tangle_ray import storage
from tangle_ray.cli import main
from tangle_ray.data.text.prepare import prepare_text
from tangle_ray.data.text.sources import TextSource
from tangle_ray.data.text.synth import write_demo_corpus
from tangle_ray.errors import ConfigError
from tangle_ray.train.config import load_config
from tangle_ray.train.runner import run_training
from tests.train.states import assert_same_numbers

pytestmark = pytest.mark.ray
REPO = Path(__file__).resolve().parents[1]
RUN = REPO / "recipes" / "runs" / "tiny-cpu-tanglenas.yaml"
SHORT = ["steps=6", "checkpoint_every=3", "log_every=3", "eval_every=3", "eval_samples=8", "dropout=0.1"]


@pytest.fixture(scope="module")
def bucket(tmp_path_factory):
    """A bucket on a local S3 server, with the environment every process (and Ray node) reaches it by."""
    boto3 = pytest.importorskip("boto3")
    server_module = pytest.importorskip("moto.server")
    server = server_module.ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    _, port = server.get_host_and_port()
    env = {"AWS_ENDPOINT_URL_S3": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "test",
           "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1",
           "TANGLE_RAY_CACHE": str(tmp_path_factory.mktemp("cache"))}
    before = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    client = boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL_S3"], region_name="us-east-1")
    client.create_bucket(Bucket="runs")
    yield client
    for k, v in before.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    server.stop()


@pytest.fixture(scope="module")
def tokens(bucket, tmp_path_factory) -> str:
    """The demo corpus tokenized once and copied to the bucket (data prepared once to shared storage)."""
    root = tmp_path_factory.mktemp("data")
    corpus = write_demo_corpus(root / "raw", n_train=300, n_valid=40, seed=0)
    storage.push(prepare_text(TextSource(kind="jsonl", path=str(corpus)), root / "tokens"), "s3://runs/data/tokens")
    return "s3://runs/data/tokens"


def _keys(client, prefix: str) -> set[str]:
    pages = client.get_paginator("list_objects_v2").paginate(Bucket="runs", Prefix=prefix)
    return {o["Key"] for page in pages for o in page.get("Contents", [])}


def test_uris_are_checked():
    for uri, message in (("ftp://x/y", r"scheme 'ftp' is not supported"), ("s3:///runs", r"expected s3://bucket")):
        with pytest.raises(ConfigError, match=message):
            load_config(RUN, ["data.dir=x", f"run.storage_path={uri}"])


def test_search_export_tune_evaluate_on_the_bucket_across_two_nodes(bucket, tokens, tmp_path, monkeypatch):
    import ray
    from ray.cluster_utils import Cluster

    monkeypatch.chdir(tmp_path)  # nothing may land in the working folder
    os.environ["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] = "0.2"
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    cluster.add_node(num_cpus=1)
    try:
        ray.init(address=cluster.address, log_to_driver=False)
        common = [f"data.dir={tokens}", "run.storage_path=s3://runs/runs", *SHORT]
        whole = run_training(load_config(RUN, [*common, "run.name=whole"]))
        cut = run_training(load_config(RUN, [*common, "run.name=cut", "inject_failure_at_step=4",
                                             "max_failures=1"]))
        assert_same_numbers(cut, whole)  # resumed from the checkpoint in the bucket after the killed worker
        nodes = json.loads((whole.checkpoint / "trainer_state.json").read_text())["nodes"]
        assert len(set(nodes)) == 2  # the two workers ran on the two nodes

        keys = _keys(bucket, "runs/whole/")
        for name in ("run_config.yaml", "summary.md", "export/supernet/supernet.safetensors",
                     "export/model/model.safetensors", "export/arch.json", "progress.log"):
            assert f"runs/whole/{name}" in keys, name
        assert any(k.startswith("runs/whole/checkpoint_") and k.endswith("trainer_state.json") for k in keys)

        assert main(["export", "s3://runs/runs/whole", "--out", "s3://runs/exports/whole"]) == 0
        assert "exports/whole/supernet/manifest.json" in _keys(bucket, "exports/whole/")
        search = REPO / "recipes" / "tune" / "tiny-cpu-random.yaml"
        assert main(["tune", str(search), "supernet=s3://runs/exports/whole/supernet", "data.dir=s3://runs/data/tokens",
                     "run.storage_path=s3://runs/searches", "random.num_trials=3", "eval.samples=8"]) == 0
        searched = _keys(bucket, "searches/")
        assert any(k.endswith("leaderboard.md") for k in searched) and any(k.endswith("leaderboard.csv")
                                                                            for k in searched)
    finally:
        ray.shutdown()
        cluster.shutdown()

    result = storage.localize("s3://runs/runs/whole/export/model", "--model")
    assert main(["evaluate", "--data", "s3://runs/data/tokens", "--model", "s3://runs/runs/whole/export/model",
                 "--samples", "8"]) == 0
    assert result.is_relative_to(Path(os.environ["TANGLE_RAY_CACHE"]))
    assert list(tmp_path.iterdir()) == []


def test_scaling_grid_on_the_bucket_reruns_nothing_from_an_empty_cache(bucket, tokens, tmp_path, monkeypatch, capsys):
    """A scaling folder on the bucket: its points' records, tables and report land there; with the local cache
    gone (another machine), a rerun reads the records from the bucket and runs nothing."""
    import ray

    monkeypatch.chdir(tmp_path)
    argv = ["scale", str(REPO / "recipes" / "scaling" / "tiny-cpu.yaml"), "--out", "s3://runs/scaling/tiny",
            f"settings.data.dir={tokens}", "tokens=256", "grid.space=[gpt-pico]", "grid.workers=[1]",
            "grid.zero_stage=[0]"]
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        assert main(argv) == 0
        keys = _keys(bucket, "scaling/tiny/")
        assert {f"scaling/tiny/{name}" for name in ("points.csv", "scale.json", "report.md")} <= keys
        assert any(k.endswith("/stage.json") for k in keys) and any("/run/checkpoint_" in k for k in keys)
        shutil.rmtree(os.environ["TANGLE_RAY_CACHE"])
        capsys.readouterr()
        assert main(argv) == 0
        assert "1 of 1 points done before this run; 0 to run" in capsys.readouterr().err
    finally:
        ray.shutdown()
    assert list(tmp_path.iterdir()) == []
