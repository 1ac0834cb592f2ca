"""Progress of a run: one line per logging step from rank 0, TensorBoard events in the run's folder."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from tangle_ray.space import Arch, SearchSpace


class Progress:
    """Rank 0 prints and writes events; the other ranks stay quiet. ``run_dir`` comes from the driver's plan,
    so the events land in the run's own folder."""

    def __init__(self, run_dir: Path, rank: int, space: SearchSpace, unit: str, steps: int, local: bool):
        self.rank, self.space, self.unit, self.steps = rank, space, unit, steps
        self.writer = None
        if rank == 0 and local:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(run_dir / "tensorboard"))

    def log(self, message: str) -> None:
        if self.rank == 0:  # stderr: Ray Train forwards a worker's stdout to the driver twice
            print(f"[tangle-ray] {message}", file=sys.stderr, flush=True)

    def scalar(self, key: str, value: float, step: int) -> None:
        if self.writer is not None:
            self.writer.add_scalar(key, value, step)

    def record(self, row: dict[str, Any], arch: Arch, eta_s: float) -> None:
        """Write a metrics row as events and print it as one line."""
        if self.writer is not None:
            for key, value in row.items():
                if key != "step":
                    self.writer.add_scalar(key, value, row["step"])
            self.writer.flush()
        losses = "  ".join(f"{k} {row[k]:.4f}" for k in ("train_loss", "valid_loss") if k in row)
        ent = f"  H(alpha) {row['arch_entropy']:.3f}" if "arch_entropy" in row else ""
        self.log(
            f"step {row['step']}/{self.steps}  {losses}  {row[f'{self.unit}_per_s']:,.0f} {self.unit}/s  "
            f"arch {self.space.describe(arch)} ({row['arch_params'] / 1e6:.2f}M){ent}  ETA {eta_s / 60:.1f} min"
        )
