import json

from tangle_ray.data.text.synth import generate_stories, write_demo_corpus


def test_stories_are_deterministic_and_varied():
    stories = generate_stories(200, seed=3)
    assert stories == generate_stories(200, seed=3)
    assert stories != generate_stories(200, seed=4)
    assert len(set(stories)) == 200
    assert all(s.endswith(".") and len(s.split(". ")) >= 4 for s in stories)


def test_demo_corpus_files(tmp_path):
    out = write_demo_corpus(tmp_path / "c", n_train=20, n_valid=5, seed=1)
    train = [json.loads(line)["text"] for line in (out / "train.jsonl").read_text().splitlines()]
    valid = [json.loads(line)["text"] for line in (out / "validation.jsonl").read_text().splitlines()]
    assert train + valid == generate_stories(25, seed=1)
