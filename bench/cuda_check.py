"""End-to-end check of the CUDA path on one GPU machine: NCCL, bf16, ZeRO-2/3, SPOS, export.

    python bench/cuda_check.py            (needs a GPU; prints what it checked and the numbers)

Four 6-step gpt-nano runs on one GPU (TangleNAS under ZeRO-2 and ZeRO-3, SPOS under ZeRO-3, TangleNAS compiled),
each exported and its extracted model checked against the supernet's single path (max |diff| must be 0).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

import ray
import torch

from tangle_ray.data.text.prepare import prepare_text
from tangle_ray.data.text.sources import TextSource
from tangle_ray.data.text.synth import write_demo_corpus
from tangle_ray.folders import load_supernet
from tangle_ray.models.gpt import GPT
from tangle_ray.train.config import load_config
from tangle_ray.train.runner import run_training


def main() -> None:
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("cuda_check.py: no CUDA GPU visible to torch; run it on a GPU machine")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    with tempfile.TemporaryDirectory(prefix="cuda-check-") as tmp:
        ray.init(address="local", num_cpus=4, num_gpus=1, include_dashboard=False, log_to_driver=False)
        try:
            check(Path(tmp))
        finally:
            ray.shutdown()
    print("CUDA path OK")


def check(tmp: Path) -> None:
    tokens = prepare_text(TextSource(kind="jsonl", path=str(write_demo_corpus(tmp / "raw", n_train=500))), tmp / "tok")
    base = ["space=gpt-nano", f"data.dir={tokens}", "steps=6", "global_batch_size=16", "micro_batch_size=8",
            "log_every=3", "eval_every=3", "checkpoint_every=3", "eval_samples=8", "dropout=0.0",
            "scaling.use_gpu=true", "precision=bf16", f"run.storage_path={tmp / 'runs'}", "debug_checks=true"]
    for method, stage, compiled in (("tanglenas", 2, False), ("tanglenas", 3, False), ("spos", 3, False),
                                    ("tanglenas", 2, True)):
        result = run_training(load_config(None, [*base, f"method={method}", f"zero_stage={stage}",
                                                 f"compile={str(compiled).lower()}",
                                                 f"run.name={method}-z{stage}-c{int(compiled)}"]))
        last = result.history["metrics"][-1]
        arch = json.loads((result.export_dir / "arch.json").read_text())
        supernet = load_supernet(result.export_dir / "supernet").cuda().eval()
        model = GPT.from_pretrained(result.export_dir / "model").cuda().eval()
        idx = torch.randint(0, 50257, (2, 64), device="cuda")
        with torch.no_grad():
            diff = (model(idx)[0] - supernet(idx, arch=arch)[0]).abs().max().item()
        print(f"{method:9s} ZeRO-{stage} bf16 NCCL{' compiled' if compiled else ''}: steps {last['step']}, "
              f"train loss {last['train_loss']:.3f}, "
              f"{last['tokens_per_s']:,.0f} tok/s, export vs single path max |diff| {diff:.2e}")
        assert diff == 0.0


if __name__ == "__main__":
    main()
