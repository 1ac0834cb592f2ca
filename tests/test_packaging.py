"""A wheel built from the repository carries every space and the GPT-2 BPE file, and works from anywhere."""

import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_wheel_installs_and_lists_every_space_from_another_folder(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path / "wheel"), str(REPO)], check=True, capture_output=True)
    wheel = next((tmp_path / "wheel").glob("tangle_ray-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    spaces = sorted(p.name for p in (REPO / "spaces").glob("*.yaml"))
    assert {f"tangle_ray/spaces/{s}" for s in spaces} <= names and "tangle_ray/data/text/gpt2.tiktoken" in names
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site), str(wheel)],
                   check=True, capture_output=True)
    code = f"import sys; sys.path.insert(0, {str(site)!r}); from tangle_ray.cli import main; sys.exit(main(['spaces']))"
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, check=True, capture_output=True, text=True)
    assert f"{site}" in subprocess.run([sys.executable, "-c", code.replace("sys.exit(main(['spaces']))",
                                        "import tangle_ray; print(tangle_ray.__file__)")],
                                       cwd=tmp_path, capture_output=True, text=True).stdout
    listed = sorted(line.split()[0] for line in out.stdout.splitlines())
    assert listed == sorted(s.removesuffix(".yaml") for s in spaces)
