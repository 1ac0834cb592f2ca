"""Progress of a run: one line per logging step from rank 0, TensorBoard events, quiet workers.

Rank 0 appends its lines to ``RUN/progress.log``; the driver prints that file as it grows (``follow``), so a
person sees each line once whatever Ray does with worker output. Unless ``verbose``, each worker's own
stdout and stderr (Ray's, DeepSpeed's and torch's chatter) go to ``RUN/logs/rank{r}.log``.
"""

from __future__ import annotations

import contextlib
import io
import os
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TextIO

from tangle_ray.space import Arch, SearchSpace

PROGRESS_FILE = "progress.log"
PREFIX = "[tangle-ray]"


def quiet_worker(run_dir: Path, rank: int) -> None:
    """Send this process's stdout and stderr (file descriptors 1 and 2) to ``RUN/logs/rank{rank}.log``."""
    logs = run_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    fd = os.open(logs / f"rank{rank}.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    sys.stdout.flush()
    sys.stderr.flush()
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)


class Progress:
    """What rank 0 tells a person (the other ranks stay quiet): progress lines and TensorBoard events, both
    in the run's own folder."""

    def __init__(self, run_dir: Path, rank: int, space: SearchSpace, unit: str, steps: int):
        self.rank, self.space, self.unit, self.steps = rank, space, unit, steps
        self.writer = self.lines = None
        if rank == 0:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(run_dir / "tensorboard"))
            self.lines = (run_dir / PROGRESS_FILE).open("a")

    def log(self, message: str) -> None:
        if self.lines is not None:  # rank 0
            self.lines.write(f"{PREFIX} {message}\n")
            self.lines.flush()

    def scalar(self, key: str, value: float, step: int) -> None:
        if self.writer is not None:
            self.writer.add_scalar(key, value, step)

    def record(self, row: dict[str, Any], arch: Arch | None, eta_s: float) -> None:
        """Write a metrics row as events and log it as one line."""
        if self.writer is not None:
            for key, value in row.items():
                if key != "step":
                    self.writer.add_scalar(key, value, row["step"])
            self.writer.flush()
        labels = (("train_loss", "train"), ("arch_loss", "arch-split"))
        losses = "  ".join(f"{label} {row[k]:.4f}" for k, label in labels if k in row)
        # "argmax" where architecture weights choose it (their entropy is in the row), "arch" for a fixed one
        label = "argmax" if "arch_entropy" in row else "arch"
        chosen = f"  {label} {self.space.describe(arch)} ({row['arch_params'] / 1e6:.2f}M)" if arch else ""
        ent = f"  H(alpha) {row['arch_entropy']:.3f}" if "arch_entropy" in row else ""
        mfu = f"  MFU {row['mfu']:.1%}" if "mfu" in row else ""
        self.log(f"step {row['step']}/{self.steps}  loss {losses}  {row[f'{self.unit}_per_s']:,.0f} {self.unit}/s"
                 f"{mfu}{chosen}{ent}  ETA {eta_s / 60:.1f} min")


@contextlib.contextmanager
def silenced() -> Iterator[None]:
    """Keep a library's prints, progress bars and warnings (DeepSpeed's checkpoint consolidation) off the
    terminal of the driver."""
    import logging

    loggers = [logging.getLogger(name) for name in ("DeepSpeed", "deepspeed")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


@contextlib.contextmanager
def follow(path: Path, out: TextIO = sys.stderr, interval: float = 0.5) -> Iterator[None]:
    """Print the lines appended to ``path`` while the block runs (and the last ones after it)."""
    start = path.stat().st_size if path.is_file() else 0
    stop = threading.Event()

    def pump(position: int) -> int:
        if not path.is_file():
            return position
        with path.open() as f:
            f.seek(position)
            for line in iter(f.readline, ""):
                if not line.endswith("\n"):  # a line still being written: read it next time
                    break
                out.write(line)
                position = f.tell()
            out.flush()
        return position

    def loop() -> None:
        position = start
        while not stop.wait(interval):
            position = pump(position)
        pump(position)

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
