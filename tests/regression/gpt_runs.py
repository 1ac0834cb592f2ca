"""The GPT reference runs: a tiny TangleNAS search, a SPOS supernet and a Tune ES search on the CPU recipes.

``python -m tests.regression.gpt_runs record`` writes their numbers to ``gpt_reference.json``;
``test_gpt_unchanged.py`` runs them again and compares. Timing columns are left out (they vary).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
REFERENCE = Path(__file__).with_name("gpt_reference.json")
RUN_OVERRIDES = ["steps=12", "checkpoint_every=6", "eval_every=6", "log_every=3", "eval_samples=8"]
TIMING = {"tokens_per_s", "elapsed_s", "optimizer_state_bytes"}


def _history(result) -> dict:
    metrics = [{k: v for k, v in row.items() if k not in TIMING} for row in result.history.metrics]
    return {"metrics": metrics, "alphas": result.history.alphas, "anytime": result.history.anytime,
            "arch": result.arch}


def run_all(root: Path) -> dict:
    """Run the three reference jobs under ``root`` (a local Ray cluster must be running)."""
    from tangle_ray.data import TextSource, prepare_text, write_demo_corpus
    from tangle_ray.train.config import load_config
    from tangle_ray.train.runner import run_training
    from tangle_ray.tune.config import load_search_config
    from tangle_ray.tune.tuner import run_search

    corpus = write_demo_corpus(root / "raw", n_train=300, n_valid=40, seed=0)
    tokens = prepare_text(TextSource(kind="jsonl", path=str(corpus)), root / "tokens")
    out = {}
    common = [f"data.dir={tokens}", f"run.storage_path={root / 'runs'}", *RUN_OVERRIDES]
    for name, recipe in (("tanglenas", "tiny-cpu-tanglenas"), ("spos", "tiny-cpu-spos")):
        cfg = load_config(REPO / "recipes" / "runs" / f"{recipe}.yaml", [*common, f"run.name={name}"])
        result = run_training(cfg)
        out[name] = _history(result)
    search = load_search_config(
        REPO / "recipes" / "tune" / "tiny-cpu-evolution.yaml",
        [f"supernet={root / 'runs' / 'spos' / 'export' / 'supernet'}", f"data.dir={tokens}",
         f"run.storage_path={root / 'search'}", "evolution.population=4", "evolution.generations=2",
         "evolution.parents=2", "evolution.mutations=2", "evolution.crossovers=2", "eval.samples=8"],
    )
    trials = run_search(search).trials
    out["evolution"] = [{"index": t.index, "arch": t.arch, "loss": t.metrics["loss"], "params": t.params}
                        for t in trials]
    return out


if __name__ == "__main__" and sys.argv[1:] == ["record"]:
    import os
    import tempfile

    import ray

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    with tempfile.TemporaryDirectory() as tmp:
        REFERENCE.write_text(json.dumps(run_all(Path(tmp)), indent=1, sort_keys=True) + "\n")
    ray.shutdown()
