"""The divergence guard: a run whose numbers stop being numbers ends at that step, in one line.

After every step the worker asks the method for the first value of the step (in the order the step computed
them: the architecture step's loss, its gradient norm and the architecture parameters, then the weight step's
loss and gradient norm) that shows divergence: not finite, or a cross-entropy above ``LOSS_LIMIT``. Every rank
checks its own values; a collective on a flag makes all ranks stop together (``train/worker.py``), so none waits
in a collective the others never reach, and every rank's training function returns the record and ends (a
raised error would make Ray restart the workers from their last checkpoint, to diverge again at the same step;
Ray Train hands rank 0's return value to the driver as ``Result.return_value``). The
driver keeps the record (``RUN/diverged.json``) and turns it into one line (``stopped_line``): which quantity,
at which step, the last good checkpoint and the settings that usually cause it. No checkpoint is written after
the first bad value, and none with a non-finite tensor (checked before each write), so every checkpoint of a
run, and every export of one, holds finite numbers.

A diverged run may be resumed with other optimizer settings under its own name (``resumable_changes``): the
driver accepts changes of ``optimizer.*`` and ``arch_optimizer.*`` for a run folder holding ``diverged.json``,
and the worker applies the new settings over those its checkpoint restored.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

RECORD = "diverged.json"
METRIC = "diverged"  # the key of the record in what a diverged run's training function returns
# A mean cross-entropy above this gives the targets, on average, a probability below float32's smallest normal
# number (1.2e-38): the loss of a model whose outputs have left the range the precision represents. Healthy runs
# start at the loss of a uniform guess (ln 50257 = 10.8 for GPT-2's vocabulary) and never come near it.
LOSS_LIMIT = -math.log(torch.finfo(torch.float32).tiny)
RESUMABLE = ("optimizer", "arch_optimizer")  # the settings a diverged run may change when resumed by name
WEIGHT_SETTINGS = ("optimizer.lr", "optimizer.warmup_steps", "optimizer.weight_decay", "optimizer.grad_clip")
ARCH_SETTINGS = ("arch_optimizer.lr", "arch_optimizer.weight_decay", "arch_optimizer.grad_clip")


class DivergenceError(RuntimeError):
    """Raised on every rank of a run that diverged, with its ``record`` (``make_record``). The training function
    returns the record instead of raising (an exception would make Ray restart the workers, to diverge again)."""

    def __init__(self, record: dict[str, Any]):
        super().__init__(f"diverged at step {record['step']}: {record['quantity']} = {record['value']} "
                         f"{record['why']}")
        self.record = record


@dataclass(frozen=True)
class Problem:
    """The first value of a step that shows divergence."""

    quantity: str  # "train_loss", "weight gradient norm", "alphas.n_embd", ...
    value: str  # as printed: "nan", "inf", "1.49e+03"
    why: str  # "is not finite", "is above 87.3 nats ..."
    cause: str  # "loss", "weights" or "alphas": which settings usually cause it
    # the value is of the state the step produced (architecture parameters after their update, what a checkpoint
    # would hold), not of the state it started from (a loss or gradient is of the weights the step began with)
    after_update: bool = False

    def __str__(self) -> str:
        return f"{self.quantity} = {self.value} {self.why}"


def loss_problem(name: str, value: float) -> Problem | None:
    """A loss that is not finite or above ``LOSS_LIMIT``."""
    if not math.isfinite(value):
        return Problem(name, f"{value}", "is not finite", "loss")
    if value > LOSS_LIMIT:
        return Problem(name, f"{value:.4g}", f"is above {LOSS_LIMIT:.1f} nats (a cross-entropy beyond float32's "
                       "range: the loss exploded)", "loss")
    return None


def norm_problem(name: str, value: float | None, cause: str) -> Problem | None:
    """A gradient norm that is not finite (None: not computed)."""
    if value is None or math.isfinite(value):
        return None
    return Problem(name, f"{value}", "is not finite", cause)


def tensor_problem(name: str, tensor: torch.Tensor, cause: str) -> Problem | None:
    """A tensor holding a NaN or an infinity."""
    bad = ~torch.isfinite(tensor.detach())
    if not bool(bad.any()):
        return None
    values = tensor.detach()[bad]
    kind = "nan" if bool(values.isnan().any()) else str(float(values[0]))
    return Problem(name, kind, f"({int(bad.sum())} of {tensor.numel()} values not finite)", cause, True)


def first(problems: Iterable[Problem | None]) -> Problem | None:
    return next((p for p in problems if p is not None), None)


def weights_problem(module: torch.nn.Module, what: str = "weight") -> Problem | None:
    """The first parameter of ``module`` holding a non-finite value on this rank (its ZeRO-3 partition there)."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            local = p.ds_tensor if hasattr(p, "ds_tensor") else p  # ZeRO-3 keeps the rank's partition aside
            if local.numel() and (problem := tensor_problem(f"{what} {name}", local, "weights")):
                return problem
    return None


def poison(module: torch.nn.Module) -> None:
    """The ``inject_nan_at_step`` drill: every weight of this rank (its ZeRO-3 partitions) becomes NaN."""
    with torch.no_grad():
        for p in module.parameters():
            (p.ds_tensor if hasattr(p, "ds_tensor") else p).fill_(float("nan"))


# ===================================================================== the record and the driver's line


