"""Damaged artefacts: prepared token and image folders, supernet and model folders, run checkpoints and searcher
states are refused with one TangleRayError naming the problem, or (when the damage changed nothing that is read)
load as before. Folders are read as the commands read them (the task's evaluation set and batches, ``load_supernet``,
``load_model``), also after their manifest was rewritten to match the damage: a manifest proves nothing about
what it lists."""

from __future__ import annotations

import itertools
import json
import random
import shutil

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from tangle_ray.configs import build
from tangle_ray.data.images.prepare import prepare_images
from tangle_ray.data.images.sources import ImageSource
from tangle_ray.data.text.prepare import FORMAT_VERSION, SPLITS, load_split
from tangle_ray.folders import SUPERNET_FILES, load_supernet, save_supernet
from tangle_ray.manifest import sha256, write_manifest
from tangle_ray.models import load_model, load_space
from tangle_ray.models.registry import MODEL_FILES
from tangle_ray.names import check_name
from tangle_ray.tasks import get_task
from tangle_ray.tasks.base import materialize
from tangle_ray.tasks.classify import ImageData
from tangle_ray.tasks.lm import TextData
from tangle_ray.train.checkpoint import check_checkpoint
from tangle_ray.tune.searchers import RandomSearcher

from .conftest import FUZZ, mutated, outcome

_n = itertools.count()
VOCAB = 97
META = {"format_version": FORMAT_VERSION, "dtype": "uint16", "vocab_size": VOCAB, "eot": 0,
        "splits": {s: {"file": f"{s}.bin", "tokens": 50} for s in SPLITS}}


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz-artefacts")


@pytest.fixture(scope="module")
def supernet_dir(root):
    supernet = load_space("gpt-micro").build_supernet()
    return save_supernet(supernet, root / "supernet", meta={"step": 1})


def damage(data, folder, names: list[str]) -> str:
    """Damage one file of ``folder`` (or add one); returns what was done."""
    name = data.draw(st.sampled_from(names))
    path = folder / name
    kind = data.draw(st.sampled_from(["cut", "flip", "append", "delete", "replace", "add file", "nothing"]))
    body = path.read_bytes() if path.is_file() else b""
    if kind == "cut":
        path.write_bytes(body[: data.draw(st.integers(0, max(len(body) - 1, 0)))])
    elif kind == "flip" and body:
        i = data.draw(st.integers(0, len(body) - 1))
        path.write_bytes(body[:i] + bytes([body[i] ^ data.draw(st.integers(1, 255))]) + body[i + 1:])
    elif kind == "append":
        path.write_bytes(body + data.draw(st.binary(min_size=1, max_size=16)))
    elif kind == "delete":
        path.unlink(missing_ok=True)
    elif kind == "replace":
        path.write_bytes(data.draw(st.sampled_from([b"", b"{}", b"[]", b"null", b"\xff\xfe", b"[" * 100_000,
                                                    b'{"format": "tangle_ray.manifest/1"}'])))
    elif kind == "add file":
        extra = folder / data.draw(st.sampled_from(["extra.bin", "ds/zero_pp_rank_9_mp_rank_00_optim_states.pt"]))
        extra.parent.mkdir(exist_ok=True)
        extra.write_bytes(b"x")
    return f"{kind} {name}"


META_DAMAGE = st.sampled_from([{"vocab_size": 60000}, {"vocab_size": VOCAB + 1}, {"split": "train", "tokens": 51},
                                {"split": "test", "tokens": 49}])


