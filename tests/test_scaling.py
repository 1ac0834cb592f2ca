"""Scaling experiments: FLOP counts against torch's counter, model states against DeepSpeed's estimator, the dry
run, and the tiny CPU recipe for real, first on a local Ray cluster, then on two simulated nodes."""

from __future__ import annotations

import csv
import json
import math
from collections import defaultdict
from pathlib import Path

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from tangle_ray.cli import main
from tangle_ray.data.text.prepare import prepare_text
from tangle_ray.data.text.sources import TextSource
from tangle_ray.data.text.synth import write_demo_corpus
from tangle_ray.errors import ConfigError
from tangle_ray.models import load_space
from tangle_ray.scaling.config import load_scale
from tangle_ray.scaling.plan import build_points
from tangle_ray.scaling.predict import model_state_bytes
from tangle_ray.scaling.run import run_scale

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "scaling" / "tiny-cpu.yaml"
GPU_RECIPE = RECIPE.with_name("gpt-gpu.yaml")


def _counted(fn) -> int:
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:  # attention as counted matmuls
        fn()
    return counter.get_total_flops()


@pytest.mark.parametrize("name, batch", [("gpt-nano", 3), ("gpt-pico", 1), ("gpt-micro", 8)])
def test_flops_match_torch_flop_counter(name, batch):
    """6N plus attention for the largest fixed model, and the superposed step (one attention per head count,
    the mask products), forward and backward, within 5% of torch.utils.flop_counter."""
    space = load_space(name)
    torch.manual_seed(batch)
    idx = torch.randint(0, space.fixed["vocab_size"], (batch, space.fixed["block_size"]))
    model = space.family.build_model(space, space.largest())
    fixed = _counted(lambda: model(idx, idx)[1].backward())
    assert fixed == pytest.approx(3 * batch * space.flops(space.largest()), rel=0.05)
    supernet = space.build_supernet()
    weights = {k: torch.softmax(torch.randn_like(a), -1).requires_grad_() for k, a in supernet.alphas.items()}
    superposed = _counted(lambda: supernet.net(idx, idx, weights=weights)[1].backward())
    assert superposed == pytest.approx(space.superposed_flops(batch, backward=True), rel=0.05)
    assert _counted(lambda: supernet.net(idx, idx, weights=weights)) == pytest.approx(
        space.superposed_flops(batch), rel=0.05)


def test_model_states_follow_deepspeed_estimator():
    """bf16 under ZeRO-2 is DeepSpeed's own estimate (2 + 18/W bytes per parameter); fp32 states halve at W=2."""
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    n = 123_456_789
    for nodes, gpus in ((1, 1), (1, 8), (4, 8)):
        _, gpu = estimate_zero2_model_states_mem_needs(n, gpus, nodes, cpu_offload=False)
        assert sum(model_state_bytes(n, 2, nodes * gpus, "bf16").values()) == pytest.approx(gpu, rel=1e-6)
    z0, z2 = model_state_bytes(n, 0, 2, "fp32"), model_state_bytes(n, 2, 2, "fp32")
    assert z2["optimizer_state_bytes"] == z0["optimizer_state_bytes"] / 2 and z2["param_bytes"] == z0["param_bytes"]
    assert model_state_bytes(n, 3, 4, "fp32")["param_bytes"] == 4 * n / 4


def test_config_errors_name_the_field(tmp_path):
    for override, message in (("grid.zero_stage=[0,5]", r"grid.zero_stage value 5 does not exist"),
                              ("grid.method=[fixed]", r"grid.method value 'fixed'; allowed: \["),
                              ("tokens=null", r"exactly one of tokens .* or steps"),
                              ("mode=strong", r"mode strong needs global_batch"),
                              ("device.name=tpu9", r"device.name = 'tpu9' has no known peak"),
                              ("grid.space=[vit-tiny]", r"is a classify space; scaling experiments measure")):
        with pytest.raises(ConfigError, match=message):
            config, base = load_scale(RECIPE, [override, "settings.data.dir=x"])
            build_points(config, base)


def test_gpu_recipe_dry_run_predicts_memory_and_starts_nothing(tmp_path, capsys):
    out = tmp_path / "scale"
    assert main(["scale", str(GPU_RECIPE), "--dry-run", "--out", str(out), "grid.workers=[1,8]"]) == 0
    text = capsys.readouterr().out
    rows = [line for line in text.splitlines() if line.startswith("gpt-")]
    config, base = load_scale(GPU_RECIPE, ["grid.workers=[1,8]"])
    assert len(rows) == len(build_points(config, base)) > 8
    assert "GiB" in text and " NO " in text and " yes " in text  # the 24-layer supernet does not fit one H100 at ZeRO 0
    assert not out.exists()


