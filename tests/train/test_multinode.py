"""Two simulated Ray nodes, one worker on each: a short distributed search completes across nodes."""

import pytest

from tangle_ray.train.checkpoint import read_trainer_state
from tangle_ray.train.runner import run_training

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def two_node_cluster():
    import ray
    from ray.cluster_utils import Cluster

    cluster = Cluster()
    nodes = [cluster.add_node(num_cpus=1), cluster.add_node(num_cpus=1)]
    ray.init(address=cluster.address, log_to_driver=False)
    yield nodes
    ray.shutdown()
    cluster.shutdown()


def test_one_worker_per_node_with_spread_placement(two_node_cluster, tiny_config):
    cfg = tiny_config(scaling__num_workers=2, scaling__placement_strategy="STRICT_SPREAD", zero_stage=2, steps=2,
                      checkpoint_every=2)
    result = run_training(cfg)
    state = read_trainer_state(result.checkpoint)
    assert state["step"] == 2
    assert len(set(state["nodes"])) == 2, state["nodes"]
    assert set(state["nodes"]) == {node.node_id for node in two_node_cluster}
