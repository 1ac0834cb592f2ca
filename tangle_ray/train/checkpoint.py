"""Run state on disk: what a checkpoint holds besides DeepSpeed's shards, finding it, and consolidating it.

A checkpoint folder (one per ``ray.train.report``) holds DeepSpeed's files under ``ds/`` (written by all
ranks), ``search_state.pt`` (rank 0: step, architecture parameters and their optimizer, the history of
the run), ``trainer_state.json`` (rank 0: a readable summary) and ``rng_rank{r}.pt`` (each rank).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from tangle_ray.errors import ConfigError

DS_TAG = "ds"
SEARCH_STATE = "search_state.pt"
TRAINER_STATE = "trainer_state.json"


def find_checkpoints(run_dir: str | Path) -> list[Path]:
    """Checkpoint folders of a run, oldest first (by the step they hold)."""
    folders = [p.parent for p in Path(run_dir).glob(f"checkpoint_*/{TRAINER_STATE}")]
    return sorted(folders, key=lambda p: read_trainer_state(p)["step"])


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    found = find_checkpoints(run_dir)
    return found[-1] if found else None


def read_trainer_state(checkpoint: str | Path) -> dict[str, Any]:
    path = Path(checkpoint) / TRAINER_STATE
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"checkpoint {checkpoint}: cannot read {TRAINER_STATE} ({e}); is it complete?") from None


def load_search_state(checkpoint: str | Path) -> dict[str, Any]:
    path = Path(checkpoint) / SEARCH_STATE
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        raise ConfigError(f"checkpoint {checkpoint}: cannot load {SEARCH_STATE} ({type(e).__name__}: {e})") from None


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
