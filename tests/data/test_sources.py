import json

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tangle_ray.data.text import sources
from tangle_ray.data.text.sources import TextSource, load_text_source, source_hash
from tangle_ray.data.text.synth import generate_stories
from tangle_ray.errors import TangleRayError


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
        (b"", "jsonl", "train.jsonl' is empty"),
        (b"\n  \n\n", "jsonl", "train.jsonl' holds only blank lines: no documents"),
        (b"\x00\x01\x02binary\xff" * 100, "text", "train.txt' is binary"),
        (b"ok\n\xff\xfe caf\xe9 latin-1 text\n", "text", "train.txt' line 2 is not UTF-8 text"),
        (b'{"text": "caf\xe9"}\n', "jsonl", "train.jsonl' line 1 is not UTF-8 text"),
        (b"not json at all\n", "jsonl", "train.jsonl' line 1 is not JSON"),
        (b'{"text": "a"}\n[1, 2]\n', "jsonl", "line 2 holds a JSON list; allowed: one JSON object per line"),
        (
            b'{"body": "no text field"}\n',
            "jsonl",
            "no text field 'text'; columns: \\['body'\\] \\(choose it with",
        ),
        (b'{"text": "a"}\n\n{"body": "b"}\n', "jsonl", "train.jsonl' line 3: text field 'text' is missing"),
        (
            b'{"text": "a"}\n{"text": null}\n',
            "jsonl",
            "train.jsonl' line 2: text field 'text' is null; allowed",
        ),
        (b'{"text": 5}\n', "jsonl", "line 1: text field 'text' is 5; allowed: a string in every line"),
        (b'[{"text": "a"}, {"text": null}]', "jsonl", "split 'train' row 2: text field 'text' is null"),
        (b'{"text": "   "}\n', "jsonl", "no \\(non-blank\\) documents"),
        (b"junk", "parquet", "train.parquet' is not a Parquet file"),
        (pa.table({"text": pa.array([], pa.string())}), "parquet", "train.parquet' holds no rows"),
        (pa.table({"text": ["a", None]}), "parquet", "train.parquet' row 2: text field 'text' is null"),
        (pa.table({"text": [5]}), "parquet", "field 'text' holds Value\\('int64'\\); allowed: text"),
        (pa.table({"body": ["a"]}), "parquet", "no text field 'text'; columns: \\['body'\\]"),
    ],
)
def test_bad_input_gives_config_error(tmp_path, content, kind, message):
    ext = {"text": "txt", "jsonl": "jsonl", "parquet": "parquet"}[kind]
    if isinstance(content, pa.Table):
        pq.write_table(content, tmp_path / f"train.{ext}")
    else:
        (tmp_path / f"train.{ext}").write_bytes(content)
    if kind == "parquet":
        pq.write_table(pa.table({"text": ["fine"]}), tmp_path / f"validation.{ext}")
    else:
        (tmp_path / f"validation.{ext}").write_bytes(b'{"text": "fine"}\n' if kind == "jsonl" else b"fine\n")
    with pytest.raises(TangleRayError, match=message):
        load_text_source(TextSource(kind=kind, path=str(tmp_path)))


