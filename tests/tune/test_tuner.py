"""run_search on a local Ray cluster: trials, report, resume after an interruption."""

import csv
import json
import os
import random
import signal
from typing import ClassVar

import pytest
from ray import tune

from tangle_ray.evaluate import evaluate_arch, evaluate_on_split
from tangle_ray.tasks import get_task
from tangle_ray.tune.tuner import SearchInterrupted, run_search

pytestmark = pytest.mark.ray

ES = {
    "algorithm": "evolution",
    "evolution": {"population": 5, "generations": 3, "parents": 2, "mutations": 2, "crossovers": 2},
}


class Interrupt(tune.Callback):
    """Ctrl+C (as SIGUSR1, which Tune also catches) once, after ``after`` trials completed; remembers them."""

    fired: ClassVar[bool] = False
    completed: ClassVar[list[str]] = []

    def __init__(self, after: int):
        self.after = after

    def on_trial_complete(self, iteration, trials, trial, **info):
        if Interrupt.fired:
            return
        Interrupt.completed.append(trial.trial_id)
        if len(Interrupt.completed) == self.after and signal.getsignal(signal.SIGUSR1) not in (
            signal.SIG_DFL,
            None,
        ):
            Interrupt.fired = True
            os.kill(os.getpid(), signal.SIGUSR1)


def test_random_search_trials_equal_evaluate_arch_and_report(local_ray, make_config, supernet, eval_samples):
    space = supernet.space
    cap = sorted(space.param_count(space.sample(random.Random(i))) for i in range(50))[25]  # a median
    config = make_config(algorithm="random", random={"num_trials": 8}, constraints={"max_params": cap})
    result = run_search(config)
    archs = [t.arch for t in result.trials]
    assert [t.index for t in result.trials] == list(range(8)) and len({space.key(a) for a in archs}) == 8
    for t in result.trials:
        scores = evaluate_arch(supernet, t.arch, get_task("lm"), eval_samples)
        assert t.metrics == {"loss": scores["loss"], "perplexity": scores["perplexity"]}  # exactly `evaluate`'s
        assert t.units == eval_samples.x.numel()
        assert (t.params, t.flops) == (space.param_count(t.arch), space.flops(t.arch)) and t.params <= cap
    out = result.out_dir
    best = json.loads((out / "best_arch.json").read_text())
    assert space.key(space.validate(best)) == space.key(result.best.arch)
    assert json.loads((out / "best_arch.json").read_text()) == space.active(result.best.arch) == result.best_arch
    rows = list(csv.DictReader((out / "leaderboard.csv").read_text().splitlines()))
    assert [int(r["rank"]) for r in rows] == list(range(1, 9)) and float(rows[0]["loss"]) == result.best.metrics["loss"]
    front = list(csv.DictReader((out / "pareto.csv").read_text().splitlines()))
    assert [float(r["loss"]) for r in front] == sorted((float(r["loss"]) for r in front), reverse=True)
    for name in ("leaderboard.md", "incumbent.png", "pareto.png"):
        assert (out / name).stat().st_size > 0
    assert run_search(config).trials == result.trials  # a finished search reruns as a no-op
    cli = evaluate_on_split(
        config.data.dir,
        "valid",
        supernet=config.supernet,
        arch=out / "best_arch.json",
        num_samples=32,
        seed=0,
    )  # what `tangle-ray evaluate` prints
    assert (cli["loss"], cli["params"]) == (result.best.metrics["loss"], result.best.params)


def test_interrupted_evolution_resumes_to_the_uninterrupted_result(local_ray, make_config):
    reference = run_search(make_config(**ES))
    config = make_config(**ES)
    with pytest.raises(SearchInterrupted, match="run the same search again"):
        run_search(config, callbacks=[Interrupt(after=6)])
    done_before = list(Interrupt.completed)
    resumed = run_search(config)
    assert len(resumed.trials) == 15 and len({t.index for t in resumed.trials}) == 15
    assert [(t.index, t.arch, t.metrics) for t in resumed.trials] == [
        (t.index, t.arch, t.metrics) for t in reference.trials
    ]
    for trial_id in done_before:  # finished before the interruption: not run again
        assert len((config.run_dir() / f"trial_{trial_id}" / "result.json").read_text().splitlines()) == 1
