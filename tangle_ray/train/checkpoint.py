"""Run checkpoints: what a checkpoint folder holds, writing and reading it, finding it, consolidating it.

A checkpoint folder (one per ``ray.train.report``) holds DeepSpeed's files under ``ds/`` (written by all
ranks), ``run_state.json`` (rank 0: step, world size, space, the run's history and the method's JSON state),
``run_state.safetensors`` (rank 0: the method's tensors, e.g. architecture parameters and their optimizer),
``trainer_state.json`` (rank 0: a readable summary) and one manifest part per rank (``seal``, written last:
sizes and sha256 of that rank's files). No RNG state: every draw of a step is keyed (``keyed.py``).

Every reader here checks the manifests first (``check_checkpoint``): a folder with a missing, truncated or
changed file, or a file no rank wrote, is refused with a ConfigError naming it. Everything tangle_ray writes
is JSON or safetensors; DeepSpeed's own shards are ``torch.save`` files, read here only with
``weights_only=True`` (``weights_only_loads``). See docs/reliability.md for the trust boundary.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import pickle
import shutil
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from tangle_ray.configs import read_json
from tangle_ray.errors import DataError, TangleRayError, clip
from tangle_ray.manifest import check_manifest, write_manifest
from tangle_ray.names import check_name
from tangle_ray.train.history import RunHistory

DS_TAG = "ds"
RUN_STATE = "run_state.json"
RUN_TENSORS = "run_state.safetensors"
TRAINER_STATE = "trainer_state.json"
RAY_SNAPSHOT = "checkpoint_manager_snapshot.json"  # Ray Train's record of the checkpoints of a run
MAX_JSON_BYTES = 1 << 30
TRUST_ENV = "TANGLE_RAY_TRUST_PICKLES"  # "1": DeepSpeed files may hold any Python object (trusted folders only)
log = logging.getLogger(__name__)


# ===================================================================== writing (workers)


def write_run_state(folder: Path, state: dict[str, Any], history: RunHistory, tensors: dict[str, torch.Tensor],
                    summary: dict) -> None:
    """Rank 0's files: the run state (JSON + tensors) and the readable summary."""
    (folder / RUN_STATE).write_text(json.dumps({**state, "history": history.to_json()}) + "\n")
    save_file({k: t.detach().contiguous().cpu() for k, t in tensors.items()}, str(folder / RUN_TENSORS))
    (folder / TRAINER_STATE).write_text(json.dumps(summary, indent=2) + "\n")


def seal(folder: Path, rank: int, world: int) -> None:
    """Each rank, after its last file and before the barrier: the manifest part of the files this rank wrote."""
    write_manifest(folder, part=rank, parts=world)


# ===================================================================== checking and finding


def check_checkpoint(folder: str | Path) -> Path:
    """``folder`` if its manifests check (every rank's files present and unchanged, nothing else there)."""
    check_manifest(folder, "checkpoint", strict=True, required=(TRAINER_STATE, RUN_STATE))
    return Path(folder)


def find_checkpoints(run_dir: str | Path) -> list[Path]:
    """Checkpoint folders of a run, oldest first (by the step they hold; unreadable ones first). Unchecked."""
    folders = [p.parent for p in Path(run_dir).glob(f"checkpoint_*/{TRAINER_STATE}")]
    return sorted(folders, key=lambda p: (_peek_step(p), p.name))


def remove_cut_checkpoints(run_dir: str | Path) -> list[Path]:
    """At the start of a run: delete the checkpoint folders a cut write left behind (a full disk: Ray's copy
    fails on every rank and leaves a folder of zero-length files): folders that Ray's snapshot does not name
    and that hold no byte of data. Anything holding data, or recorded by Ray, is left alone. The removed ones."""
    run_dir = Path(run_dir)
    recorded: set[str] = set()
    try:
        snapshot = _read_json_file(run_dir / RAY_SNAPSHOT)
        entries = [*(snapshot.get("checkpoint_results") or []), snapshot.get("latest_checkpoint_result") or {}]
        recorded = {e.get("checkpoint_dir_name") for e in entries if isinstance(e, dict)}
    except TangleRayError:
        pass  # no snapshot (nothing recorded yet), or unreadable: ``resume_checkpoint`` says so
    removed = []
    for folder in sorted(run_dir.glob("checkpoint_*")):
        if folder.name in recorded or folder.is_symlink() or not folder.is_dir():
            continue
        try:
            empty = all(p.is_dir() and not p.is_symlink() or p.is_file() and not p.is_symlink()
                        and p.stat().st_size == 0 for p in folder.rglob("*"))
            if empty:
                shutil.rmtree(folder)
                removed.append(folder)
                log.warning("removed %s: a checkpoint whose write was cut short (every file empty, never "
                            "recorded by Ray)", folder)
        except OSError as e:
            log.warning("could not remove the empty checkpoint folder %s (%s)", folder, e.strerror or e)
    return removed


