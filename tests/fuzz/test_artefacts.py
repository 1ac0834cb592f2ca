"""Damaged artefacts: prepared token folders, supernet folders, run checkpoints and searcher states are refused
with a ConfigError naming the problem, or (when the damage changed nothing that is read) load as before."""

from __future__ import annotations

import itertools
import json
import random
import shutil

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from tangle_ray.data.text.prepare import FORMAT_VERSION, SPLITS, load_split, verify_tokens
from tangle_ray.folders import load_supernet, save_supernet
from tangle_ray.manifest import sha256, write_manifest
from tangle_ray.models import load_space
from tangle_ray.names import check_name
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


@given(meta=st.one_of(st.just(META), mutated(META)), data=st.data())
@FUZZ
def test_prepared_token_folders(root, meta, data):
    folder = root / f"tokens{next(_n)}"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for s in SPLITS:
        tokens = rng.integers(0, VOCAB, 50).astype(np.uint16)
        if data.draw(st.integers(0, 5)) == 0:
            tokens[data.draw(st.integers(0, 49))] = data.draw(st.sampled_from([VOCAB, 65535]))  # garbled
        body = tokens.tobytes()
        if data.draw(st.integers(0, 5)) == 0:
            body = body[: data.draw(st.integers(0, len(body)))]  # cut
        (folder / f"{s}.bin").write_bytes(body)
    text = json.dumps(meta)
    if data.draw(st.integers(0, 7)) == 0:
        text = text[: data.draw(st.integers(0, len(text)))]
    (folder / "meta.json").write_text(text)
    kind, _ = outcome(lambda: verify_tokens(folder))
    if kind == "ok":  # every split a plain file name of the folder, of its size, ids inside the vocabulary
        for s in SPLITS:
            info = meta["splits"][s]
            check_name(info["file"], "file")
            tokens = load_split(folder, s)
            assert (folder / info["file"]).stat().st_size == info["tokens"] * 2
            assert len(tokens) == 0 or int(tokens.max()) < meta["vocab_size"] <= 65536


@given(data=st.data())
@FUZZ
def test_supernet_folders(root, supernet_dir, data):
    folder = root / f"supernet{next(_n)}"
    shutil.copytree(supernet_dir, folder)
    before = {p.name: sha256(p) for p in folder.iterdir()}
    what = damage(data, folder, sorted(before))
    kind, _ = outcome(lambda: load_supernet(folder))
    if kind == "ok":
        assert all(sha256(folder / n) == h for n, h in before.items() if n != "manifest.json"), what


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
