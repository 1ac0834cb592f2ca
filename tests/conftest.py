"""Shared test setup: offline tokenizer file, quiet Ray, small thread counts."""

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
GPT2_BPE = REPO.parent / "shared" / "data" / "gpt2.tiktoken"

if GPT2_BPE.is_file():
    os.environ.setdefault("TANGLE_RAY_GPT2_BPE", str(GPT2_BPE))
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
