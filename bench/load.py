"""Bench: a random search under load. Trials/s and the driver's peak memory against the number of trials.

Run from the repo root (``PYTHONPATH=. python bench/load.py [--trials 50,100,300] [--concurrency 1,2,4]``). It saves
a random gpt-micro supernet and random tokens, starts one local Ray cluster and runs each search as
``tangle-ray tune ... --address`` in a fresh process that joins it, so that the driver's peak resident set
(``ru_maxrss`` from ``os.wait4``) is the driver's own. Per search it prints, side by side: wall time and trials/s;
the span from the first trial's result to the last (the driver's lines, as they arrive) and trials/s over it and
over its second half (the steady rate); the worker processes that ran trials; the driver's CPU time and peak RSS,
and that peak against the first search's at the same concurrency.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import ray
import torch
import yaml

from tangle_ray.data.text.prepare import FORMAT_VERSION, SPLITS
from tangle_ray.folders import save_supernet
from tangle_ray.models import load_space

SPACE = "gpt-micro"


def write_tokens(out: Path, vocab: int, seed: int) -> Path:
    """A prepared-token folder of uniform random tokens (the layout ``load_split`` reads)."""
    out.mkdir(parents=True)
    rng, splits = np.random.default_rng(seed), {}
    for split in SPLITS:
        tokens = rng.integers(0, vocab, 4_000, dtype=np.uint16)
        (out / f"{split}.bin").write_bytes(tokens.tobytes())
        splits[split] = {"file": f"{split}.bin", "tokens": len(tokens)}
    meta = {"format_version": FORMAT_VERSION, "dtype": "uint16", "vocab_size": vocab, "eot": 0, "splits": splits}
    (out / "meta.json").write_text(json.dumps(meta))
    return out


def search(work: Path, settings: dict, address: str) -> dict:
    """Run one search with the CLI; its figures from the driver's rusage and the search folder."""
    run = settings["run"]
    path = work / f"{run['name']}.yaml"
    path.write_text(yaml.safe_dump(settings))
    start, stamps = time.perf_counter(), []
    with open(work / f"{run['name']}.err", "w") as err:
        proc = subprocess.Popen([sys.executable, "-m", "tangle_ray.cli", "tune", str(path), "--address", address],
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        for line in proc.stderr:  # one line per finished trial, as it arrives
            if line.startswith("[tangle-ray] trial "):
                stamps.append(time.perf_counter())
            err.write(line)
        _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:  # the work folder goes with the benchmark: quote the driver's last lines
        tail = "".join((work / f"{run['name']}.err").read_text().splitlines(keepends=True)[-30:])
        raise RuntimeError(f"search {run['name']} exited with {proc.returncode}; its last lines:\n{tail}")
    folders = list((Path(run["storage_path"]) / run["name"]).glob("trial_*"))
    pids = {json.loads((f / "result.json").read_text())["pid"] for f in folders}
    half = len(stamps) // 2
    return {
        "trials": len(folders), "wall": wall, "span": stamps[-1] - stamps[0],
        "steady": (len(stamps) - 1 - half) / (stamps[-1] - stamps[half]), "workers": len(pids),
        "cpu": usage.ru_utime + usage.ru_stime, "rss": usage.ru_maxrss / 1024, "load": os.getloadavg()[0],
    }


MIN_TRIALS = 3  # the steady rate needs two results after the first half


def counts(least: int):
    """An argparse type: a non-empty comma-separated list of integers, each at least ``least``."""

    def parse(text: str) -> list[int]:
        try:
            values = [int(w) for w in text.split(",") if w.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers") from None
        if not values:
            raise argparse.ArgumentTypeError("give at least one value")
        if min(values) < least:
            raise argparse.ArgumentTypeError(f"{min(values)} is below the minimum, {least}")
        return values

    return parse


def at_least(least: int):
    """An argparse type: one integer no smaller than ``least``."""

    def parse(text: str) -> int:
        values = counts(least)(text)
        if len(values) != 1:
            raise argparse.ArgumentTypeError(f"{text!r}: give one integer")
        return values[0]

    return parse


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--trials", type=counts(MIN_TRIALS), default="50,100,300",
                   help=f"search sizes, comma-separated, each at least {MIN_TRIALS} (default: 50,100,300)")
    p.add_argument("--concurrency", type=counts(1), default="2",
                   help="max_concurrent_trials values, comma-separated (default: 2)")
    p.add_argument("--cpus", type=at_least(1), default=os.cpu_count(),
                   help=f"CPUs of the local cluster (default: this machine's, {os.cpu_count()})")
    p.add_argument("--samples", type=at_least(1), default=8,
                   help="eval.samples (windows of 16 tokens) per trial (default: 8)")
    args = p.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    with tempfile.TemporaryDirectory(prefix="bench-load-") as work:
        try:
            bench(args, Path(work))
        finally:
            ray.shutdown()


def bench(args: argparse.Namespace, work: Path) -> None:
    sizes, levels = args.trials, args.concurrency
    space = load_space(SPACE)
    torch.manual_seed(0)
    supernet = save_supernet(space.build_supernet(), work / "supernet")
    tokens = write_tokens(work / "tokens", space.fixed["vocab_size"], 0)
    ray.init(address="local", num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
    address = ray.get_runtime_context().gcs_address
    print(f"{SPACE}: {args.samples} x {space.fixed['block_size']} tokens per trial, random search, {args.cpus} CPUs; "
          f"one fresh driver per search")
    print(f"{'c':>3}{'cpu/trial':>10}{'trials':>8}{'wall s':>8}{'trials/s':>9}{'span s':>8}{'span/s':>8}"
          f"{'steady/s':>9}{'workers':>8}{'driver cpu s':>13}{'peak MiB':>9}{'vs first':>9}{'load':>6}")
    for c in levels:
        cpus = min(1.0, args.cpus / c)
        first = None
        for n in sizes:
            settings = {
                "supernet": str(supernet), "data": {"dir": str(tokens)},
                "eval": {"samples": args.samples, "batch_size": 8}, "algorithm": "random",
                "random": {"num_trials": n}, "resources": {"max_concurrent_trials": c, "cpus_per_trial": cpus},
                "run": {"storage_path": str(work / "runs"), "name": f"c{c}-n{n}"},
            }
            r = search(work, settings, address)
            first = first or r["rss"]
            print(f"{c:>3}{cpus:>10g}{r['trials']:>8}{r['wall']:>8.1f}{r['trials'] / r['wall']:>9.2f}"
                  f"{r['span']:>8.1f}{(r['trials'] - 1) / r['span']:>8.1f}{r['steady']:>9.1f}{r['workers']:>8}"
                  f"{r['cpu']:>13.1f}{r['rss']:>9.0f}{r['rss'] / first:>9.3f}{r['load']:>6.1f}", flush=True)
    print("(span: first result to last; steady: trials/s over the second half of the results; "
          "workers: processes that ran trials; vs first: peak RSS over the first size's at this concurrency)")


if __name__ == "__main__":
    main()
