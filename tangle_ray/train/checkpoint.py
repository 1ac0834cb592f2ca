"""Run checkpoints: what a checkpoint folder holds, writing and reading it, finding it, consolidating it.

A checkpoint folder (one per ``ray.train.report``) holds DeepSpeed's files under ``ds/`` (written by all
ranks), ``run_state.json`` (rank 0: step, world size, space, the run's history and the method's JSON state),
``run_state.safetensors`` (rank 0: the method's tensors, e.g. architecture parameters and their optimizer),
``rng_rank{r}.safetensors`` (each rank's torch RNG state) and ``trainer_state.json`` (rank 0: a readable
summary). Everything tangle_ray writes here is JSON or safetensors: reading it runs no code.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from tangle_ray.errors import ConfigError

DS_TAG = "ds"
RUN_STATE = "run_state.json"
RUN_TENSORS = "run_state.safetensors"
TRAINER_STATE = "trainer_state.json"


def write_rank_files(folder: Path, rank: int) -> None:
    """What every rank adds besides DeepSpeed's shards: its RNG state."""
    save_file({"rng": torch.get_rng_state()}, str(folder / f"rng_rank{rank}.safetensors"))


def write_run_state(folder: Path, state: dict[str, Any], tensors: dict[str, torch.Tensor], summary: dict) -> None:
    """Rank 0's files: the run state (JSON + tensors) and the readable summary."""
    (folder / RUN_STATE).write_text(json.dumps(state) + "\n")
    save_file({k: t.detach().contiguous().cpu() for k, t in tensors.items()}, str(folder / RUN_TENSORS))
    (folder / TRAINER_STATE).write_text(json.dumps(summary, indent=2) + "\n")


def restore_rng(folder: Path, rank: int) -> None:
    path = folder / f"rng_rank{rank}.safetensors"
    if path.is_file():
        torch.set_rng_state(load_file(str(path))["rng"])


def find_checkpoints(run_dir: str | Path) -> list[Path]:
    """Checkpoint folders of a run, oldest first (by the step they hold)."""
    folders = [p.parent for p in Path(run_dir).glob(f"checkpoint_*/{TRAINER_STATE}")]
    return sorted(folders, key=lambda p: read_trainer_state(p)["step"])


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    found = find_checkpoints(run_dir)
    return found[-1] if found else None


def _read_json(checkpoint: str | Path, name: str) -> dict[str, Any]:
    try:
        return json.loads((Path(checkpoint) / name).read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"checkpoint {checkpoint}: cannot read {name} ({e}); is it complete?") from None


def read_trainer_state(checkpoint: str | Path) -> dict[str, Any]:
    return _read_json(checkpoint, TRAINER_STATE)


def read_run_state(checkpoint: str | Path) -> dict[str, Any]:
    return _read_json(checkpoint, RUN_STATE)


def read_run_tensors(checkpoint: str | Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(Path(checkpoint) / RUN_TENSORS))
    except Exception as e:  # missing or corrupt: safetensors raises its own error types
        raise ConfigError(f"checkpoint {checkpoint}: cannot read {RUN_TENSORS} ({type(e).__name__}: {e})") from None


def consolidated_weights(checkpoint: str | Path) -> dict[str, torch.Tensor]:
    """Full fp32 weights of the trained module, gathered from DeepSpeed's (possibly ZeRO-sharded) files."""
    folder = Path(checkpoint)
    stage = read_trainer_state(folder)["zero_stage"]
    try:
        if stage == 0:
            states = torch.load(folder / DS_TAG / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)
            return {k: v.float() for k, v in states["module"].items()}
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        return get_fp32_state_dict_from_zero_checkpoint(str(folder), tag=DS_TAG)
    except (OSError, RuntimeError, KeyError, ValueError) as e:
        raise ConfigError(f"checkpoint {folder}: DeepSpeed files missing or corrupt ({type(e).__name__}: {e})") from None
