import json

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tangle_ray.data import sources
from tangle_ray.data.sources import TextSource, load_text_source, source_hash
from tangle_ray.data.synth import generate_stories
from tangle_ray.errors import ConfigError


def test_jsonl_folder(corpus):
    dsd = load_text_source(TextSource(kind="jsonl", path=str(corpus)))
    assert sorted(dsd) == ["test", "train"] and dsd["train"].column_names == ["text"]
    assert list(dsd["train"]["text"]) + list(dsd["test"]["text"]) == generate_stories(340, seed=0)


def test_text_paragraph_and_line_modes(tmp_path):
    (tmp_path / "train.txt").write_text("One story\nover two lines.\n\n\nSecond story.\n\nThird.\n")
    (tmp_path / "validation.txt").write_text("Held out.\n")
    para = load_text_source(TextSource(kind="text", path=str(tmp_path)))
    assert para["train"]["text"] == ["One story\nover two lines.", "Second story.", "Third."]
    line = load_text_source(TextSource(kind="text", path=str(tmp_path), text_mode="line"))
    assert line["train"]["text"] == ["One story", "over two lines.", "Second story.", "Third."]
    assert line["test"]["text"] == ["Held out."]


def test_parquet_files_and_saved_dataset(tmp_path):
    for name, texts in (("a", ["x one", "x two"]), ("b", ["y"])):
        pq.write_table(
            pa.table({"story": texts, "id": list(range(len(texts)))}), tmp_path / f"{name}.parquet"
        )
    src = TextSource(
        kind="parquet",
        path=str(tmp_path),
        text_field="story",
        files={"train": "a.parquet", "validation": "b.parquet"},
    )
    dsd = load_text_source(src)
    assert dsd["train"]["text"] == ["x one", "x two"] and dsd["test"]["text"] == ["y"]
    datasets.DatasetDict({"train": dsd["train"], "dev": dsd["test"]}).save_to_disk(str(tmp_path / "saved"))
    saved = load_text_source(TextSource(kind="saved", path=str(tmp_path / "saved"), test_split="dev"))
    assert saved["test"]["text"] == ["y"]
    assert source_hash(TextSource(kind="saved", path=str(tmp_path / "saved"))) is not None


def test_content_hash_follows_content(corpus):
    src = TextSource(kind="jsonl", path=str(corpus))
    before = source_hash(src)
    assert before == source_hash(TextSource(kind="jsonl", path=str(corpus)))
    with open(corpus / "validation.jsonl", "a") as f:
        f.write(json.dumps({"text": "One more."}) + "\n")
    assert source_hash(src) != before
    assert source_hash(TextSource(kind="jsonl", path=str(corpus), text_field="other")) != source_hash(src)


@pytest.mark.parametrize(
    ("content", "kind", "message"),
    [
        (b"", "jsonl", "is empty"),
        (b"\x00\x01\x02binary\xff" * 100, "text", "is binary"),
        (b"\xff\xfe caf\xe9 latin-1 text\n", "text", "could not be read as UTF-8 text"),
        (b"not json at all\n", "jsonl", "could not be read as jsonl"),
        (b'{"body": "no text field"}\n', "jsonl", "no text field 'text'.*columns: \\['body'\\]"),
        (b'{"text": 5}\n', "jsonl", "holds .*int64.*not text"),
        (b'{"text": "   "}\n', "jsonl", "no \\(non-blank\\) documents"),
        (b"junk", "parquet", "could not be read as parquet"),
    ],
)
def test_bad_input_gives_config_error(tmp_path, content, kind, message):
    ext = {"text": "txt", "jsonl": "jsonl", "parquet": "parquet"}[kind]
    (tmp_path / f"train.{ext}").write_bytes(content)
    (tmp_path / f"validation.{ext}").write_bytes(content)
    with pytest.raises(ConfigError, match=message):
        load_text_source(TextSource(kind=kind, path=str(tmp_path)))


def test_missing_files_and_bad_options(tmp_path, corpus):
    with pytest.raises(ConfigError, match="no 'validation' file"):
        (tmp_path / "only").mkdir()
        (tmp_path / "only" / "train.jsonl").write_text('{"text": "a"}\n')
        load_text_source(TextSource(kind="jsonl", path=str(tmp_path / "only")))
    with pytest.raises(ConfigError, match="missing.jsonl' does not exist"):
        load_text_source(
            TextSource(kind="jsonl", path=str(corpus), files={"train": "missing.jsonl", "validation": "x"})
        )
    with pytest.raises(ConfigError, match="not a directory"):
        load_text_source(TextSource(kind="jsonl", path=str(corpus / "train.jsonl")))
    with pytest.raises(ConfigError, match="kind 'csv' is unknown"):
        TextSource(kind="csv", path=".")
    with pytest.raises(ConfigError, match="text_mode 'word'"):
        TextSource(kind="text", path=".", text_mode="word")


def test_hub_without_network_fails_fast(monkeypatch):
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(sources, "hub_reachable", lambda timeout=3.0: False)
    with pytest.raises(ConfigError, match="unreachable.*kind='jsonl'"):
        load_text_source(TextSource())


def test_hub_in_offline_mode_fails_fast(monkeypatch):
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(sources, "hub_reachable", lambda timeout=3.0: pytest.fail("probed in offline mode"))
    with pytest.raises(ConfigError, match="not available offline.*kind='jsonl'"):
        load_text_source(TextSource(kind="hub", path="someone/not-cached-dataset"))
