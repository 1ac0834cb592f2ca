"""The fault drills reuse the training tests' corpus and tiny run configs (tests/train/conftest.py)."""

from tests.train.conftest import data_dir, tiny_config  # noqa: F401  (fixtures)
