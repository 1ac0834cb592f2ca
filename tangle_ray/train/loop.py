"""The Ray Train worker loop: DeepSpeed for the weights, a replicated optimizer for the architecture.

Each step of a TangleNAS search is the first-order alternating bilevel step: an architecture step on
the architecture split (gradients only into the alphas, averaged over ranks), then a weight step on
the weight split (mixing weights sampled from the detached alphas). SPOS samples one path per step,
the same on every rank; ``fixed`` trains one architecture. The micro-batches of a global batch are
numbered 0..G-1 and rank r takes r*gas .. r*gas+gas-1; windows and random mixing weights are keyed by
(seed, step, micro-batch index), so a run does not depend on the number of workers.
"""

from __future__ import annotations

import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from tangle_ray.data.prepare import load_split
from tangle_ray.data.sampler import WindowSampler, eval_windows
from tangle_ray.errors import ConfigError
from tangle_ray.mixers import entropy, get_mixer, keyed_generator
from tangle_ray.report.leaderboard import describe
from tangle_ray.space import space_from_dict
from tangle_ray.train.config import TrainConfig, from_dict
from tangle_ray.train.deepspeed import deepspeed_config, lr_factor, weight_optimizer
from tangle_ray.train.checkpoint import DS_TAG, SEARCH_STATE, TRAINER_STATE, load_search_state

WEIGHT_PHASE, ARCH_PHASE = 0, 1


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    cfg = from_dict(loop_config["train"])
    if not cfg.scaling.use_gpu:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    Worker(cfg, loop_config).run()


