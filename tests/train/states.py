"""Comparing two training runs: the final weights and architecture parameters, and what their histories say.

A run is a ``TrainResult`` or its run folder (e.g. of a run started from the command line)."""

from __future__ import annotations

import math
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
    recorded = run.history if isinstance(run, TrainResult) else read_run_state(latest_checkpoint(run))["history"]
    return recorded.to_json()


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


def assert_same_numbers(a: Run, b: Run, rtol: float = 1e-5, atol: float = 1e-6) -> None:
    """The same run to float32 round-off: every step's losses, the architecture trajectories and the any-time
    scores to ``rtol`` (``atol`` near zero); each final weight and architecture-parameter tensor to ``rtol`` in
    norm, ||a - b|| <= rtol ||a|| (Adam's update divides by the root of tiny second moments, so an element
    whose gradient is round-off may move by a fraction of the learning rate)."""
    assert steps(a) == steps(b)
    for key in ("metrics", "alphas", "anytime"):
        for row_a, row_b in zip(history(a)[key], history(b)[key], strict=True):
            assert row_a.keys() == row_b.keys()
            for k in row_a.keys() - TIMINGS - {"optimizer_state_bytes"}:  # measured, or per rank (ZeRO shards)
                _assert_close(row_a[k], row_b[k], rtol, atol, f"history {key} step {row_a['step']} {k}")
    (wa, aa), (wb, ab) = final_state(a), final_state(b)
    assert wa.keys() == wb.keys() and aa.keys() == ab.keys()
    for name, x in [*wa.items(), *aa.items()]:
        x, y = x.detach(), (wb[name] if name in wb else ab[name]).detach()
        diff, norm = float((x.double() - y.double()).norm()), float(x.double().norm())
        assert diff <= rtol * norm + atol, f"{name}: ||a - b|| = {diff:.3g}, ||a|| = {norm:.3g}"


def _assert_close(x, y, rtol: float, atol: float, where: str) -> None:
    if isinstance(x, dict):
        assert x.keys() == y.keys(), where
        for k in x:
            _assert_close(x[k], y[k], rtol, atol, f"{where}.{k}")
    elif isinstance(x, list):
        assert len(x) == len(y), where
        for i, (u, v) in enumerate(zip(x, y)):
            _assert_close(u, v, rtol, atol, f"{where}[{i}]")
    elif isinstance(x, float):
        assert math.isclose(x, y, rel_tol=rtol, abs_tol=atol), f"{where}: {x} != {y}"
    else:
        assert x == y, f"{where}: {x!r} != {y!r}"


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
