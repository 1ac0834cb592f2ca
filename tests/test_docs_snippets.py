"""The docs' Python snippets work as written.

A ```python block right after a line ``<!-- test-snippet ... -->`` in README.md or docs/*.md runs here, as a
reader would run it: in a fresh Python process, in an empty folder of a plain clone (no ``TANGLE_RAY_GPT2_BPE``,
no files beside the repository), offline. Mark only blocks that are self-contained and take seconds on a CPU,
without Ray. Every other Python block at least imports what it names from tangle_ray.
"""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
MARKER = "<!-- test-snippet"
# the blocks that must stay marked: a marker lost in an edit fails here instead of silently testing less
EXPECTED = {("docs/data.md", "Quick start (offline)"), ("docs/data.md", "Images > Quick start (offline)")}
FENCE = re.compile(r"^```python\n(.*?)^```", re.S | re.M)


def _blocks() -> list[tuple[str, str, bool, str]]:
    """(file, heading path, marked, code) of every ```python block of the docs."""
    found = []
    for path in DOCS:
        text = path.read_text()
        for match in FENCE.finditer(text):
            before = text[: match.start()].splitlines()
            headings: dict[int, str] = {}
            for line in before:
                if m := re.match(r"(#{2,6}) (.+)", line):
                    level = len(m.group(1))
                    headings = {k: v for k, v in headings.items() if k < level} | {level: m.group(2).strip()}
            marked = bool(before) and before[-1].startswith(MARKER)
            heading = " > ".join(headings[k] for k in sorted(headings))
            found.append((str(path.relative_to(REPO)), heading, marked, match.group(1)))
    return found


BLOCKS = _blocks()
MARKED = [(f, h, code) for f, h, marked, code in BLOCKS if marked]


SHELL = re.compile(r"^(<!-- test-snippet[^\n]*-->)\n```bash\n(.*?)^```", re.S | re.M)
SHELL_BLOCKS = [(str(path.relative_to(REPO)), m.group(2)) for path in DOCS for m in SHELL.finditer(path.read_text())]


def test_markers_mark_python_blocks():
    """A marker not directly above a ```python or ```bash fence would test nothing."""
    for path in DOCS:
        lines = path.read_text().splitlines()
        for i, line in enumerate(lines):
            if line.startswith(MARKER):
                assert i + 1 < len(lines) and lines[i + 1] in ("```python", "```bash"), f"{path.name}:{i + 1}: {line}"
    assert ("docs/scaling.md" in {f for f, _ in SHELL_BLOCKS}), "a shell snippet that was tested lost its marker"


@pytest.mark.parametrize("where, code", SHELL_BLOCKS, ids=[f for f, _ in SHELL_BLOCKS])
def test_marked_shell_snippet_runs(where, code, tmp_path):
    """A marked ```bash block, line by line as a reader types it, in an empty folder whose recipes/ and spaces/
    are the repository's (nothing is written into the clone); every line must exit 0."""
    folder = tmp_path / "reader"
    folder.mkdir()
    for name in ("recipes", "spaces"):
        (folder / name).symlink_to(REPO / name)
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "2"}
    for line in (raw.split("#", 1)[0].strip() for raw in code.splitlines()):
        if line:
            done = subprocess.run(["bash", "-c", line], cwd=folder, env=env, capture_output=True, text=True,
                                  timeout=300)
            assert done.returncode == 0, f"{where}: `{line}` failed:\n{done.stderr[-3000:]}"
    assert EXPECTED <= {(f, h) for f, h, _ in MARKED}, "a snippet that was tested lost its marker"


@pytest.mark.parametrize("where, code", [(f"{f}: {h}", code) for f, h, code in MARKED],
                         ids=[f"{f}:{h}" for f, h, _ in MARKED])
def test_marked_snippet_runs(where, code, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TANGLE_RAY_GPT2_BPE"}
    env.update(HF_DATASETS_CACHE=str(tmp_path / "hf_cache"), HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1",
               HF_DATASETS_DISABLE_PROGRESS_BARS="1", OMP_NUM_THREADS="2")
    folder = tmp_path / "reader"
    folder.mkdir()
    done = subprocess.run([sys.executable, "-c", code], cwd=folder, env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, f"{where} failed:\n{done.stderr[-3000:]}"


@pytest.mark.parametrize("where, code", [(f"{f}: {h}", code) for f, h, marked, code in BLOCKS if not marked],
                         ids=[f"{f}:{h}" for f, h, marked, _ in BLOCKS if not marked])
def test_every_other_snippet_imports_what_it_names(where, code):
    """Blocks too slow or too dependent (Ray, a trained supernet) to run: their tangle_ray imports resolve."""
    imports = [node for node in ast.parse(code).body
               if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("tangle_ray")]
    for node in imports:
        module = __import__(node.module, fromlist=["_"])
        for alias in node.names:
            assert hasattr(module, alias.name), f"{where}: `from {node.module} import {alias.name}` fails"