@given(meta=st.one_of(st.just(META), mutated(META)), data=st.data())
@FUZZ
def test_prepared_token_folders(root, meta, data):
    """Read as evaluate and tune read them (the language-model task's evaluation set) and as the workers do (its
    batches): a file cut, garbled or replaced by random bytes of its size, a meta.json whose vocabulary or token
    counts are off by one, all refused; whatever is accepted is a sound folder."""
    folder = root / f"tokens{next(_n)}"
    folder.mkdir()
    meta = json.loads(json.dumps(meta))
    if isinstance(meta.get("splits"), dict) and data.draw(st.integers(0, 5)) == 0:  # meta.json off by a little
        change = data.draw(META_DAMAGE)
        if "split" in change and isinstance(meta["splits"].get(change["split"]), dict):
            meta["splits"][change["split"]]["tokens"] = change["tokens"]
        elif "vocab_size" in change:
            meta["vocab_size"] = change["vocab_size"]
    rng = np.random.default_rng(0)
    for s in SPLITS:
        tokens = rng.integers(0, VOCAB, 50).astype(np.uint16)
        if data.draw(st.integers(0, 5)) == 0:
            tokens[data.draw(st.integers(0, 49))] = data.draw(st.sampled_from([VOCAB, 65535]))  # garbled
        body = tokens.tobytes()
        if data.draw(st.integers(0, 5)) == 0:
            body = body[: data.draw(st.integers(0, len(body)))]  # cut
        elif data.draw(st.integers(0, 5)) == 0:
            body = random.Random(data.draw(st.integers(0, 99))).randbytes(len(body))  # random bytes, same size
        (folder / f"{s}.bin").write_bytes(body)
    text = json.dumps(meta)
    if data.draw(st.integers(0, 7)) == 0:
        text = text[: data.draw(st.integers(0, len(text)))]
    (folder / "meta.json").write_text(text)
    task, settings = get_task("lm"), {"vocab_size": VOCAB, "block_size": 8}
    reader = data.draw(st.sampled_from(["eval_set", "batches"]))
    kind, _ = outcome(lambda: materialize(task.eval_set(TextData(dir=str(folder)), settings, "test", 4, 0))
                      if reader == "eval_set"
                      else task.batches(TextData(dir=str(folder)), settings, "train", 2, 0).get(0, 0))
    if kind == "ok":  # every split a plain file name of the folder, of its size, ids inside the vocabulary
        assert meta["vocab_size"] <= VOCAB
        for s in SPLITS:
            info = meta["splits"][s]
            check_name(info["file"], "file")
            tokens = load_split(folder, s)
            assert (folder / info["file"]).stat().st_size == info["tokens"] * 2
            assert len(tokens) == 0 or int(tokens.max()) < meta["vocab_size"] <= 65536


@pytest.fixture(scope="module")
def image_dir(root):
    """A prepared image folder of 3 classes (5 training and 2 test images each; PNG and JPEG)."""
    from tests.images import write_image_folder

    write_image_folder(root / "image-src")
    return prepare_images(ImageSource(path=str(root / "image-src")), root / "images")


IMAGE_ARRAYS = ["offsets.npy", "labels.npy", "train.npy", "valid.npy", "test.npy"]


def damage_array(data, folder) -> str:
    """Rewrite one array of a prepared image folder as a valid .npy of another dtype, order or value."""
    name = data.draw(st.sampled_from(IMAGE_ARRAYS))
    array = np.load(folder / name)
    kind = data.draw(st.sampled_from(["dtype", "shuffle", "value", "shape"]))
    if kind == "dtype":
        array = array.astype(data.draw(st.sampled_from([np.float64, np.float32, np.int32, np.uint8, np.bool_])))
    elif kind == "shuffle":
        array = np.random.default_rng(data.draw(st.integers(0, 9))).permutation(array)
    elif kind == "value":
        array[data.draw(st.integers(0, len(array) - 1))] = data.draw(st.sampled_from(
            [99, -1, 3, 10**9, -(10**9), 2**62, 0, len(array)]))
    else:
        array = array[: data.draw(st.integers(0, len(array)))] if data.draw(st.booleans()) else array.reshape(1, -1)
    np.save(folder / name, array)
    return f"{kind} {name}"


@given(data=st.data())
@FUZZ
def test_prepared_image_folders(root, image_dir, data):
    """Arrays of another dtype, order or range (offsets as float64 or shuffled, labels as float32 or of 99 or -1,
    split indices of 10**9 or below 0), images.bin or meta.json damaged: read as evaluate, tune (the classify
    task's evaluation set) and the workers (its batches) read them, refused with one line, never an IndexError or
    TypeError from inside numpy or torch."""
    folder = root / f"images{next(_n)}"
    shutil.copytree(image_dir, folder)
    what = damage_array(data, folder) if data.draw(st.booleans()) else damage(
        data, folder, ["images.bin", "meta.json", *IMAGE_ARRAYS])
    task, settings = get_task("classify"), {"img_size": 16, "in_chans": 3, "num_classes": 3}
    images = build(ImageData, {"dir": str(folder)}, "run.yaml", "run config", "data.")
    split = data.draw(st.sampled_from(["train", "valid", "test"]))

    def read():
        x, y = materialize(task.eval_set(images, settings, split, 100, 0))
        xb, yb = task.batches(images, settings, split, 4, 0).get(data.draw(st.integers(0, 3)), 0)
        return x, y, yb

    kind, value = outcome(read)
    if kind == "ok":  # whatever is read is a class of the model
        x, y, yb = value
        assert len(x) == len(y) > 0 and 0 <= int(y.min()) and int(max(y.max(), yb.max())) < 3, what


@pytest.fixture(scope="module")
def model_dir(root):
    space = load_space("gpt-micro")
    return space.build_supernet().extract(space.smallest()).save_pretrained(root / "model", space.smallest())


