"""A node removed during training, on a simulated multi-node cluster: Ray Train restarts the workers on the
remaining nodes from the last recorded checkpoint, and the run ends as the uninterrupted one does."""

from __future__ import annotations

from pathlib import Path

import psutil
import pytest

from tangle_ray.train.checkpoint import latest_checkpoint, read_trainer_state, resume_checkpoint
from tangle_ray.train.runner import run_training
from tests.faults.conftest import LONG, after_a_checkpoint, train_workers, uninterrupted
from tests.train.states import assert_same_run

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def cluster():
    """A head node without CPUs (the driver, and Ray Train's controller, which Train V2 places on the driver's
    node) and three nodes of one CPU each for the two workers."""
    import ray
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    for _ in range(3):
        cluster.add_node(num_cpus=1)
    ray.init(address=cluster.address, log_to_driver=False)
    yield cluster
    ray.shutdown()
    cluster.shutdown()


def _hosts_a_train_worker(node) -> bool:
    """Is a RayTrainWorker process a descendant of this node's raylet?"""
    from ray._private import ray_constants

    return bool(train_workers(psutil.Process(node.all_processes[ray_constants.PROCESS_TYPE_RAYLET][0].process.pid)))


def _remove_a_worker_node(cluster, run_dir: Path) -> tuple[str, dict] | None:
    """Remove a node that runs a worker; (its node id, the trainer_state of the checkpoint Ray resumes from)."""
    for node in list(cluster.worker_nodes):
        if _hosts_a_train_worker(node):
            removed = (node.node_id, read_trainer_state(resume_checkpoint(run_dir)))
            cluster.remove_node(node)
            return removed
    return None


def test_a_removed_node_resumes_on_the_remaining_nodes(cluster, tiny_config):
    cfg = tiny_config(**LONG, max_failures=1)
    run_dir = cfg.run_dir()
    with after_a_checkpoint(run_dir, lambda: _remove_a_worker_node(cluster, run_dir)) as removed:
        result = run_training(cfg, export=False)
    assert removed, "no node hosting a worker was removed: the run ended before its first checkpoint was recorded"
    node_id, before = removed[0]
    assert node_id in before["nodes"], (node_id, before["nodes"])  # the removed node ran a rank of this run
    assert f"resumed at step {before['step']}" in (run_dir / "progress.log").read_text()
    after = read_trainer_state(latest_checkpoint(run_dir))["nodes"]
    assert node_id not in after and set(after) <= {node.node_id for node in cluster.worker_nodes}, after
    assert_same_run(result, uninterrupted(tiny_config))
