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
from tangle_ray.train.capacity import check_build
from tangle_ray.train.checkpoint import (
    RUN_STATE,
    consolidated_weights,
    latest_checkpoint,
    read_run_state,
    read_run_tensors,
    read_trainer_state,
)
from tangle_ray.train.progress import silenced


def export_run(run_dir: str | Path, out_dir: str | Path | None = None, arch: Arch | None = None,
               data: Any = None) -> Path:
    """Write ``supernet/`` (full weights gathered from ZeRO shards, alphas, space), ``model/`` (the chosen
    architecture extracted: safetensors + config) and ``arch.json`` into ``out_dir`` (default RUN/export).

    A SPOS run chooses no architecture: only ``supernet/`` is written, unless ``arch`` names one. A write that
    fails (a full disk) is a ConfigError naming the folder; what it left is refused by every reader (manifests).
    A run folder on object storage is exported in its local mirror and the export copied next to it (or to
    ``out_dir``, a folder or a URI).

    A family that calibrates (MobileNetV3's batch norms) gets the extracted model prepared before it is saved
    (``ModelFamily.prepare_for_eval`` on the task's calibration batches of ``data``: the run's data section,
    read from the run's ``run_config.yaml`` when not given), so the saved model scores as ``evaluate`` scores the
    supernet's path; ``supernet/`` keeps the running statistics as trained (rank 0's: buffers are not averaged
    across ranks), which every scorer recomputes."""
    if storage.is_uri(run_dir):
        remote_out = str(out_dir) if out_dir is not None and storage.is_uri(out_dir) else None
        out = export_run(storage.localize(str(run_dir), "run folder"), None if remote_out else out_dir, arch, data)
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
    method = get_method(trainer["method"], f"{checkpoint}/trainer_state.json")
    if method.trains_supernet:  # the consolidated weights and the supernet they go into, before either exists
        check_build(space, f"export of run {run.name}")
    with silenced():
        weights = consolidated_weights(checkpoint)
    tensors = {**{f"weight {k}": t for k, t in weights.items()}, **read_run_tensors(checkpoint)}
    if (bad := first(tensor_problem(k, t, "weights") for k, t in tensors.items())) is not None:
        raise ConfigError(f"run {run}: checkpoint {checkpoint.name} holds non-finite values ({bad}); an export of "
                          "it would be unusable: resume the run from an earlier checkpoint with lower learning rates")
    meta: dict[str, Any] = {"run": str(run), "checkpoint": checkpoint.name, "step": trainer["step"],
                            "method": trainer["method"]}
    supernet = None
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
        if model is not None and space.family.calibrates:
            from tangle_ray.evaluate import calibration_batches
            from tangle_ray.tasks import get_task

            task = get_task(space.family.task)
            data = run_data(run, task) if data is None else data
            space.family.prepare_for_eval(model, calibration_batches(task, data, space))
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


def run_data(run: Path, task: Any) -> Any:
    """The data section of a run (its ``run_config.yaml``, as preflight resolved it) as the task's dataclass."""
    from tangle_ray.configs import build, read_yaml

    record = run / "run_config.yaml"
    if not record.is_file():
        raise ConfigError(f"run {run}: no run_config.yaml, so no data to recalibrate the exported model's batch "
                          "norms on; export it from the run folder the training wrote")
    raw = read_yaml(record, "run record")
    data = raw.get("config", {}).get("data") if isinstance(raw, dict) and isinstance(raw.get("config"), dict) \
        else None
    if not isinstance(data, dict):
        raise ConfigError(f"{record}: holds no config.data section; export from the run folder the training wrote")
    return build(task.data_config, data, str(record), "run config", "data.")
