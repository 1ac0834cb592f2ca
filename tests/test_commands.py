"""Commands do what their text says (issue 22), without Ray: a stale Ray cluster file and a hanging start end
at once with one line saying what to do, output into a closed pipe ends quietly, an SPOS supernet is not scored
without an architecture, a mistake in an override names the override, `--init inherit` names its flags,
`data synth` scales its validation stories, and the README's override example runs on this machine."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from tangle_ray.cli import main
from tangle_ray.data.text.prepare import FORMAT_VERSION, SPLITS
from tangle_ray.data.text.synth import write_demo_corpus
from tangle_ray.errors import TangleRayError
from tangle_ray.folders import save_supernet
from tangle_ray.models import load_space
from tangle_ray.train.config import load_config

REPO = Path(__file__).resolve().parents[1]
RECIPES = REPO / "recipes" / "runs"
ENV = {**os.environ, "RAY_AUTH_MODE": "disabled", "HF_DATASETS_OFFLINE": "1"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err[-3000:]
    return lines[0]


def test_a_stale_ray_cluster_file_ends_the_command_at_once_with_what_to_do(tmp_path):
    """A cluster that died without `ray stop` leaves Ray's cluster file naming an address where nothing listens;
    `ray.init()` then retries for minutes. Here Ray's temporary folder is redirected (RAY_TMPDIR), so no real
    cluster of the machine is touched."""
    cluster_file = tmp_path / "raytmp" / "ray" / "ray_current_cluster"
    cluster_file.parent.mkdir(parents=True)
    cluster_file.write_text(f"127.0.0.1:{_free_port()}")
    env = {k: v for k, v in ENV.items() if k != "RAY_ADDRESS"} | {"RAY_TMPDIR": str(tmp_path / "raytmp")}
    runs, data = tmp_path / "runs", tmp_path / "tokens"
    corpus = write_demo_corpus(tmp_path / "corpus", n_train=40, n_valid=10)  # data the run would prepare
    start = time.time()
    done = subprocess.run(
        [sys.executable, "-m", "tangle_ray.cli", "search", str(RECIPES / "tiny-cpu-tanglenas.yaml"),
         f"data.dir={data}", f"data.source={{kind: jsonl, path: {corpus}}}", f"run.storage_path={runs}"],
        env=env, capture_output=True, text=True, timeout=90)
    took = time.time() - start
    assert done.returncode == 2, done.stderr[-3000:]
    line = _one_error_line(done.stderr)
    assert str(cluster_file) in line and "ray stop" in line and "--address local" in line, line
    assert took < 60, f"took {took:.0f} s"
    assert not runs.exists() and not data.exists(), "nothing is written before Ray is joined"


@pytest.mark.timeout(60)
def test_a_ray_start_that_hangs_is_bounded(monkeypatch):
    import ray

    from tangle_ray import cluster

    if ray.is_initialized():
        pytest.skip("Ray is already initialised in this process")

    def hang(*args, **kwargs):
        while True:
            time.sleep(0.05)

    monkeypatch.setattr(ray, "init", hang)
    # the bound interrupts the main thread (SIGINT's Python handler); an earlier test in this process may have
    # left another handler installed (Ray's), as a fresh command never has
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        start = time.time()
        with pytest.raises(TangleRayError, match=r"Ray did not start or join within 1 s") as e:
            cluster.connect("local", num_cpus=1, start_timeout_s=1)
    finally:
        signal.signal(signal.SIGINT, previous)
    assert time.time() - start < 10 and "\n" not in str(e.value)


@pytest.fixture(scope="module")
def tokens(tmp_path_factory) -> Path:
    """A prepared-token folder (random tokens of gpt-micro's vocabulary), written in the layout ``load_split``
    reads."""
    out = tmp_path_factory.mktemp("tokens")
    rng = np.random.default_rng(0)
    splits = {}
    for split in SPLITS:
        tokens = rng.integers(0, 97, 4_000)
        (out / f"{split}.bin").write_bytes(tokens.astype(np.uint16).tobytes())
        splits[split] = {"file": f"{split}.bin", "tokens": len(tokens)}
    (out / "meta.json").write_text(json.dumps({"format_version": FORMAT_VERSION, "dtype": "uint16", "vocab_size": 97,
                                               "eot": 0, "splits": splits}))
    return out


def _supernet(folder: Path, method: str) -> Path:
    torch.manual_seed(0)
    return save_supernet(load_space("gpt-micro").build_supernet(), folder, meta={"method": method, "step": 1})


def test_evaluate_into_a_closed_pipe_ends_quietly(tokens, tmp_path):
    """`tangle-ray evaluate ... | head`: the reader goes away before the JSON is written."""
    supernet = _supernet(tmp_path / "supernet", "tanglenas")
    child = subprocess.Popen([sys.executable, "-m", "tangle_ray.cli", "evaluate", "--data", str(tokens), "--supernet",
                              str(supernet), "--samples", "4"], env=ENV, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    child.stdout.close()  # before the child has written anything
    err = child.stderr.read()
    child.wait(timeout=120)
    assert "Traceback" not in err and "BrokenPipeError" not in err and "Exception ignored" not in err, err[-3000:]
    assert child.returncode == 141


def test_evaluate_refuses_the_argmax_of_an_spos_supernet(tokens, tmp_path, capsys):
    spos = _supernet(tmp_path / "spos", "spos")
    assert main(["evaluate", "--data", str(tokens), "--supernet", str(spos), "--samples", "4"]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert "spos" in line and "chooses no architecture" in line and "--arch" in line
    arch = load_space("gpt-micro").largest()
    (tmp_path / "arch.json").write_text(json.dumps(arch))
    assert main(["evaluate", "--data", str(tokens), "--supernet", str(spos), "--arch", str(tmp_path / "arch.json"),
                 "--samples", "4"]) == 0
    assert json.loads(capsys.readouterr().out)["arch"] == arch
    searched = _supernet(tmp_path / "searched", "tanglenas")  # a search chose its argmax: scored without --arch
    assert main(["evaluate", "--data", str(tokens), "--supernet", str(searched), "--samples", "4"]) == 0


@pytest.mark.parametrize("setting, words", [
    ("stepz=3", "override stepz=3: unknown setting(s) ['stepz']"),
    ("zero_stage=7", "override zero_stage=7: zero_stage = 7 does not exist"),
    ("optimizer.lr=abc", "override optimizer.lr=abc: optimizer.lr = 'abc' must be a number"),
    ("optimizer={lr: 1.0e-3, lrr: 1}", "override optimizer={lr: 1.0e-3, lrr: 1}: unknown setting(s) ['optimizer.lrr']"),
    ("data.valid_fraction=2", "override data.valid_fraction=2: data.valid_fraction = 2.0 must be in (0, 1)"),
])
def test_a_mistake_in_an_override_names_the_override(setting, words, capsys):
    assert main(["config", "show", str(RECIPES / "tiny-cpu-tanglenas.yaml"), setting]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert words in line and "tiny-cpu-tanglenas.yaml" not in line, line


def test_a_mistake_in_the_file_names_the_file(tmp_path, capsys):
    run_file = tmp_path / "run.yaml"
    run_file.write_text("stepz: 3\nzero_stage: 2\n")
    assert main(["config", "show", str(run_file), "zero_stage=1"]) == 2
    assert f"{run_file}: unknown setting(s) ['stepz']" in _one_error_line(capsys.readouterr().err)
    run_file.write_text("zero_stage: 7\n")
    assert main(["config", "show", str(run_file), "steps=3"]) == 2
    assert f"{run_file}: zero_stage = 7 does not exist" in _one_error_line(capsys.readouterr().err)


def test_retrain_inherit_without_a_supernet_names_the_flags(tmp_path, capsys):
    arch = tmp_path / "arch.json"
    arch.write_text(json.dumps({"n_layer": 2, "n_embd": 32, "n_head": [2, 2, 2, 2], "mlp_ratio": [2, 2, 2, 2]}))
    assert main(["retrain", str(RECIPES / "tiny-cpu-retrain.yaml"), "--arch", str(arch), "--init", "inherit"]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert "--init inherit needs --supernet" in line and "init_from" not in line, line


def test_data_synth_scales_its_validation_stories(tmp_path, capsys):
    def stories(folder: Path) -> tuple[int, int]:
        return tuple(len((folder / f"{name}.jsonl").read_text().splitlines()) for name in ("train", "validation"))

    assert main(["data", "synth", "--out", str(tmp_path / "a"), "--stories", "300"]) == 0
    assert stories(tmp_path / "a") == (300, 30)
    assert main(["data", "synth", "--out", str(tmp_path / "b"), "--stories", "10"]) == 0
    assert stories(tmp_path / "b") == (10, 10)
    assert main(["data", "synth", "--out", str(tmp_path / "c"), "--stories", "10", "--valid-stories", "3"]) == 0
    assert stories(tmp_path / "c") == (10, 3)
    assert "10 training and 3 validation stories" in capsys.readouterr().out


def test_the_readme_override_example_works_with_the_tiny_recipes_on_two_cpus():
    readme = (REPO / "README.md").read_text()
    example = re.search(r"Every setting can be overridden on the command line\s*\(`([^`]+)`\)", readme).group(1)
    for recipe in ("tiny-cpu-tanglenas.yaml", "tiny-cpu-spos.yaml"):
        cfg = load_config(RECIPES / recipe, example.split())
        assert cfg.scaling.num_workers * 1 <= 2, f"{example}: {cfg.scaling.num_workers} workers of 1 CPU on 2 CPUs"