def set_aside_checkpoints(run_dir: str | Path, from_step: int) -> list[int]:
    """After a divergence: move the checkpoints of ``from_step`` and later (they hold the state that diverged)
    to ``RUN/diverged/`` and drop them from Ray's snapshot, so that a rerun resumes from the last good one.
    The steps moved."""
    run_dir = Path(run_dir)
    moved = {p.name: _peek_step(p) for p in find_checkpoints(run_dir) if _peek_step(p) >= from_step}
    if not moved:
        return []
    snapshot_path = run_dir / RAY_SNAPSHOT
    if snapshot_path.is_file():
        snapshot = _read_json_file(snapshot_path)
        pairs = [(r, i) for r, i in zip(snapshot.get("checkpoint_results") or [],
                                        snapshot.get("checkpoint_report_indices") or [])
                 if isinstance(r, dict) and r.get("checkpoint_dir_name") not in moved]
        snapshot["checkpoint_results"] = [r for r, _ in pairs]
        snapshot["checkpoint_report_indices"] = [i for _, i in pairs]
        steps = [r.get("metrics", {}).get("step", -1) if isinstance(r.get("metrics"), dict) else -1 for r, _ in pairs]
        snapshot["latest_checkpoint_result"] = pairs[steps.index(max(steps))][0] if pairs else None
        for key in ("validated_checkpoint_dir_names", "timed_out_validation_checkpoint_dir_names",
                    "failed_validation_checkpoint_dir_names"):
            if isinstance(snapshot.get(key), list):
                snapshot[key] = [n for n in snapshot[key] if n not in moved]
        tmp = snapshot_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(snapshot))
        tmp.replace(snapshot_path)
    aside = run_dir / "diverged"
    aside.mkdir(exist_ok=True)
    for name in moved:
        shutil.rmtree(aside / name, ignore_errors=True)
        (run_dir / name).rename(aside / name)
    return sorted(moved.values())


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest checkpoint of a run that checks; newer ones that do not are skipped with a warning naming
    them. When checkpoints exist and none checks, the newest one's error is raised."""
    found = find_checkpoints(run_dir)
    first_error = None
    for folder in reversed(found):
        try:
            read_trainer_state(folder)
            return folder
        except TangleRayError as e:
            first_error = first_error or e
            log.warning("skipping %s", e)
    if first_error is not None:
        raise first_error
    return None


def resume_checkpoint(run_dir: str | Path) -> Path | None:
    """The checkpoint Ray Train will resume ``run_dir`` from (the latest of its snapshot), checked; None for a
    fresh run. A checkpoint that fails its check is a ConfigError naming the file: Ray would hand it to the
    workers. Without Ray's snapshot (a run cut short before Ray recorded a checkpoint), the newest that checks."""
    snapshot = Path(run_dir) / RAY_SNAPSHOT
    if not snapshot.is_file():
        return latest_checkpoint(run_dir)
    try:
        latest = _read_json_file(snapshot).get("latest_checkpoint_result") or {}
        name = latest.get("checkpoint_dir_name") if isinstance(latest, dict) else None
    except TangleRayError as e:
        raise DataError(f"run {run_dir}: Ray's {RAY_SNAPSHOT} is unreadable ({e}); start a new run.name") from None
    if name is None:
        return None
    folder = Path(run_dir) / check_name(name, f"{snapshot}: checkpoint_dir_name")
    try:
        read_trainer_state(folder)
    except TangleRayError as e:
        raise DataError(f"{e}. Ray resumes from this checkpoint: restore the file, or give a new run.name "
                          "to start over") from None
    return folder


# ===================================================================== reading


def read_trainer_state(checkpoint: str | Path) -> dict[str, Any]:
    state = _read_json(check_checkpoint(checkpoint), TRAINER_STATE)
    _require(state, checkpoint, TRAINER_STATE, step=int, world_size=int, zero_stage=int, method=str)
    if state["step"] < 0 or state["world_size"] < 1 or state["zero_stage"] not in (0, 1, 2, 3):
        raise DataError(f"checkpoint {checkpoint}: {TRAINER_STATE} holds step {state['step']}, world_size "
                          f"{state['world_size']}, zero_stage {state['zero_stage']}: not a run checkpoint")
    return state


def read_run_state(checkpoint: str | Path) -> dict[str, Any]:
    """Rank 0's state of a checkpoint: step, world size, space, method state, and the run's ``RunHistory``."""
    state = _read_json(check_checkpoint(checkpoint), RUN_STATE)
    _require(state, checkpoint, RUN_STATE, step=int, world_size=int, space=dict, history=dict)
    return {**state, "history": RunHistory.from_json(state["history"], f"checkpoint {checkpoint}: {RUN_STATE}")}