@given(data=st.data())
@FUZZ
def test_model_folders(root, model_dir, data):
    """An exported model folder with a damaged file, its manifest often rewritten to match (so only the reader's own
    checks stand between the damage and a SafetensorError): loaded, or one line."""
    folder = root / f"model{next(_n)}"
    shutil.copytree(model_dir, folder)
    before = {name: sha256(folder / name) for name in MODEL_FILES}
    what = damage(data, folder, list(MODEL_FILES))
    if data.draw(st.booleans()) and all((folder / name).is_file() for name in MODEL_FILES):
        write_manifest(folder, MODEL_FILES)
    kind, model = outcome(lambda: load_model(folder))
    if kind == "ok":  # loaded: the weights are the exported ones, or other finite numbers of the same shapes
        assert all(t.isfinite().all() for t in model.state_dict().values()), what
        assert json.loads((folder / "config.json").read_text())["model"] == "gpt", what
        assert sha256(folder / "config.json") == before["config.json"] or "config.json" in what, what
@given(data=st.data())
@FUZZ
def test_supernet_folders(root, supernet_dir, data):
    folder = root / f"supernet{next(_n)}"
    shutil.copytree(supernet_dir, folder)
    before = {p.name: sha256(p) for p in folder.iterdir()}
    what = damage(data, folder, sorted(before))
    rewritten = data.draw(st.booleans()) and all((folder / name).is_file() for name in SUPERNET_FILES)
    if rewritten:  # the manifest matches the damage: the reader's own checks must find it
        write_manifest(folder, SUPERNET_FILES)
    kind, supernet = outcome(lambda: load_supernet(folder))
    if kind == "ok" and not rewritten:
        assert all(sha256(folder / n) == h for n, h in before.items() if n != "manifest.json"), what
    if kind == "ok":  # a sound folder: meta.json an object, every value finite
        assert isinstance(json.loads((folder / "meta.json").read_text()), dict), what
        assert all(t.isfinite().all() for t in supernet.net.state_dict().values() if t.is_floating_point()), what


@given(data=st.data())
@FUZZ
def test_checkpoint_folders(root, data):
    """A fake two-rank checkpoint (one manifest part per rank): any change is refused."""
    folder = root / f"checkpoint{next(_n)}"
    (folder / "ds").mkdir(parents=True)
    (folder / "trainer_state.json").write_text(json.dumps({"step": 2, "world_size": 2, "zero_stage": 2,
                                                           "method": "spos", "arch": None}))
    (folder / "run_state.json").write_text(json.dumps({"step": 2, "world_size": 2, "space": {}, "history": {}}))
    (folder / "ds" / "mp_rank_00_model_states.pt").write_bytes(random.Random(1).randbytes(300))
    write_manifest(folder, part=0, parts=2)
    (folder / "ds" / "zero_pp_rank_1_mp_rank_00_optim_states.pt").write_bytes(b"rank 1")
    write_manifest(folder, ["ds/zero_pp_rank_1_mp_rank_00_optim_states.pt"], part=1, parts=2)
    names = ["trainer_state.json", "run_state.json", "ds/mp_rank_00_model_states.pt", "manifest.part0.json",
             "manifest.part1.json", "ds/zero_pp_rank_1_mp_rank_00_optim_states.pt"]
    before = {n: sha256(folder / n) for n in names}
    what = damage(data, folder, names)
    kind, _ = outcome(lambda: check_checkpoint(folder))
    if kind == "ok":
        assert all(sha256(folder / n) == h for n, h in before.items() if not n.startswith("manifest")), what
        assert not (folder / "extra.bin").exists(), what  # strict: nothing unlisted


@given(data=st.data())
@FUZZ
def test_searcher_states(root, data):
    space = load_space("gpt-nano")
    searcher = RandomSearcher(space, 10, seed=1)
    for i in range(4):
        searcher.suggest(f"t{i}")
    searcher.on_trial_complete("t0", {"loss": 2.0})
    searcher.on_trial_complete("t1", error=True)
    path = root / f"state{next(_n)}.json"
    searcher.save(str(path))
    state = json.loads(path.read_text())
    key = data.draw(st.sampled_from(sorted(state)))
    state[key] = data.draw(st.sampled_from([None, 1, -1, "x", [], {}, [[0, "nan"]], 10**6, [["a", 1]]]))
    path.write_text(json.dumps(state) if data.draw(st.booleans()) else json.dumps(state)[:50])
    fresh = RandomSearcher(space, 10, seed=1)
    kind, _ = outcome(lambda: fresh.restore(str(path)))
    if kind == "ok":
        assert 0 <= fresh.suggested <= len(fresh.archs) and all(space.validate(a) for a in fresh.archs)