class Worker:
    def __init__(self, cfg: TrainConfig, loop_config: dict[str, Any]):
        import ray.train
        import ray.train.torch

        self.cfg = cfg
        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        self.device = ray.train.torch.get_device()
        self.loop_space = loop_config["space"]
        self.space = space_from_dict(self.loop_space)
        self.gas = cfg.grad_accum_steps
        block = self.space.fixed["block_size"]
        valid = load_split(cfg.data.dir, "valid")
        self.train_data = WindowSampler(load_split(cfg.data.dir, "train"), block, cfg.micro_batch_size, cfg.seed, "train")
        self.valid_data = WindowSampler(valid, block, cfg.micro_batch_size, cfg.seed, "valid")
        self.eval_x, self.eval_y = eval_windows(valid, block, cfg.eval_windows, cfg.seed)
        self.mixer = get_mixer(cfg.mixer_name)
        self.fixed_arch = loop_config.get("arch")
        self._build(loop_config)
        self.nodes = self._gather_node_ids()
        self.tensorboard = self._tensorboard()
        self.history: dict[str, list] = {"alphas": [], "metrics": [], "anytime": []}
        self.step = 0
        self._restore()

    # ---------------------------------------------------------------- set-up
    def _build(self, loop_config: dict[str, Any]) -> None:
        import deepspeed

        torch.manual_seed(self.cfg.seed)  # the same initial weights and alphas on every rank
        overrides = {} if self.cfg.dropout is None else {"dropout": self.cfg.dropout}
        if self.cfg.method == "fixed":
            model = self._fixed_model(overrides)
            self.alphas: dict[str, torch.nn.Parameter] = {}
        else:
            supernet = self.space.build_supernet(**overrides)
            model = supernet.net
            self.alphas = {} if self.cfg.method == "spos" else {
                k: v.to(self.device).detach().requires_grad_() for k, v in supernet.alphas.items()
            }
        model.to(self.device)
        if self.cfg.compile:
            model.compile() if self.cfg.method == "fixed" else model.compile_superposition()
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = weight_optimizer(params, self.cfg)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, self.cfg))
        self.engine, _, _, _ = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler, config=deepspeed_config(self.cfg)
        )
        a = self.cfg.arch_optimizer
        self.arch_opt = (
            torch.optim.Adam(list(self.alphas.values()), lr=a.lr, betas=a.betas, weight_decay=a.weight_decay)
            if self.cfg.method == "tanglenas" else None
        )

    def _fixed_model(self, overrides: dict[str, Any]) -> torch.nn.Module:
        from tangle_ray.supernet import load_supernet
        from tangle_ray.models.gpt import GPT, gpt_config

        if self.cfg.init == "inherit":
            return load_supernet(self.cfg.init_from, self.space, **overrides).extract(self.fixed_arch)
        return GPT(gpt_config(self.space, self.space.validate(self.fixed_arch), **overrides))

    def _restore(self) -> None:
        import ray.train

        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            return
        with checkpoint.as_directory() as folder:
            state = load_search_state(folder)
            if state["world_size"] != self.world:
                raise ConfigError(
                    f"checkpoint {folder} was written by {state['world_size']} workers, this run has {self.world}; "
                    "resume with the same scaling.num_workers (ZeRO shards are per rank)"
                )
            self.engine.load_checkpoint(folder, tag=DS_TAG)
            for name, value in state["alphas"].items():
                self.alphas[name].data.copy_(value.to(self.device))
            if self.arch_opt is not None:
                self.arch_opt.load_state_dict(state["arch_opt"])
            self.history, self.step = state["history"], state["step"]
            rng_file = Path(folder) / f"rng_rank{self.rank}.pt"
            if rng_file.is_file():
                torch.set_rng_state(torch.load(rng_file, weights_only=False))
        self._log(f"resumed at step {self.step}")

    def _tensorboard(self):
        """Rank 0 writes TensorBoard events into RUN/tensorboard (local or shared file systems)."""
        if self.rank != 0 or "://" in self.cfg.run.storage_path:
            return None
        from torch.utils.tensorboard import SummaryWriter

        return SummaryWriter(str(self.cfg.run_dir() / "tensorboard"))

    def _gather_node_ids(self) -> list[str]:
        """The Ray node of every rank, in rank order (shown in trainer_state.json)."""
        import ray

        node = ray.get_runtime_context().get_node_id()
        if self.world == 1:
            return [node]
        nodes: list[str] = [""] * self.world
        dist.all_gather_object(nodes, node)
        return nodes

    # ---------------------------------------------------------------- the loop
    def run(self) -> None:
        cfg = self.cfg
        tokens_per_step = cfg.global_batch_size * self.space.fixed["block_size"]
        start, t0 = self.step, time.time()
        last_log = (self.step, t0)
        window: list[dict[str, float]] = []
        while self.step < cfg.steps:
            if cfg.inject_failure_at_step == self.step and start == 0 and self.rank == 0:
                raise RuntimeError(f"injected failure at step {self.step} (inject_failure_at_step)")
            metrics = self.train_step()
            self.step += 1
            window.append(metrics)
            log = self.step % cfg.log_every == 0 or self.step == cfg.steps
            if log:
                now = time.time()
                speed = tokens_per_step * (self.step - last_log[0]) / max(now - last_log[1], 1e-9)
                eta = (now - t0) / (self.step - start) * (cfg.steps - self.step)
                self._record(window, speed, eta, now - t0)
            if self.step % cfg.eval_every == 0 or self.step == cfg.steps:
                self._anytime()
            if self.step % cfg.checkpoint_every == 0 or self.step == cfg.steps:
                self._checkpoint()
            if log:  # throughput counts training steps, not evaluations and checkpoints
                window, last_log = [], (self.step, time.time())

    def train_step(self) -> dict[str, float]:
        metrics = {}
        if self.cfg.method == "tanglenas":
            metrics["valid_loss"] = self._arch_step()
        metrics["train_loss"] = self._weight_step()
        if self.cfg.debug_checks and self.alphas:
            self._assert_alphas_agree()
        return metrics

    def _micro_indices(self) -> range:
        return range(self.rank * self.gas, (self.rank + 1) * self.gas)

    def _progress(self) -> float:
        return self.step / self.cfg.steps

    def _forward(self, module, x: torch.Tensor, y: torch.Tensor, weights=None) -> torch.Tensor:
        x, y = x.to(self.device), y.to(self.device)
        if self.cfg.method == "fixed":
            return module(x, y)[1]
        if self.cfg.method == "spos":
            arch = self.space.sample(random.Random(keyed_generator(self.cfg.seed, self.step).initial_seed()))
            return module(x, y, arch=arch, keep_all_params=True)[1]
        return module(x, y, weights=weights)[1]

    def _arch_step(self) -> float:
        alphas = list(self.alphas.values())
        self.arch_opt.zero_grad(set_to_none=False)
        total = 0.0
        for j in self._micro_indices():
            x, y = self.valid_data.get(self.step, j)
            weights = self.mixer(self.alphas, keyed_generator(self.cfg.seed, self.step, j, ARCH_PHASE), self._progress())
            # the bare module: no DeepSpeed backward hooks, and gradients flow into the alphas alone
            loss = self._forward(self.engine.module, x, y, weights)
            (loss / self.gas).backward(inputs=alphas)
            total += loss.item() / self.gas
        if self.world > 1:
            flat = torch.cat([a.grad.reshape(-1) for a in alphas])
            dist.all_reduce(flat)
            flat /= self.world
            torch.nn.utils.vector_to_parameters(flat, [a.grad for a in alphas])
        torch.nn.utils.clip_grad_norm_(alphas, self.cfg.arch_optimizer.grad_clip)
        self.arch_opt.step()
        return self._mean_over_ranks(total)

    def _weight_step(self) -> float:
        detached = {k: a.detach() for k, a in self.alphas.items()}
        total = 0.0
        for j in self._micro_indices():
            x, y = self.train_data.get(self.step, j)
            weights = None
            if self.cfg.method == "tanglenas":
                weights = self.mixer(detached, keyed_generator(self.cfg.seed, self.step, j, WEIGHT_PHASE), self._progress())
            loss = self._forward(self.engine, x, y, weights)
            self.engine.backward(loss)
            self.engine.step()
            total += loss.item() / self.gas
        return self._mean_over_ranks(total)

    def _mean_over_ranks(self, value: float) -> float:
        if self.world == 1:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return float(t) / self.world

    def _assert_alphas_agree(self) -> None:
        flat = torch.cat([a.detach().reshape(-1) for a in self.alphas.values()])
        gathered = [torch.empty_like(flat) for _ in range(self.world)]
        dist.all_gather(gathered, flat)
        if not all(torch.equal(g, flat) for g in gathered):
            raise RuntimeError(f"architecture parameters differ between ranks at step {self.step}")

    # ---------------------------------------------------------------- reporting
    def current_arch(self) -> dict[str, Any]:
        if self.cfg.method == "fixed":
            return self.fixed_arch
        if self.cfg.method == "spos":
            return self.space.largest()
        return self.space.arch_from_weights(self.alphas)

    @torch.no_grad()
    def _anytime(self) -> None:
        """Loss of the current argmax architecture with inherited weights (its single path) on fixed windows."""
        module = self.engine.module
        module.eval()
        arch = self.current_arch()
        total, n = 0.0, self.eval_x.size(0)
        for i in range(0, n, self.cfg.micro_batch_size):
            x = self.eval_x[i:i + self.cfg.micro_batch_size].to(self.device)
            y = self.eval_y[i:i + self.cfg.micro_batch_size].to(self.device)
            loss = module(x, y)[1] if self.cfg.method == "fixed" else module(x, y, arch=arch)[1]
            total += loss.item() * x.size(0)
        module.train()
        self.history["anytime"].append({"step": self.step, "valid_loss": total / n, "arch": arch})
        if self.tensorboard is not None:
            self.tensorboard.add_scalar("anytime_valid_loss", total / n, self.step)

    def _record(self, window: list[dict[str, float]], tokens_per_s: float, eta_s: float, elapsed_s: float) -> None:
        means = {k: sum(m[k] for m in window) / len(window) for k in window[0]}
        arch = self.current_arch()
        row = {"step": self.step, **means, "tokens_per_s": tokens_per_s, "lr": self.engine.get_lr()[0],
               "arch_params": self.space.param_count(arch), "elapsed_s": elapsed_s, "optimizer_state_bytes": self._optimizer_state_bytes()}
        if self.alphas:
            row["arch_entropy"] = entropy(self.alphas)
            self.history["alphas"].append(
                {"step": self.step, **{k: torch.softmax(a.detach().float().cpu(), -1).tolist()
                                       for k, a in self.alphas.items()}}
            )
        self.history["metrics"].append(row)
        if self.tensorboard is not None:
            for key, value in row.items():
                if key != "step":
                    self.tensorboard.add_scalar(key, value, self.step)
            self.tensorboard.flush()
        losses = "  ".join(f"{k} {means[k]:.4f}" for k in ("train_loss", "valid_loss") if k in means)
        ent = f"  H(alpha) {row['arch_entropy']:.3f}" if self.alphas else ""
        self._log(
            f"step {self.step}/{self.cfg.steps}  {losses}  {tokens_per_s:,.0f} tok/s  "
            f"arch {describe(arch)} ({row['arch_params'] / 1e6:.2f}M){ent}  ETA {eta_s / 60:.1f} min"
        )

    def _optimizer_state_bytes(self) -> int:
        """Bytes of the weight optimizer's state (Adam moments) held by this rank: what ZeRO partitions."""
        optimizer = getattr(self.engine.optimizer, "optimizer", self.engine.optimizer)  # ZeRO wraps torch's
        return sum(t.numel() * t.element_size() for state in optimizer.state.values()
                   for t in state.values() if torch.is_tensor(t) and t.dim() > 0)

    def _checkpoint(self) -> None:
        import ray.train

        with tempfile.TemporaryDirectory() as tmp:
            self.engine.save_checkpoint(tmp, tag=DS_TAG)
            torch.save(torch.get_rng_state(), Path(tmp) / f"rng_rank{self.rank}.pt")
            if self.rank == 0:
                state = {
                    "step": self.step, "world_size": self.world, "space": self.loop_space,
                    "alphas": {k: a.detach().cpu() for k, a in self.alphas.items()},
                    "arch_opt": None if self.arch_opt is None else self.arch_opt.state_dict(),
                    "history": self.history,
                }
                torch.save(state, Path(tmp) / SEARCH_STATE)
                summary = {"step": self.step, "world_size": self.world, "zero_stage": self.cfg.zero_stage,
                           "method": self.cfg.method, "arch": self.current_arch(), "nodes": self.nodes}
                (Path(tmp) / TRAINER_STATE).write_text(json.dumps(summary, indent=2) + "\n")
            if self.world > 1:
                dist.barrier()
            last = self.history["metrics"][-1] if self.history["metrics"] else {}
            ray.train.report({**last, "step": self.step}, checkpoint=ray.train.Checkpoint.from_directory(tmp))

    def _log(self, message: str) -> None:
        if self.rank == 0:  # stderr: Ray Train forwards a worker's stdout to the driver twice
            print(f"[tangle-ray] {message}", file=sys.stderr, flush=True)