def read_run_tensors(checkpoint: str | Path) -> dict[str, torch.Tensor]:
    folder = check_checkpoint(checkpoint)
    try:
        return load_file(str(folder / RUN_TENSORS))
    except Exception as e:  # missing or corrupt: safetensors raises its own error types
        raise DataError(f"checkpoint {checkpoint}: cannot read {RUN_TENSORS} ({type(e).__name__}: {e})") from None


def consolidated_weights(checkpoint: str | Path) -> dict[str, torch.Tensor]:
    """Full fp32 weights of the trained module, gathered from DeepSpeed's (possibly ZeRO-sharded) files."""
    folder = Path(checkpoint)
    stage = read_trainer_state(folder)["zero_stage"]
    try:
        with weights_only_loads():
            if stage == 0:
                states = torch.load(folder / DS_TAG / "mp_rank_00_model_states.pt", map_location="cpu",
                                    weights_only=True)
                return {k: v.float() for k, v in states["module"].items()}
            from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

            return get_fp32_state_dict_from_zero_checkpoint(str(folder), tag=DS_TAG)
    except pickle.UnpicklingError as e:
        raise DataError(f"checkpoint {folder}: a DeepSpeed file holds Python objects beyond tensors "
                          f"({clip(str(e), 200)}); if you trust this folder, set {TRUST_ENV}=1") from None
    except (OSError, RuntimeError, KeyError, ValueError, TypeError, EOFError) as e:
        raise DataError(f"checkpoint {folder}: DeepSpeed files missing or corrupt "
                          f"({type(e).__name__}: {clip(str(e), 200)})") from None


def _deepspeed_safe_globals() -> list:
    """The few DeepSpeed classes its optimizer shards pickle (besides tensors and plain data)."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, ZeroStageEnum, fragment_address]


class _WeightsOnlyTorch(types.ModuleType):
    """``torch`` as DeepSpeed's loaders see it inside ``weights_only_loads``: ``load`` never unpickles code."""

    def __getattr__(self, name: str) -> Any:
        return getattr(torch, name)

    @staticmethod
    def load(f, *args, **kwargs):
        kwargs["weights_only"] = True
        with torch.serialization.safe_globals(_deepspeed_safe_globals()):
            return torch.load(f, *args, **kwargs)


@contextlib.contextmanager
def weights_only_loads() -> Iterator[None]:
    """Within: DeepSpeed's checkpoint loaders (``engine.load_checkpoint``, ``zero_to_fp32``) read their
    ``torch.save`` files with ``weights_only=True``; an unexpected Python object is an UnpicklingError.
    ``TANGLE_RAY_TRUST_PICKLES=1`` turns this off (for folders you trust)."""
    if os.environ.get(TRUST_ENV) == "1":
        yield
        return
    import deepspeed.utils.zero_to_fp32 as zero_to_fp32
    from deepspeed.runtime.checkpoint_engine import torch_checkpoint_engine

    modules = (zero_to_fp32, torch_checkpoint_engine)
    saved = [m.torch for m in modules]
    for m in modules:
        m.torch = _WeightsOnlyTorch("torch")
    try:
        yield
    finally:
        for m, original in zip(modules, saved):
            m.torch = original


def _peek_step(folder: Path) -> int:
    try:
        step = json.loads((folder / TRAINER_STATE).read_text())["step"]
        return step if isinstance(step, int) else -1
    except (OSError, ValueError, KeyError, TypeError, RecursionError):
        return -1


def _read_json(checkpoint: Path, name: str) -> dict[str, Any]:
    try:
        return _read_json_file(checkpoint / name)
    except TangleRayError as e:
        raise DataError(f"checkpoint {checkpoint}: cannot read {name} ({e}); is it complete?") from None


def _read_json_file(path: Path) -> dict[str, Any]:
    """A JSON object tangle_ray or Ray wrote (NaN allowed: a diverged loss is recorded as it was)."""
    data = read_json(path, path.name, MAX_JSON_BYTES, plain=False)
    if not isinstance(data, dict):
        raise DataError(f"{path.name} is not a JSON object")
    return data


def _require(state: dict[str, Any], checkpoint: str | Path, name: str, **types_: type) -> None:
    for key, typ in types_.items():
        value = state.get(key)
        if not isinstance(value, typ) or (typ is int and isinstance(value, bool)):
            raise DataError(f"checkpoint {checkpoint}: {name} has no {key} of type {typ.__name__} "
                              f"(got {clip(repr(value), 60)}); not a run checkpoint of this tangle_ray")
