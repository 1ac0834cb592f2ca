"""Shared test setup: quiet Ray, offline datasets, small thread counts (the GPT-2 BPE ships in the package)."""

import os

import pytest
import torch

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
torch.set_num_threads(2)


@pytest.fixture(scope="module")
def local_ray():
    """A local Ray cluster for one test module (never attached to another cluster on the machine)."""
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()
