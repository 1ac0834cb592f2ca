"""The Ray Train worker loop: DeepSpeed trains the weights, a method (``tangle_ray/methods/``) runs each step.

The loop reads top to bottom: build the method's module and the DeepSpeed engine, restore the latest
checkpoint if there is one, then step, log, evaluate and checkpoint until the last step.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import torch
import torch.distributed as dist

from tangle_ray import storage
from tangle_ray.divergence import (
    METRIC,
    DivergenceError,
    Problem,
    first,
    hyperparameters,
    make_record,
    restore_optimizer_settings,
    settings_of,
    tensor_problem,
    weights_problem,
)
from tangle_ray.errors import ConfigError
from tangle_ray.evaluate import Shard, calibration_batches, inherited_model, score
from tangle_ray.methods import Context
from tangle_ray.scaling.config import peak_of
from tangle_ray.scaling.predict import arch_flops, step_flops
from tangle_ray.space import space_to_dict
from tangle_ray.train import checkpoint as ckpt
from tangle_ray.train.config import RunPlan
from tangle_ray.train.deepspeed import deepspeed_config, lr_factor, weight_optimizer
from tangle_ray.train.history import RunHistory
from tangle_ray.train.progress import Progress, quiet_worker
from tangle_ray.train.resources import MemoryMeter, snapshot


def train_loop_per_worker(loop_config: dict[str, Any]) -> dict[str, Any] | None:
    import ray.train

    lap = Laps(time.time())
    plan: RunPlan = loop_config["plan"]
    if plan.data_remote:  # this node's mirror of the prepared data in the bucket
        storage.pull(plan.data_remote, Path(plan.config.data.dir))
        lap("mirror")
    if not plan.config.scaling.use_gpu:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    if not plan.verbose:
        quiet_worker(plan.run_dir, ray.train.get_context().get_world_rank())
    worker = Worker(plan, lap)
    try:
        worker.run()
    except DivergenceError as e:  # every rank, at the same step: returned, not raised (Ray would retry it)
        return {METRIC: e.record}  # rank 0's reaches the driver as Result.return_value
    return None


class Laps:
    """Wall seconds of named parts, each from the end of the one before: ``lap("part")`` ends a part."""

    def __init__(self, start: float):
        self.start, self.last, self.parts = start, start, {}

    def __call__(self, part: str) -> None:
        now = time.time()
        self.parts[part], self.last = now - self.last, now


class Worker:
    def __init__(self, plan: RunPlan, lap: Laps):
        """``lap``: the set-up's clock, started when this process entered the training function."""
        import deepspeed
        import ray.train
        import ray.train.torch

        lap("imports")
        cfg, task, fixed = plan.config, plan.task, plan.space.fixed
        info = ray.train.get_context()
        rank, world = info.get_world_rank(), info.get_world_size()
        self.ctx = ctx = Context(
            plan, rank, world, ray.train.torch.get_device(),
            train=task.batches(cfg.data, fixed, "train", cfg.micro_batch_size, cfg.seed, cfg.micro_per_step),
            valid=task.batches(cfg.data, fixed, "valid", cfg.micro_batch_size, cfg.seed, cfg.micro_per_step),
        )
        self.eval_set = task.eval_set(cfg.data, fixed, "valid", cfg.eval_samples, cfg.seed)
        # a family that calibrates (batch norms): the any-time curve scores the extracted, recalibrated path
        self.calibration = calibration_batches(task, cfg.data, plan.space) if cfg.method_class.trains_supernet \
            else None
        self.method = cfg.method_class(ctx)
        lap("data")  # batches and evaluation sets opened
        self.meter = MemoryMeter(ctx.device, cfg.memory_limit_gb)  # before the model exists
        torch.manual_seed(cfg.seed)  # the same initial weights and architecture parameters on every rank
        module = self.method.build().to(ctx.device)
        if cfg.compile:
            self.method.compile(module)
        lap("model")
        optimizer = weight_optimizer(module, cfg, plan.space.family.no_weight_decay)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, cfg))
        self.engine, _, _, _ = deepspeed.initialize(
            model=module, optimizer=optimizer, lr_scheduler=scheduler, config=deepspeed_config(cfg))
        self.method.attach(self.engine)
        lap("deepspeed")
        self.meter.check(0)
        self.nodes = self._gather_node_ids()
        self.progress = Progress(plan.run_dir, rank, plan.space, task.unit, cfg.steps)
        peak = peak_of(torch.cuda.get_device_name(ctx.device)) if ctx.device.type == "cuda" else None
        flops = self._step_flops() if peak else None
        # on a GPU of the peak table: the MFU is this times the units per second (all ranks' bf16 peak)
        self.mfu_per_unit_s = flops / (cfg.global_batch_size * task.units_per_sample(fixed) * peak * world) \
            if flops else None
        self.history = RunHistory()
        self.step = 0
        self._restore()
        lap("restore")  # with the progress log and the node ids gathered
        self.history.startups.append({"step": self.step, "process_at": psutil.Process().create_time(),
                                      "entered_at": lap.start, "ready_at": lap.last,
                                      **{f"{k}_s": v for k, v in lap.parts.items()}})

    # ---------------------------------------------------------------- the loop
    def run(self) -> None:
        cfg = self.ctx.cfg
        units_per_step = cfg.global_batch_size * self.ctx.task.units_per_sample(self.ctx.space.fixed)
        start, t0 = self.step, time.time()
        last_log = (self.step, t0)
        window: list[dict[str, float]] = []
        if self.step == 0 and "alphas" in (extra := self.method.progress()):  # where the trajectories start
            self.history.alphas.append({"step": 0, **extra["alphas"]})
        while self.step < cfg.steps:
            if cfg.inject_failure_at_step == self.step and start == 0 and self.ctx.rank == 0:
                raise RuntimeError(f"injected failure at step {self.step} (inject_failure_at_step)")
            drill = cfg.inject_nan_at_step == self.step + 1 and start == 0
            if drill and self.ctx.rank == self.ctx.world - 1:
                self.method.inject_nan(cfg.inject_nan_into)
            window.append(metrics := self.method.step(self.step))
            self.step += 1
            self._guard(self.method.problem(metrics), drill)
            self.meter.check(self.step)
            log = self.step % cfg.log_every == 0 or self.step == cfg.steps
            if log:
                now = time.time()
                speed = units_per_step * (self.step - last_log[0]) / max(now - last_log[1], 1e-9)
                eta = (now - t0) / (self.step - start) * (cfg.steps - self.step)
                self._record(window, speed, eta, now - t0)
            if self.step % cfg.eval_every == 0 or self.step == cfg.steps:
                self._evaluate()
            if self.step % cfg.checkpoint_every == 0 or self.step == cfg.steps:
                self._checkpoint()
            if log:  # throughput counts training steps, not evaluations and checkpoints
                window, last_log = [], (self.step, time.time())

    def _step_flops(self) -> float | None:
        """FLOPs of one training step (all ranks): what a supernet method computes, or the trained architecture's;
        None for a family that does not count its superposed FLOPs."""
        cfg, space = self.ctx.cfg, self.ctx.space
        try:
            if cfg.method_class.trains_supernet:
                return step_flops(space, cfg.method, cfg.global_batch_size)
            return arch_flops(space, self.ctx.plan.arch, cfg.global_batch_size)
        except NotImplementedError:
            return None

    def _record(self, window: list[dict[str, float]], units_per_s: float, eta_s: float, elapsed_s: float) -> None:
        means = {k: sum(m[k] for m in window) / len(window) for k in window[0]}
        arch = self.method.reported_arch()
        extra = self.method.progress()
        ranks = self._gather(snapshot(self.engine, self.meter))
        self.history.resources.append({"step": self.step, "ranks": ranks})
        row = {"step": self.step, **means, f"{self.ctx.task.unit}_per_s": units_per_s, "lr": self.engine.get_lr()[0],
               "elapsed_s": elapsed_s, "optimizer_state_bytes": ranks[0]["optimizer_state_bytes"]}
        if arch is not None:
            row["arch_params"] = self.ctx.space.param_count(arch)
        if self.mfu_per_unit_s:
            row["mfu"] = self.mfu_per_unit_s * units_per_s
        if "arch_entropy" in extra:
            row["arch_entropy"] = extra["arch_entropy"]
        if "alphas" in extra:
            self.history.alphas.append({"step": self.step, **extra["alphas"]})
        self.history.metrics.append(row)
        self.progress.record(row, arch, eta_s)

    def _evaluate(self) -> None:
        """The any-time curve: the evaluated architecture's single path (or the fixed model) with the current
        weights, on fixed validation samples, in eval mode; each rank scores a share of the batches."""
        module = self.engine.module
        if self.calibration is not None:  # every rank alike: the same weights, images and arithmetic
            import deepspeed

            gathered = (deepspeed.zero.GatheredParameters(list(module.parameters())) if self.ctx.cfg.zero_stage == 3
                        else contextlib.nullcontext())
            with gathered:  # ZeRO-3: the full weights for the extraction, on every rank (a collective)
                module = inherited_model(module, self.method.eval_arch(), [b.to(self.ctx.device)
                                                                           for b in self.calibration])
            output_of = lambda x: module(x)[0]  # noqa: E731
        else:
            output_of = self.method.output_of(module)
        scores = score(module, output_of, self.ctx.task, self.eval_set, self.ctx.cfg.micro_batch_size,
                       shard=Shard(self.ctx.rank, self.ctx.world, self._gather))
        row = {"step": self.step, **{f"valid_{m.key}": scores[m.key] for m in self.ctx.task.metrics},
               "arch": self.method.eval_arch()}
        self.history.anytime.append(row)
        self.progress.scalar("anytime_valid_loss", scores["loss"], self.step)

    # ---------------------------------------------------------------- the divergence guard
    def _guard(self, problem: Problem | None, drill: bool = False) -> None:
        """Stop every rank at this step if any rank saw a value that shows divergence (a collective on the flag:
        no rank is left waiting in a collective the others never reach); each raises with the record, which
        ``train_loop_per_worker`` returns and the driver turns into one line (``tangle_ray.divergence``)."""
        ctx = self.ctx
        if not ctx.any_rank(problem is not None):
            return
        problems = self._gather(problem)
        rank, found = next((r, p) for r, p in enumerate(problems) if p is not None)
        self.progress.log(f"diverged at step {self.step}: {found}")
        raise DivergenceError(make_record(found, self.step, rank, ctx.world,
                                          settings_of(ctx.cfg, self.method.learns_alphas), drill))

    def _state_problem(self) -> Problem | None:
        """A non-finite value in what a checkpoint would hold: this rank's weights (or ZeRO-3 partition) and
        the method's tensors."""
        _, tensors = self.method.state()
        return first([weights_problem(self.engine.module),
                      *(tensor_problem(f"checkpoint tensor {k}", t, "alphas") for k, t in tensors.items())])

    # ---------------------------------------------------------------- checkpoints
    def _checkpoint(self) -> None:
        import ray.train

        ctx = self.ctx
        self._guard(self._state_problem())  # never a checkpoint with a non-finite value
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp)
            self.engine.save_checkpoint(tmp, tag=ckpt.DS_TAG)
            if ctx.rank == 0:
                method_state, tensors = self.method.state()
                state = {"step": self.step, "world_size": ctx.world, "space": space_to_dict(ctx.space),
                         "method": method_state}
                summary = {"step": self.step, "world_size": ctx.world, "zero_stage": ctx.cfg.zero_stage,
                           "method": ctx.cfg.method, "arch": self.method.reported_arch(), "nodes": self.nodes}
                ckpt.write_run_state(folder, state, self.history, tensors, summary)
            ckpt.seal(folder, ctx.rank, ctx.world)
            self._barrier()
            ray.train.report({**self.history.last_metrics, "step": self.step},
                             checkpoint=ray.train.Checkpoint.from_directory(tmp))

    def _restore(self) -> None:
        import ray.train

        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            return
        with self._local_copy(checkpoint) as folder:
            state = ckpt.read_run_state(folder)
            if state["world_size"] != self.ctx.world:
                raise ConfigError(
                    f"checkpoint {folder} was written by {state['world_size']} workers, this run has "
                    f"{self.ctx.world}; resume with the same scaling.num_workers (ZeRO shards are per rank)"
                )
            optimizer, scheduler = self.engine.optimizer, self.engine.lr_scheduler
            fresh = hyperparameters(optimizer, ("betas", "weight_decay", "initial_lr"))  # as the config says
            base_lrs = list(scheduler.base_lrs)
            with ckpt.weights_only_loads():  # DeepSpeed's shards: tensors and plain data only
                self.engine.load_checkpoint(folder, tag=ckpt.DS_TAG)
            # a diverged run resumed with other optimizer settings (tangle_ray.divergence) uses them
            restore_optimizer_settings(optimizer, fresh)
            if list(scheduler.base_lrs) != base_lrs:
                scheduler.base_lrs = base_lrs
                for group, base in zip(optimizer.param_groups, base_lrs, strict=True):
                    group["lr"] = base * lr_factor(scheduler.last_epoch, self.ctx.cfg)
            self.method.load_state(state["method"], ckpt.read_run_tensors(folder))
            self.history, self.step = state["history"], state["step"]
        self.progress.log(f"resumed at step {self.step}")

    @contextlib.contextmanager
    def _local_copy(self, checkpoint: Any) -> Iterator[Path]:
        """The checkpoint as a local folder: itself on a shared file system; else one copy per Ray node,
        downloaded by the node's first rank while the others wait at a barrier, and removed once every rank
        has read it.

        Not ``Checkpoint.as_directory``: its folder is shared by the node's processes and only the download is
        locked, so a rank that arrives after the first download has finished downloads again over the files
        another rank is reading (seen as a sha256 mismatch on a two-node run)."""
        import pyarrow.fs

        if isinstance(checkpoint.filesystem, pyarrow.fs.LocalFileSystem):
            yield Path(checkpoint.path)
            return
        token = self._gather(uuid.uuid4().hex)[0]  # rank 0's: one name for this restore
        node = self.nodes[self.ctx.rank]
        folder = Path(tempfile.gettempdir()) / f"tangle_ray_restore_{token}_{node[:12]}"
        downloads = self.nodes.index(node) == self.ctx.rank  # the node's first rank (not the local rank:
        # Ray Train numbers those per IP address, and nodes may share one)
        try:
            if downloads:
                checkpoint.to_directory(str(folder))
            self._barrier()
            yield folder
            self._barrier()  # every rank has read it
        finally:
            if downloads:
                shutil.rmtree(folder, ignore_errors=True)

    def _barrier(self) -> None:
        if self.ctx.world > 1:
            dist.barrier()

    def _gather_node_ids(self) -> list[str]:
        """The Ray node of every rank, in rank order (shown in trainer_state.json)."""
        import ray

        return self._gather(ray.get_runtime_context().get_node_id())

    def _gather(self, value: Any) -> list[Any]:
        """``value`` of every rank, in rank order."""
        if self.ctx.world == 1:
            return [value]
        out: list[Any] = [None] * self.ctx.world
        dist.all_gather_object(out, value)
        return out