def make_record(problem: Problem, step: int, rank: int, world: int, settings: dict[str, Any],
                drill: bool) -> dict[str, Any]:
    """What stopped a run: the problem, the step, the rank that saw it first, the settings that usually cause
    it. ``bad_from``: the first step whose state is known to diverge (a loss at step k is of the state after step
    k - 1): checkpoints from it on are set aside."""
    return {**asdict(problem), "step": step, "bad_from": step if problem.after_update else step - 1,
            "rank": rank, "world_size": world, "settings": settings, "drill": drill}


def record_from_return(value: Any) -> dict[str, Any] | None:
    """The record in what the training function of rank 0 returned (``{METRIC: record}``), or None: the run did
    not diverge."""
    record = value.get(METRIC) if isinstance(value, dict) else None
    return record if isinstance(record, dict) and isinstance(record.get("step"), int) else None


def write_record(run_dir: Path, record: dict[str, Any]) -> None:
    """The driver: what stopped the run, for a resume with other optimizer settings (``resumable_changes``)."""
    (Path(run_dir) / RECORD).write_text(json.dumps(record, indent=2) + "\n")


def read_record(run_dir: Path) -> dict[str, Any] | None:
    """The divergence record of a run, or None (none, or unreadable: then it is ignored)."""
    try:
        record = json.loads((Path(run_dir) / RECORD).read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and isinstance(record.get("step"), int) else None


def clear_record(run_dir: Path) -> None:
    (Path(run_dir) / RECORD).unlink(missing_ok=True)


def settings_of(cfg: Any, learns_alphas: bool) -> dict[str, Any]:
    """The settings that usually make a run diverge, with their values in ``cfg``."""
    keys = WEIGHT_SETTINGS + (ARCH_SETTINGS if learns_alphas else ())
    return {key: getattr(getattr(cfg, key.split(".")[0]), key.split(".")[1]) for key in keys}


def stopped_line(run_name: str, record: dict[str, Any], checkpoint: Path | None, checkpoint_step: int | None,
                 logs: Path, set_aside: list[int] = ()) -> str:
    """One line: what diverged where, the last good checkpoint, the settings that usually cause it and how to
    resume. ``set_aside``: steps of checkpoints that held the diverging state (moved out of the run)."""
    problem = f"{record.get('quantity')} = {record.get('value')} {record.get('why')}"
    if record.get("world_size", 1) > 1:
        problem += f" (seen first on rank {record.get('rank')})"
    settings = record.get("settings") or {}
    cause = record.get("cause")
    keys = [k for k in settings if k.startswith("arch_")] if cause == "alphas" else \
        [k for k in settings if not k.startswith("arch_")] if cause == "weights" else \
        [k for k in settings if k.endswith(".lr")] + ["optimizer.warmup_steps"]
    shown = ", ".join(f"{k} = {settings[k]:g}" for k in dict.fromkeys(keys) if k in settings)
    if checkpoint is not None:
        good = f"the last good checkpoint is step {checkpoint_step} ({checkpoint})"
        how = f"to resume from step {checkpoint_step}"
    else:
        good, how = "no checkpoint was written before it", "to start it again"
    if set_aside:
        steps = ", ".join(map(str, set_aside))
        good += f" (the checkpoint of step {steps} held the diverging state already: moved to diverged/)"
    if record.get("drill"):
        advice = f"injected by the inject_nan_at_step drill; rerun the same command {how}"
    else:
        what = "the architecture parameters' optimizer" if cause == "alphas" else "the weights' optimizer" \
            if cause == "weights" else "a learning rate"
        advice = (f"this usually comes from {what} stepping too far: too large a learning rate or weight decay, "
                  f"too short a warmup or no gradient clipping ({shown}); lower it and rerun with "
                  f"run.name={run_name} {how}")
    return f"run {run_name} diverged at step {record.get('step')}: {problem}; {good}; {advice} (worker logs: {logs})"


def resumable_changes(run_dir: Path, stored: Any, identity: dict[str, Any]) -> list[str] | None:
    """The settings in which ``identity`` differs from the ``stored`` identity of a run that diverged, if all
    of them are optimizer settings (``RESUMABLE``); None when the run did not diverge or others differ."""
    if read_record(run_dir) is None or not isinstance(stored, dict):
        return None
    before, now = _flat(stored), _flat(identity)
    changed = sorted(k for k in before.keys() | now.keys() if before.get(k, _MISSING) != now.get(k, _MISSING))
    if not changed or any(k.split(".")[0] not in RESUMABLE for k in changed):
        return None
    return changed


_MISSING = object()


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out |= _flat(v, f"{prefix}{k}.")
        else:
            out[f"{prefix}{k}"] = v
    return out


def restore_optimizer_settings(optimizer: torch.optim.Optimizer, fresh: list[dict[str, Any]]) -> None:
    """Put the settings of a freshly built optimizer (``fresh``: each group's hyperparameters from the run's
    config) over those a checkpoint restored: a diverged run resumed with other settings uses them. Values that
    are equal are left untouched (an ordinary resume stays bit-identical)."""
    for group, settings in zip(optimizer.param_groups, fresh, strict=True):
        for key, value in settings.items():
            if group.get(key) != value:
                group[key] = value


def hyperparameters(optimizer: torch.optim.Optimizer, keys: tuple[str, ...]) -> list[dict[str, Any]]:
    """Each group's ``keys`` (e.g. betas, weight decay) as built from the config, before a checkpoint loads."""
    return [{k: group[k] for k in keys if k in group} for group in optimizer.param_groups]
