"""The driver: check a run before any worker starts, run it on Ray Train, write the reports."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from tangle_ray.supernet import load_supernet, space_shape
from tangle_ray.configs import to_dict
from tangle_ray.data.prepare import prepare_text, read_meta
from tangle_ray.data.sources import TextSource
from tangle_ray.errors import ConfigError
from tangle_ray.space import SearchSpace, load_space, space_from_dict, space_to_dict
from tangle_ray.train.config import TrainConfig
from tangle_ray.train.export import export_run
from tangle_ray.train.loop import train_loop_per_worker
from tangle_ray.train.checkpoint import latest_checkpoint, load_search_state, read_trainer_state


@dataclass
class TrainResult:
    run_dir: Path
    checkpoint: Path
    arch: dict[str, Any]
    history: dict[str, list]
    export_dir: Path | None
    seconds: float


def preflight(cfg: TrainConfig) -> dict[str, Any]:
    """Everything a user can get wrong, checked on the driver; returns the loop config for the workers."""
    space = load_space(cfg.space)
    arch = None
    if cfg.method == "fixed":
        arch = space.validate(cfg.arch, source="arch")
    if cfg.init == "inherit":  # the supernet folder must load, and be of this space, before workers start
        load_supernet(cfg.init_from, space)
    data_dir = Path(cfg.data.dir)
    if not (data_dir / "meta.json").is_file():
        if cfg.data.source is None:
            raise ConfigError(
                f"data.dir = {str(data_dir)!r} holds no prepared data (meta.json); prepare it with "
                "`tangle-ray data prepare` or give data.source to prepare it now"
            )
        try:
            source = TextSource(**cfg.data.source)
        except TypeError as e:
            raise ConfigError(f"data.source = {cfg.data.source!r}: {e}; see tangle_ray.data.TextSource") from None
        prepare_text(source, data_dir, tokenizer=cfg.data.tokenizer, bpe_file=cfg.data.bpe_file,
                     valid_fraction=cfg.data.valid_fraction, seed=cfg.seed, num_proc=cfg.data.num_proc)
    meta = read_meta(data_dir)
    if meta["vocab_size"] > space.fixed["vocab_size"]:
        raise ConfigError(
            f"data.dir {data_dir}: tokenizer vocabulary {meta['vocab_size']} does not fit space {space.name!r} "
            f"(vocab_size {space.fixed['vocab_size']})"
        )
    run_dir = cfg.run_dir()
    _check_writable(run_dir)
    _check_resume(cfg, run_dir, space)
    train = to_dict(cfg)
    train["data"]["dir"] = str(data_dir.resolve())
    train["run"]["storage_path"] = str(run_dir.parent)  # workers run in another folder
    if cfg.init_from:
        train["init_from"] = str(Path(cfg.init_from).resolve())
    return {"train": train, "space": space_to_dict(space), "arch": arch}


def _check_writable(run_dir: Path) -> None:
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / ".write-test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise ConfigError(f"run.storage_path: cannot write to {run_dir} ({e.strerror or e})") from None


def _check_resume(cfg: TrainConfig, run_dir: Path, space: SearchSpace) -> None:
    stored = run_dir / "run_config.yaml"
    if stored.is_file():
        previous = yaml.safe_load(stored.read_text())
        if previous.get("identity") != cfg.identity():
            raise ConfigError(
                f"run {run_dir} exists with a different configuration; give a new run.name to start a fresh "
                f"run, or rerun with the original settings to resume it"
            )
    checkpoint = latest_checkpoint(run_dir)
    if checkpoint is None:
        return
    state = read_trainer_state(checkpoint)
    if state["world_size"] != cfg.scaling.num_workers:
        raise ConfigError(
            f"checkpoint {checkpoint} was written by {state['world_size']} workers but scaling.num_workers = "
            f"{cfg.scaling.num_workers}; ZeRO shards are per rank: resume with {state['world_size']} workers"
        )
    if space_shape(space_from_dict(load_search_state(checkpoint)["space"])) != space_shape(space):
        raise ConfigError(f"checkpoint {checkpoint} belongs to another space than {cfg.space!r}")


def run_training(cfg: TrainConfig, address: str | None = None, export: bool = True) -> TrainResult:
    """Train a supernet (TangleNAS search or SPOS) or one architecture on Ray Train, then write reports."""
    import ray
    import ray.train
    from ray.train.torch import TorchTrainer

    loop_config = preflight(cfg)
    run_dir = cfg.run_dir()
    (run_dir / "run_config.yaml").write_text(
        yaml.safe_dump({"identity": cfg.identity(), "config": to_dict(cfg)}, sort_keys=False)
    )
    if not ray.is_initialized():
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        ray.init(address=address)
    s = cfg.scaling
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        scaling_config=ray.train.ScalingConfig(
            num_workers=s.num_workers, use_gpu=s.use_gpu, resources_per_worker=s.resources_per_worker,
            placement_strategy=s.placement_strategy,
        ),
        run_config=ray.train.RunConfig(
            name=cfg.run_name(), storage_path=str(run_dir.parent),
            failure_config=ray.train.FailureConfig(max_failures=cfg.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
        ),
    )
    start = time.time()
    result = trainer.fit()
    checkpoint = Path(result.checkpoint.path)
    state = load_search_state(checkpoint)
    arch = read_trainer_state(checkpoint)["arch"]
    from tangle_ray.report.runs import write_run_report

    export_dir = export_run(run_dir) if export else None
    write_run_report(run_dir, cfg, state["history"], arch, space_from_dict(loop_config["space"]), export_dir)
    return TrainResult(run_dir, checkpoint, arch, state["history"], export_dir, time.time() - start)
