"""pyproject.toml and environment.yml name the same runtime dependencies (conda names mapped to pip's)."""

import re
from pathlib import Path

import tomllib
import yaml

REPO = Path(__file__).resolve().parents[1]
CONDA_TO_PIP = {"pytorch": "torch", "ray-data": "ray", "ray-train": "ray", "ray-tune": "ray",
                "matplotlib-base": "matplotlib"}
CONDA_ONLY = {"python", "pip"}  # the interpreter and the installer of `pip install --no-deps -e .`


def _name(requirement: str) -> str:
    return re.split(r"[\[<>=!~ ;]", requirement.strip(), maxsplit=1)[0].lower()


def test_environment_yml_holds_the_runtime_dependencies_and_nothing_else():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    runtime = {_name(r) for r in project["dependencies"]}
    tests = {_name(r) for r in project["optional-dependencies"]["test"]}
    env = yaml.safe_load((REPO / "environment.yml").read_text())["dependencies"]
    conda = {CONDA_TO_PIP.get(n, n) for n in (_name(d) for d in env if isinstance(d, str))} - CONDA_ONLY
    assert runtime - conda == set(), "runtime dependencies missing from environment.yml"
    assert conda - runtime - tests == set(), "environment.yml packages that pyproject.toml does not need"
