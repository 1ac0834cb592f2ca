"""The command line with fuzzed settings and options: one ``tangle-ray ...: error:`` line (exit 2),
never a traceback, a hang or Ray starting. The data folder does not exist, so an accepted run stops there."""

from __future__ import annotations

import contextlib
import io
import re
from unittest import mock

import pytest
from hypothesis import event, given
from hypothesis import strategies as st

from tangle_ray.cli import main
from tangle_ray.train.config import load_config

from .conftest import FUZZ, NASTY_STRINGS, Hang, failure, within
from .test_files import assert_valid_run

KEYS = ["steps", "seed", "optimizer.lr", "optimizer.min_lr", "optimizer.betas", "arch_optimizer.grad_clip",
        "global_batch_size", "micro_batch_size", "scaling.num_workers", "scaling.placement_strategy",
        "scaling.use_gpu", "scaling.resources_per_worker", "zero_stage", "precision", "dropout", "run.name",
        "method", "mixer", "gdas_schedule", "deepspeed", "eval_samples", "max_failures", "inject_failure_at_step",
        "space", "compile", "init", "init_from", "nonsense", "a..b", ".x", "optimizer"]
VALUES = ["1", "0", "-1", "2.0", "2.5", "1e-3", "nan", ".nan", ".inf", "-.inf", "1e999", "[1", "{a: 1", "[0.9, 1.0]",
          "[0.9, 0.99]", "true", "yes", "null", "", "'x'", "&a [*a]", "!!python/object:os.system x", "2**64",
          "18446744073709551616", "{train_batch_size: 3}", "{CPU: -1}", "{cpu: 1}", "SPREAD", "BOGUS", "../x", "a/b",
          "fixed", "spos", "gdas", "linear", "gpt-micro", "../../etc/passwd", "/dev/zero", "\x01", "x" * 3000]
overrides = st.lists(st.tuples(st.sampled_from(KEYS), st.one_of(st.sampled_from(VALUES), st.sampled_from(NASTY_STRINGS),
                                                                   st.text(max_size=10))).map(lambda kv: "=".join(kv)),
                     max_size=4)
numbers = st.one_of(st.integers(-3, 3).map(str), st.sampled_from(["-1", "x", "1e3", "nan", "", "99999999999999999999"]))


@pytest.fixture(scope="module")
def places(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz-cli")
    (root / "a-file").write_text("x")
    return {"missing": str(root / "missing"), "root": root, "file": str(root / "a-file")}


def run_cli(argv: list[str]) -> tuple[int, str]:
    """Exit code and stderr of ``tangle-ray argv``; Ray must not start."""
    err = io.StringIO()

    def no_ray(*a, **k):
        raise AssertionError(f"Ray would start for {argv}")

    try:
        with within(), contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()), \
                mock.patch("tangle_ray.train.runner.connect", no_ray), \
                mock.patch("tangle_ray.tune.tuner.connect", no_ray):
            code = main(argv)
    except SystemExit as e:  # argparse: a usage error
        code = e.code
    except (Exception, Hang) as e:
        raise AssertionError(failure(e)) from None
    text = err.getvalue()
    event(f"exit {code}" + (" (accepted, no data)" if "holds no prepared data" in text else ""))
    assert code in (0, 2), f"exit {code}: {text[-500:]}"
    if code == 2:
        lines = [ln for ln in text.splitlines() if re.match(r"tangle-ray( [\w-]+)*: error:", ln)]
        assert len(lines) == 1, f"expected one error line, got: {text[-800:]}"
        assert len(lines[0]) < 2000 and "Traceback" not in text
    return code, text


@given(command=st.sampled_from(["search", "supernet", "retrain"]), settings=overrides, arch=st.sampled_from(
    ["missing", "file", "/dev/zero", "/proc/self/status", ""]))
@FUZZ
def test_train_commands(places, command, settings, arch):
    pinned = [f"data.dir={places['missing']}", "data.source=null", f"run.storage_path={places['root'] / 'runs'}"]
    extra = ["--arch", places.get(arch, arch)] if command == "retrain" else []
    code, text = run_cli([command, *settings, *pinned, *extra])
    assert code == 2
    if "holds no prepared data" in text:  # every setting was accepted: it must be valid
        method = {"search": "tanglenas", "supernet": "spos", "retrain": "fixed"}[command]
        arch_setting = [f"arch={places.get(arch, arch)}", "init=scratch"] if command == "retrain" else []
        assert_valid_run(load_config(None, [f"method={method}", *arch_setting, *settings, *pinned]))


@given(what=st.sampled_from(["synth", "prepare", "evaluate", "export"]), n=numbers, seed=numbers,
       out=st.sampled_from(["new", "file", "/proc/tangle-ray-fuzz", "/dev/null"]))
@FUZZ
def test_other_commands(places, what, n, seed, out):
    out = {"new": str(places["root"] / "out"), "file": places["file"]}.get(out, out)
    argv = {
        "synth": ["data", "synth", "--out", out, "--stories", n],
        "prepare": ["data", "prepare", "--out", out, "--kind", "text", "--path", places["missing"], "--seed", seed,
                    "--num-proc", n],
        "evaluate": ["evaluate", "--data", places["missing"], "--model", places["missing"], "--seed", seed,
                     "--samples", n],
        "export": ["export", places["missing"], "--out", out],
    }[what]
    code, _ = run_cli(argv)
    if code == 0:  # only a small synthetic corpus into a folder of our own may succeed
        assert what == "synth" and out == str(places["root"] / "out") and 1 <= int(n) <= 3