def test_single_file_is_the_corpus_with_a_held_out_test_slice(corpus, tmp_path):
    stories, file = generate_stories(300, seed=0), str(corpus / "train.jsonl")
    dsd = load_text_source(TextSource(kind="jsonl", path=file))
    train, test = list(dsd["train"]["text"]), list(dsd["test"]["text"])
    assert (len(train), len(test)) == (270, 30) and sorted(train + test) == sorted(stories)
    assert test != stories[270:]  # a random draw, not the last slice ...
    assert train == [s for s in stories if s in set(train)]  # ... both in file order
    assert load_text_source(TextSource(kind="jsonl", path=file))["test"]["text"] == test  # fixed
    assert len(load_text_source(TextSource(kind="jsonl", path=file, test_fraction=0.2))["test"]) == 60
    hashes = {source_hash(TextSource(kind="jsonl", path=file, test_fraction=f)) for f in (None, 0.1, 0.2)}
    assert len(hashes) == 2  # None is the default 0.1
    (tmp_path / "all.txt").write_text("\n\n".join(stories[:20]) + "\n")
    pq.write_table(pa.table({"text": stories[:20]}), tmp_path / "all.parquet")
    for kind, name in (("text", "all.txt"), ("parquet", "all.parquet")):
        dsd = load_text_source(TextSource(kind=kind, path=str(tmp_path / name)))
        assert sorted([*dsd["train"]["text"], *dsd["test"]["text"]]) == sorted(stories[:20])
        assert len(dsd["test"]) == 2
    (tmp_path / "two.jsonl").write_text('{"text": "a"}\n{"text": "b"}\n')
    with pytest.raises(
        TangleRayError, match="two.jsonl': test_fraction=0.1 of 2 documents leaves the test split empty"
    ):
        load_text_source(TextSource(kind="jsonl", path=str(tmp_path / "two.jsonl")))


def test_missing_files_and_bad_options(tmp_path, corpus):
    with pytest.raises(TangleRayError, match="no 'validation' file"):
        (tmp_path / "only").mkdir()
        (tmp_path / "only" / "train.jsonl").write_text('{"text": "a"}\n')
        load_text_source(TextSource(kind="jsonl", path=str(tmp_path / "only")))
    with pytest.raises(TangleRayError, match="missing.jsonl' does not exist"):
        load_text_source(
            TextSource(kind="jsonl", path=str(corpus), files={"train": "missing.jsonl", "validation": "x"})
        )
    with pytest.raises(TangleRayError, match="path '.*nowhere.jsonl' does not exist"):
        load_text_source(TextSource(kind="jsonl", path=str(tmp_path / "nowhere.jsonl")))
    file = str(corpus / "train.jsonl")
    with pytest.raises(TangleRayError, match="is a file; files \\(split name -> file\\) needs a folder path"):
        load_text_source(TextSource(kind="jsonl", path=file, files={"train": "a", "validation": "b"}))
    with pytest.raises(
        TangleRayError, match="test_fraction applies to a single-file path.*test split is 'validation'"
    ):
        load_text_source(TextSource(kind="jsonl", path=str(corpus), test_fraction=0.1))
    with pytest.raises(TangleRayError, match="test_fraction=1.0 must lie strictly between 0 and 1"):
        TextSource(kind="jsonl", path=file, test_fraction=1.0)
    for path, what in ((file, "file"), (str(corpus), "folder")):
        with pytest.raises(TangleRayError, match=f"is a local {what} but kind is 'hub'.*--kind text\\|jsonl"):
            load_text_source(TextSource(path=path))
    with pytest.raises(TangleRayError, match="kind 'csv' is unknown"):
        TextSource(kind="csv", path=".")
    with pytest.raises(TangleRayError, match="text_mode 'word'"):
        TextSource(kind="text", path=".", text_mode="word")


LOCAL_HINT = "tangle-ray data prepare --kind jsonl --path FILE.*data.source: \\{kind: jsonl, path: FILE\\}"


def test_hub_without_network_fails_fast(monkeypatch):
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(sources, "hub_reachable", lambda timeout=3.0: False)
    with pytest.raises(TangleRayError, match=f"unreachable.*{LOCAL_HINT}") as info:
        load_text_source(TextSource())
    assert "TextSource" not in str(info.value)


def test_hub_in_offline_mode_fails_fast(monkeypatch):
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(sources, "hub_reachable", lambda timeout=3.0: pytest.fail("probed in offline mode"))
    with pytest.raises(TangleRayError, match=f"not available offline.*{LOCAL_HINT}"):
        load_text_source(TextSource(kind="hub", path="someone/not-cached-dataset"))
