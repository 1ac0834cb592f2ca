"""Image micro-batches decoded by Ray Data actors on a CPU node of a two-node cluster equal the trainer's own
decoding bit for bit, across pipeline windows, a resumed key sequence and the full augmentation recipe."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from tangle_ray.data.images import ray_decode
from tangle_ray.data.images.batches import ImageBatches
from tangle_ray.data.images.prepare import ImageStore, prepare_images
from tangle_ray.data.images.ray_decode import RayDataBatches
from tangle_ray.data.images.sources import ImageSource
from tangle_ray.errors import ClusterError
from tangle_ray.tasks.classify import ClassifyTask, ImageData
from tests.data.test_images import RECIPE, write_folder

pytestmark = pytest.mark.ray


def test_ray_data_decoding_on_a_cpu_node_equals_local_decoding(tmp_path, monkeypatch):
    import ray
    from ray.cluster_utils import Cluster

    store = ImageStore(prepare_images(ImageSource(path=str(write_folder(tmp_path / "src"))), tmp_path / "prepared"))
    batches = ImageBatches(store, "train", 3, 5, img_size=16, in_chans=3, num_classes=3,
                           augment=replace(RECIPE, random_erase=1.0))  # every image erased: its generator goes on
    monkeypatch.setattr(ray_decode, "WINDOW", 4)  # 10 keys of a stream: 3 pipelines
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    cluster.add_node(num_cpus=2, resources={"decode": 2})  # the decoding node
    try:
        ray.init(address=cluster.address, log_to_driver=False)
        remote = RayDataBatches(batches, decoders=2, resources={"CPU": 1, "decode": 1}, prefetch=2)
        keys = [(s, j) for s in range(6) for j in (2, 3)] + [(1, 2), (1, 3), (2, 2), (2, 3), (3, 2), (9, 0)]
        for key in keys:  # learnt from steps 0, then streamed; (1, 2) restarts (a resume); (9, 0) is off it
            assert all(torch.equal(a, b) for a, b in zip(remote.get(*key), batches.get(*key))), key
        assert remote._stream is None  # (9, 0) ended the stream

        data = ImageData(dir=str(store.dir), decoders=1, decoder_resources={"CPU": 1, "decode": 1})
        ClassifyTask().check_helpers(data)
        with pytest.raises(ClusterError, match="data.decoder_resources .*each worker needs 1 gpu_decode"):
            ClassifyTask().check_helpers(replace(data, decoder_resources={"gpu_decode": 1}))
        ClassifyTask().check_helpers(replace(data, decoders=0, decoder_resources={"gpu_decode": 1}))  # off
    finally:
        ray.shutdown()
        cluster.shutdown()