@pytest.fixture(scope="module")
def tokens(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("scale-data")
    corpus = write_demo_corpus(root / "raw", n_train=300, n_valid=40, seed=0)
    return prepare_text(TextSource(kind="jsonl", path=str(corpus)), root / "tokens")


def _table(out: Path) -> dict[str, dict[str, float]]:
    points: dict[str, dict[str, float]] = defaultdict(dict)
    with (out / "points.csv").open() as f:
        for row in csv.DictReader(f):
            points[row["point_id"]] |= {k: row[k] for k in ("space", "workers", "zero_stage")}
            points[row["point_id"]][row["metric"]] = float(row["value"])
    return points


@pytest.mark.ray
def test_tiny_recipe_local_then_two_nodes(tokens, tmp_path):
    """Local cluster: 1 worker, three sizes, ZeRO 0 and 2, a memory limit the largest size exceeds (recorded as
    oom, the grid goes on). Two simulated nodes: adding 2 workers runs only the new points; a rerun runs none."""
    import ray
    from ray.cluster_utils import Cluster

    out = tmp_path / "scale"
    common = [f"settings.data.dir={tokens}", "tokens=1024", "device.memory_gb=0.9"]
    config, base = load_scale(RECIPE, [*common, "grid.workers=[1]", "grid.space=[gpt-pico,gpt-nano,gpt-tinystories]"])
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        first = run_scale(config, build_points(config, base), out)
    finally:
        ray.shutdown()
    oom = {p["point_id"] for p in first["points"] if p["oom"]}
    assert oom == {"gpt-tinystories-tanglenas-w1-z0-mb4-ga1-weak", "gpt-tinystories-tanglenas-w1-z2-mb4-ga1-weak"}
    assert all("out of memory" in p["error"] for p in first["points"] if p["oom"])

    config, base = load_scale(RECIPE, common)  # the recipe's grid: gpt-pico and gpt-nano, 1 and 2 workers
    points = build_points(config, base)
    done = {p.parent.name: p.stat().st_mtime_ns for p in out.glob("points/*/stage.json")}
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    cluster.add_node(num_cpus=1)
    try:
        ray.init(address=cluster.address, log_to_driver=False)
        run_scale(config, points, out)
        again = {p.parent.name: p.stat().st_mtime_ns for p in out.glob("points/*/stage.json")}
        assert {k: again[k] for k in done} == done and len(again) == len(done) + 4  # only the 2-worker points ran
        run_scale(config, points, out)  # nothing left to run
        assert {p.parent.name: p.stat().st_mtime_ns for p in out.glob("points/*/stage.json")} == again
    finally:
        ray.shutdown()
        cluster.shutdown()

    _check_outputs(out)


def _check_outputs(out: Path) -> None:
    """The recipe's 8 points: efficiency as stated, ZeRO-2 halves Adam's states, model states as predicted."""
    table = _table(out)
    assert len(table) == 8 and not any(p["oom"] for p in table.values())
    for space, zero in {(p["space"], p["zero_stage"]) for p in table.values()}:
        one, two = (next(p for p in table.values() if (p["space"], p["zero_stage"], p["workers"]) == (space, zero, w))
                    for w in ("1", "2"))
        assert two["efficiency"] == pytest.approx(two["tokens_per_s"] / (2 * one["tokens_per_s"]), rel=1e-9)
        assert one["efficiency"] == pytest.approx(1.0)
    for space in ("gpt-pico", "gpt-nano"):
        z0, z2 = (next(p for p in table.values() if (p["space"], p["zero_stage"], p["workers"]) == (space, z, "2"))
                  for z in ("0", "2"))
        assert z2["optimizer_state_bytes"] == pytest.approx(z0["optimizer_state_bytes"] / 2, rel=0.05)
    for p in table.values():
        for key in ("param_bytes", "optimizer_state_bytes", "master_bytes"):
            assert p[key] == pytest.approx(p[f"predicted_{key}"], rel=0.05, abs=1), key
        assert p["peak_bytes"] > 0 and p["flops_per_s"] > 0 and math.isfinite(p["valid_loss"])
        assert p["arch_step_flops"] < p["step_flops"]  # the superposed step computes more than its argmax

    scale = json.loads((out / "scale.json").read_text())
    assert {p["grid"]["workers"] for p in scale["points"]} == {1, 2}
    report = (out / "report.md").read_text()
    for png in ("throughput_vs_workers.png", "memory_per_worker.png", "loss_vs_compute.png", "arch_vs_supernet.png"):
        assert (out / png).stat().st_size > 10_000 and f"]({png})" in report



@pytest.mark.parametrize("method", ["tanglenas", "spos", "ofa"])
def test_predictions_of_a_space_with_a_depth_per_stage(method, tmp_path, capsys):
    """mbv3-tiny (a depth per stage, batch norms): the step FLOPs and the memory traced on the meta device; the
    scaling command itself measures language models and says so."""
    from tangle_ray.scaling.predict import arch_flops, predict_memory, step_flops

    space = load_space("mbv3-tiny")
    assert step_flops(space, method, 8) > arch_flops(space, space.smallest(), 8) > 0
    memory = predict_memory(space, method, 8, 3, 2, "fp32")
    assert memory["peak_bytes"] > memory["activation_bytes"] > 0
    assert memory["supernet_params"] == sum(p.numel() for p in space.build_supernet().net.parameters())
    recipe = tmp_path / "mbv3.yaml"
    recipe.write_text(f"name: mbv3\nrun: {RECIPE.parent.parent / 'runs' / 'tiny-cpu-mbv3-tanglenas.yaml'}\n"
                      f"grid: {{space: [mbv3-tiny], workers: [1], zero_stage: [0], micro_batch: [8], "
                      f"method: [{method}]}}\nmode: weak\ntokens: 4096\nwarmup_steps: 2\ndevice: {{name: cpu}}\n")
    assert main(["scale", str(recipe), "--dry-run", "--out", str(tmp_path / "scale")]) == 2
    assert "is a classify space; scaling experiments measure language models" in capsys.readouterr().err
