"""Comparing two training runs: the final weights and architecture parameters, and what their histories say.

A run is a ``TrainResult`` or its run folder (e.g. of a run started from the command line)."""

from __future__ import annotations

from pathlib import Path

import torch

from tangle_ray.train.checkpoint import consolidated_weights, latest_checkpoint, read_run_state, read_run_tensors
from tangle_ray.train.runner import TrainResult

Run = TrainResult | Path

TIMINGS = {"elapsed_s", "tokens_per_s", "images_per_s"}  # measured, not computed: may differ between runs


def final_state(run: Run) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The consolidated weights and the architecture parameters of a run's latest checkpoint."""
    checkpoint = latest_checkpoint(_folder(run))
    alphas = {k: v for k, v in read_run_tensors(checkpoint).items() if k.startswith("alphas.")}
    return consolidated_weights(checkpoint), alphas


def history(run: Run) -> dict[str, list]:
    """What the run recorded: metrics, alphas and any-time rows (as of its latest checkpoint)."""
    return run.history if isinstance(run, TrainResult) else read_run_state(latest_checkpoint(run))["history"]


def steps(run: Run) -> list[int]:
    return [m["step"] for m in history(run)["metrics"]]


def assert_same_state(a: Run, b: Run, atol: float) -> None:
    """Equal final weights and architecture parameters, to ``atol``."""
    (wa, aa), (wb, ab) = final_state(a), final_state(b)
    assert wa.keys() == wb.keys() and aa.keys() == ab.keys()
    for name in wa:
        torch.testing.assert_close(wa[name], wb[name], rtol=0, atol=atol, msg=name)
    for name in aa:
        torch.testing.assert_close(aa[name], ab[name], rtol=0, atol=atol, msg=name)


def assert_same_run(a: Run, b: Run) -> None:
    """Bit for bit the same run: every step once, the same losses, alphas, any-time scores and final state."""
    assert steps(a) == steps(b) == sorted(set(steps(a)))
    for key in ("metrics", "alphas", "anytime"):
        rows_a = [{k: v for k, v in row.items() if k not in TIMINGS} for row in history(a)[key]]
        rows_b = [{k: v for k, v in row.items() if k not in TIMINGS} for row in history(b)[key]]
        assert rows_a == rows_b, key
    assert_same_state(a, b, atol=0)


def _folder(run: Run) -> Path:
    return run.run_dir if isinstance(run, TrainResult) else Path(run)
