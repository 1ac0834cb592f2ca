"""``tangle-ray export``: consolidate a run's latest checkpoint into a supernet folder and an extracted model."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from safetensors import SafetensorError

from tangle_ray import storage
from tangle_ray.divergence import first, tensor_problem
from tangle_ray.errors import ConfigError, StorageError, clip, write_fault
from tangle_ray.folders import load_weights, save_supernet
from tangle_ray.methods import get_method
from tangle_ray.models import space_from_dict
from tangle_ray.space import Arch
from tangle_ray.train.checkpoint import (
    RUN_STATE,
    consolidated_weights,
    latest_checkpoint,
    read_run_state,
    read_run_tensors,
    read_trainer_state,
)
from tangle_ray.train.progress import silenced


def export_run(run_dir: str | Path, out_dir: str | Path | None = None, arch: Arch | None = None) -> Path:
    """Write ``supernet/`` (full weights gathered from ZeRO shards, alphas, space), ``model/`` (the chosen
    architecture extracted: safetensors + config) and ``arch.json`` into ``out_dir`` (default RUN/export).

    A SPOS run chooses no architecture: only ``supernet/`` is written, unless ``arch`` names one. A write that
    fails (a full disk) is a ConfigError naming the folder; what it left is refused by every reader (manifests).
    A run folder on object storage is exported in its local mirror and the export copied next to it (or to
    ``out_dir``, a folder or a URI)."""
    if storage.is_uri(run_dir):
        remote_out = str(out_dir) if out_dir is not None and storage.is_uri(out_dir) else None
        out = export_run(storage.localize(str(run_dir), "run folder"), None if remote_out else out_dir, arch)
        if remote_out or out_dir is None:
            storage.push(out, storage.check_uri(remote_out or storage.join(str(run_dir), "export"), "--out"))
        return out
    run = Path(run_dir)
    checkpoint = latest_checkpoint(run)
    if checkpoint is None:
        raise ConfigError(f"run {run}: no checkpoint found (expected checkpoint_*/trainer_state.json)")
    out = Path(out_dir) if out_dir else run / "export"
    trainer = read_trainer_state(checkpoint)
    space = space_from_dict(read_run_state(checkpoint)["space"], source=f"{checkpoint}/{RUN_STATE}")
    with silenced():
        weights = consolidated_weights(checkpoint)
    tensors = {**{f"weight {k}": t for k, t in weights.items()}, **read_run_tensors(checkpoint)}
    if (bad := first(tensor_problem(k, t, "weights") for k, t in tensors.items())) is not None:
        raise ConfigError(f"run {run}: checkpoint {checkpoint.name} holds non-finite values ({bad}); an export of "
                          "it would be unusable: resume the run from an earlier checkpoint with lower learning rates")
    meta: dict[str, Any] = {"run": str(run), "checkpoint": checkpoint.name, "step": trainer["step"],
                            "method": trainer["method"]}
    supernet, method = None, get_method(trainer["method"], f"{checkpoint}/trainer_state.json")
    if not method.trains_supernet:
        chosen = trainer["arch"]
        model = space.family.build_model(space, chosen)
        load_weights(model, weights, f"checkpoint {checkpoint}")
    else:
        supernet = space.build_supernet()
        load_weights(supernet.net, weights, f"checkpoint {checkpoint}")
        found = method.exported_arch(supernet, read_run_tensors(checkpoint))
        chosen = space.validate(arch) if arch is not None else found
        model = supernet.extract(chosen) if chosen is not None else None  # SPOS: its supernet goes on to tune
    try:
        (out / "arch.json").unlink(missing_ok=True)  # never beside a model/ of another export
        if supernet is not None:
            save_supernet(supernet, out / "supernet", meta)
        if model is not None:
            model.save_pretrained(out / "model", arch=chosen)
            (out / "arch.json").write_text(json.dumps(space.active(chosen), indent=2) + "\n")
    except (OSError, SafetensorError) as e:
        fault = write_fault(e, out) or f"cannot write to {out} ({clip(str(e), 200)})"
        raise StorageError(f"export of run {run.name}: {fault}, then export again") from None
    return out
