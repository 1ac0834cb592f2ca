"""A language-model run's data settings are used as configured or refused, never silently ignored."""

import os

import pytest

from tangle_ray import load_space
from tangle_ray.data.text.prepare import prepare_text
from tangle_ray.data.text.sources import TextSource
from tangle_ray.data.text.synth import write_demo_corpus
from tangle_ray.errors import ConfigError, DataError
from tangle_ray.tasks import get_task
from tangle_ray.train.config import load_config


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    root = tmp_path_factory.mktemp("lm")
    corpus = write_demo_corpus(root / "raw", n_train=60, n_valid=10, seed=0)
    return corpus, prepare_text(TextSource(kind="jsonl", path=str(corpus)), root / "tokens")


def _prepare(folder, *settings):
    cfg = load_config(None, ["space=gpt-nano", f"data.dir={folder}", *settings])
    return get_task("lm").prepare(cfg.data, load_space("gpt-nano"), 0)


@pytest.mark.parametrize("setting", ["data.tokenizer=abc", "data.bpe_file=abc", "data.num_proc=2"])
def test_preparation_settings_without_a_source_are_refused_on_a_prepared_folder(prepared, setting):
    with pytest.raises(ConfigError, match="ignored because data.dir .* is already prepared"):
        _prepare(prepared[1], setting)


@pytest.mark.parametrize("value", ["0", "-1", "1e18"])
def test_process_counts_outside_what_a_machine_serves_are_refused(value):
    with pytest.raises(ConfigError, match="data.num_proc = .* allowed: 1 to 1024"):
        load_config(None, ["space=gpt-nano", f"data.num_proc={value}"])


def test_a_source_is_always_used_even_where_the_folder_is_prepared(prepared, tmp_path):
    corpus, folder = prepared
    assert _prepare(folder, f"data.source={{kind: jsonl, path: {corpus}}}").dir == str(folder.resolve())  # reused
    with pytest.raises(ConfigError, match="kind 'bogus' is unknown"):
        _prepare(folder, "data.source={kind: bogus}")
    with pytest.raises(DataError, match="does not exist"):
        _prepare(folder, f"data.source={{kind: jsonl, path: {tmp_path / 'nowhere'}}}")
    with pytest.raises(ConfigError, match="unknown encoding 'abc'"):
        _prepare(folder, f"data.source={{kind: jsonl, path: {corpus}}}", "data.tokenizer=abc")
    cores = os.cpu_count() or 1
    with pytest.raises(ConfigError, match=f"has {cores} cores"):
        _prepare(folder, f"data.source={{kind: jsonl, path: {corpus}}}", f"data.num_proc={cores + 1}")
