"""`tangle-ray cluster check` on a simulated two-node cluster whose second node has another DeepSpeed installed."""

from __future__ import annotations

import pytest

from tangle_ray.cli import main
from tangle_ray.cluster_check import check_cluster

pytestmark = pytest.mark.ray


def test_a_node_with_another_version_or_an_unwritable_path_is_named(tmp_path, capsys):
    import ray
    from ray.cluster_utils import Cluster

    other = tmp_path / "other-site"  # the second node's environment: DeepSpeed 0.0.1's metadata first on its path
    (other / "deepspeed-0.0.1.dist-info").mkdir(parents=True)
    (other / "deepspeed-0.0.1.dist-info" / "METADATA").write_text("Metadata-Version: 2.1\nName: deepspeed\n"
                                                                  "Version: 0.0.1\n")
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    cluster.add_node(num_cpus=1, env_vars={"PYTHONPATH": str(other)})
    try:
        ray.init(address=cluster.address, log_to_driver=False)
        healthy = check_cluster([str(tmp_path)], workers=2, per_worker={"CPU": 1.0})
        problems = [p for p in healthy.problems if "deepspeed 0.0.1" not in p]
        assert len(healthy.nodes) == 2 and problems == []
        (mismatch,) = [p for p in healthy.problems if "deepspeed" in p]
        assert "has deepspeed 0.0.1, the driver has 0.19" in mismatch and "install deepspeed 0.19" in mismatch
        assert mismatch.startswith("node ") and len(healthy.table().splitlines()) == 3

        bad = check_cluster(["/proc"], workers=3, per_worker={"CPU": 1.0})
        assert sum("cannot write to /proc" in p for p in bad.problems) == 2  # one line per node
        assert any("3 workers x 1 CPU (PACK) do not fit: at most 2 fit" in p for p in bad.problems)

        assert main(["cluster", "check", "--address", cluster.address, f"run.storage_path={tmp_path}",
                     f"data.dir={tmp_path}", "space=gpt-nano", "scaling.num_workers=2"]) == 1
        out = capsys.readouterr()
        assert "deepspeed" in out.out.splitlines()[0] and "1 problem(s)" in out.out
    finally:
        ray.shutdown()
        cluster.shutdown()
