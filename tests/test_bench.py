"""The bench scripts: `--help` works on any machine, bad arguments are refused while parsing, small image counts
make a valid benchmark folder. (The benchmarks themselves are measurements, run by hand: docs/benchmarks.md.)"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=120, cwd=BENCH.parent)


@pytest.mark.parametrize("script", sorted(p.name for p in BENCH.glob("*.py")))
def test_help_works_anywhere(script):
    done = _run(str(BENCH / script), "--help")
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.startswith("usage:")


@pytest.mark.parametrize("args, message", [
    (("train.py", "--stages", ""), "give at least one ZeRO stage"),
    (("train.py", "--stages", "0,4"), "ZeRO stages are 0, 1, 2 and 3"),
    (("data.py", "--images", "3"), "3 is below the minimum, 4"),
    (("data.py", "--part", "pipelines", "--tokens", "224"), "224 is below the minimum, 225"),
    (("data.py", "--part", "pipelines", "--mfu", "0"), "0.0 is below the minimum, 1e-06"),
    (("load.py", "--trials", "2"), "2 is below the minimum, 3"),
])
def test_bad_arguments_are_refused_while_parsing(args, message):
    done = _run(str(BENCH / args[0]), *args[1:])
    assert done.returncode == 2 and message in done.stderr, done.stderr[-2000:]


@pytest.mark.parametrize("n", [4, 5, 9, 16, 64])
def test_few_images_still_make_every_split(n, tmp_path):
    spec = importlib.util.spec_from_file_location("bench_data", BENCH / "data.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    from tangle_ray.data.images.prepare import ImageStore, prepare_images
    from tangle_ray.data.images.sources import ImageSource

    assert bench.MIN_IMAGES == 4
    bench.write_jpegs(tmp_path / "jpegs", n)
    prepare_images(ImageSource(path=str(tmp_path / "jpegs")), tmp_path / "images")
    store = ImageStore(tmp_path / "images")
    sizes = {split: len(store.split(split)) for split in ("train", "valid", "test")}
    assert sum(sizes.values()) == n and min(sizes.values()) >= 1, sizes
