"""The README's commands work as written: the two opening commands, and every tangle-ray command it shows."""

import re
import shlex
from pathlib import Path

import pytest

from tangle_ray.cli import build_parser

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()
PLACEHOLDERS = {"RUN.yaml": "recipes/runs/tiny-cpu-tanglenas.yaml", "SEARCH.yaml": "recipes/tune/tiny-cpu-random.yaml"}


def test_opening_commands_install_run_the_demo_and_the_tests_ci_runs():
    block = re.search(r"```bash\n(.*?)```", README, re.S).group(1).strip().splitlines()
    assert len(block) == 2
    install, tests = block
    assert install.startswith("pip install torch==2.13.0 && ") and install.endswith("tangle-ray demo")
    assert "=" not in install.split("&&")[-1], "the demo needs no environment variable"
    assert tests in (REPO / ".ci" / "run").read_text(), ".ci/run must run the README's test command verbatim"


def _commands() -> list[str]:
    inline = re.findall(r"`(tangle-ray [^`]+)`", README)
    return sorted({c.replace("\\|", "|") for c in inline})


@pytest.mark.parametrize("command", _commands())
def test_every_command_in_the_readme_parses(command):
    words = shlex.split(command)[1:]
    words = [PLACEHOLDERS.get(w, w) for w in words]
    words = [w.split("|")[0].strip("[]") for w in words if w not in ("[key=value", "...]")]
    words = [w for w in words if w]
    if len(words) == 1:  # a command named in prose: it exists
        assert words[0] in build_parser()._subparsers._group_actions[0].choices
        return
    args, extra = build_parser().parse_known_args(words)
    assert all("=" in e for e in extra), f"{command}: unknown options {extra}"
    for word in words:
        if word.startswith("recipes/"):
            assert (REPO / word).is_file(), f"{command}: {word} does not exist"
