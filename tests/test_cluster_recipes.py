"""Every file in recipes/cluster/ checked offline: launcher configs against Ray's own schema, KubeRay manifests
against the fields the operator requires, and every tangle-ray command they run against the CLI and config checks."""

from __future__ import annotations

import copy
import shlex
from pathlib import Path

import pytest
import yaml

from tangle_ray.campaign.config import load_campaign
from tangle_ray.campaign.plan import build_plan
from tangle_ray.cli import build_parser
from tangle_ray.methods import METHODS
from tangle_ray.train.config import load_config
from tangle_ray.tune.config import load_search_config

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "recipes" / "cluster"
LAUNCHER = sorted(CLUSTER.glob("*.yaml"))
KUBERAY = sorted((CLUSTER / "kuberay").glob("*.yaml"))
TRAIN_COMMANDS = {m.command for m in METHODS.values()}


def test_every_cluster_file_is_covered():
    slurm = CLUSTER / "slurm" / "tangle-ray.sbatch"  # tests/test_slurm.py runs it under a real SLURM
    covered = {*LAUNCHER, *KUBERAY, slurm, CLUSTER / "README.md", CLUSTER / "Dockerfile"}
    assert {p for p in CLUSTER.rglob("*") if p.is_file()} <= covered
    assert {p.stem for p in LAUNCHER} == {"aws", "gcp"}


@pytest.mark.parametrize("path", LAUNCHER, ids=lambda p: p.stem)
def test_launcher_configs_pass_rays_schema(path):
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load(path.read_text())
    validate_config(prepare_config(copy.deepcopy(config)))
    gpu = config["available_node_types"]["gpu_8x_h100"]
    assert gpu["min_workers"] == 0 and gpu["max_workers"] >= 1  # autoscaling GPU nodes
    assert any("environment.yml" in c for c in config["setup_commands"])
    bad = {**config, "max_wokers": 1}
    with pytest.raises(Exception, match="max_wokers"):
        validate_config(prepare_config(bad))


def _check_pod(template: dict, gpus: bool) -> None:
    (container,) = template["spec"]["containers"]
    assert container["image"] and container["resources"]["limits"]
    if gpus:
        resources = container["resources"]
        assert resources["limits"]["nvidia.com/gpu"] == resources["requests"]["nvidia.com/gpu"]
        assert any(t["key"] == "nvidia.com/gpu" for t in template["spec"]["tolerations"])


def _check_cluster_spec(spec: dict) -> None:
    _check_pod(spec["headGroupSpec"]["template"], gpus=False)
    assert spec["workerGroupSpecs"]
    for group in spec["workerGroupSpecs"]:
        assert group["groupName"] and 0 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        _check_pod(group["template"], gpus=True)


def _commands(entrypoint: str) -> list[list[str]]:
    return [shlex.split(part) for part in entrypoint.split("&&")]


@pytest.mark.parametrize("path", KUBERAY, ids=lambda p: p.stem)
def test_kuberay_manifests_have_what_the_operator_requires(path, tmp_path):
    doc = yaml.safe_load(path.read_text())
    assert doc["apiVersion"] == "ray.io/v1" and doc["metadata"]["name"]
    if doc["kind"] == "RayCluster":
        _check_cluster_spec(doc["spec"])
        return
    spec = doc["spec"]
    assert doc["kind"] == "RayJob" and spec["shutdownAfterJobFinishes"] is True and spec["ttlSecondsAfterFinished"] > 0
    assert yaml.safe_load(spec["runtimeEnvYAML"])["working_dir"]
    _check_cluster_spec(spec["rayClusterSpec"])
    for argv in _commands(spec["entrypoint"]):  # every command parses and its config validates
        assert argv[0] == "tangle-ray"
        args, extra = build_parser().parse_known_args(argv[1:])
        overrides = [*args.overrides, *extra]
        if args.command in TRAIN_COMMANDS:
            load_config(ROOT / args.run_file, overrides)
        elif args.command == "tune":
            load_search_config(ROOT / args.search_file, overrides)
        else:
            assert args.command == "campaign"
            config, base = load_campaign(ROOT / args.campaign_file, overrides)
            build_plan(config, base, args.campaign_file)
