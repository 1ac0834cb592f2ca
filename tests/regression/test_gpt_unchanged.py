"""The GPT results do not move: a tiny TangleNAS search, a SPOS supernet and a Tune ES search on the CPU
recipes give the numbers recorded in ``gpt_reference.json`` (to 1e-6; architectures exactly).

A deliberate change of results re-records the file (``python -m tests.regression.gpt_runs record``) in a
commit that says why.
"""

import json
import math

import pytest

from tests.regression.gpt_runs import REFERENCE, run_all

pytestmark = pytest.mark.ray


def assert_close(got, want, where="result"):
    if isinstance(want, dict):
        missing = sorted(set(want) - set(got))
        assert not missing, f"{where}: keys {missing} are gone"
        for key, value in want.items():
            assert_close(got[key], value, f"{where}.{key}")
    elif isinstance(want, list):
        assert len(got) == len(want), f"{where}: {len(got)} entries instead of {len(want)}"
        for i, (g, w) in enumerate(zip(got, want)):
            assert_close(g, w, f"{where}[{i}]")
    elif isinstance(want, float):
        assert math.isclose(got, want, rel_tol=1e-6, abs_tol=1e-9), f"{where}: {got!r} != {want!r}"
    else:
        assert got == want, f"{where}: {got!r} != {want!r}"


def test_gpt_runs_match_the_recorded_reference(local_ray, tmp_path):
    assert_close(run_all(tmp_path), json.loads(REFERENCE.read_text()))
