"""A campaign as a graph of stages: per seed, each method's way to an architecture, then that architecture
fine-tuned with inherited weights and retrained from scratch; and the long-form results its records give.

A method of a campaign is a pipeline of stages (``PIPELINES``): TangleNAS trains and chooses in one search;
SPOS trains a supernet (one per seed, shared by random and evolutionary search), then a Tune search chooses.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tangle_ray.campaign.config import CampaignConfig, stage_settings
from tangle_ray.campaign.pipelines import PIPELINES
from tangle_ray.errors import ConfigError
from tangle_ray.methods import method_for
from tangle_ray.models import load_space
from tangle_ray.space import SearchSpace
from tangle_ray.stages import Ref, Stage, check_graph
from tangle_ray.tasks import get_task

COSTS = {"params": "min", "macs": "min", "device_hours": "min", "wall_s": "min", "inference_ms": "min"}
PLACEHOLDER = "<linked at run time>"


@dataclass(frozen=True)
class Plan:
    """The stages of a campaign, in an order that runs every stage after those it needs, and for each method
    and seed the names of the stages whose records give its results."""

    stages: list[Stage]
    chains: dict[tuple[str, int], dict[str, str]]  # (method, seed) -> {"train", "choose", "finetune", "retrain"}
    directions: dict[str, str]  # metric -> "min" | "max"
    objective: str


def build_plan(config: CampaignConfig, base: Path, source: str) -> Plan:
    """Every stage of ``config`` (validated as its run or search file would be), before anything runs."""
    space = load_space(config.space)
    task = get_task(space.family.task)
    units = task.units_per_sample(space.fixed)
    stages: dict[str, Stage] = {}
    chains: dict[tuple[str, int], dict[str, str]] = {}
    for seed in config.seeds:
        for method in config.methods:
            pipe = PIPELINES[method]
            train = f"s{seed}-{pipe.train}"
            stages.setdefault(train, _train_stage(config, base, source, pipe.train, train, seed, {}, space, units))
            choose = train
            if pipe.search is not None:
                choose = f"s{seed}-{pipe.search}"
                stages[choose] = _tune_stage(config, base, source, pipe.search, choose, seed, Ref(train, "supernet"),
                                             units)
            chain = {"train": train, "choose": choose}
            for kind in ("finetune", "retrain"):
                links = {"arch": Ref(choose, "arch")}
                if kind == "finetune":
                    links["init_from"] = Ref(train, "supernet")
                name = chain[kind] = f"s{seed}-{method}-{kind}"
                stages[name] = _train_stage(config, base, source, kind, name, seed, links, space, units)
            chains[(method, seed)] = chain
    ordered = list(stages.values())
    check_graph(ordered)
    directions = {m.key: m.mode for m in task.metrics} | COSTS
    return Plan(ordered, chains, directions, task.objective.key)


def _common(config: CampaignConfig, raw: dict[str, Any], seed: int) -> dict[str, Any]:
    raw.pop("run", None)  # where results go is the campaign's business
    raw["space"], raw["seed"] = config.space, seed
    return raw


def _train_stage(config: CampaignConfig, base: Path, source: str, kind: str, name: str, seed: int,
                 links: dict[str, Ref], space: SearchSpace, units: int) -> Stage:
    from tangle_ray.train.config import from_dict

    raw = _common(config, stage_settings(config, kind, base, source), seed)
    command = "retrain" if kind in ("finetune", "retrain") else kind
    raw["method"] = method_for(command).name
    raw["init"] = "inherit" if kind == "finetune" else "scratch"
    for key in ("arch", "init_from"):
        raw.pop(key, None)
    check = dict(raw)  # validated now, with the linked values stood in for
    if "arch" in links:
        check["arch"] = space.largest()
    if "init_from" in links:
        check["init_from"] = PLACEHOLDER
    cfg = from_dict(check, f"{source}: stages.{kind}")
    s = cfg.scaling
    per_worker = (s.resources_per_worker or {}).get("GPU" if s.use_gpu else "CPU", 1.0)
    passes = 2 if cfg.method_class.chooses_arch else 1  # a bilevel step reads a weight and an architecture batch
    work = cfg.steps * cfg.global_batch_size * units * passes
    return Stage(name, "train", raw, links, ("GPU" if s.use_gpu else "CPU", s.num_workers * per_worker),
                 s.num_workers, work, config.test_samples)


def _tune_stage(config: CampaignConfig, base: Path, source: str, kind: str, name: str, seed: int,
                supernet: Ref, units: int) -> Stage:
    from tangle_ray.tune.config import search_config_from_dict

    raw = stage_settings(config, kind, base, source, data=False)
    raw.pop("run", None)
    raw["space"], raw["seed"], raw["algorithm"] = config.space, seed, kind
    own = getattr(config.stages, kind).settings
    raw["data"] = {"dir": own.get("data.dir", own.get("data", {}).get("dir", config.data["dir"]))}
    raw.pop("supernet", None)
    cfg = search_config_from_dict({**raw, "supernet": PLACEHOLDER}, f"{source}: stages.{kind}")
    r = cfg.resources
    device, per_trial = ("GPU", r.gpus_per_trial) if r.gpus_per_trial else ("CPU", r.cpus_per_trial)
    work = cfg.total_trials * cfg.eval.samples * units
    return Stage(name, "tune", raw, {"supernet": supernet}, (device, r.max_concurrent_trials * per_trial),
                 r.max_concurrent_trials, work, config.test_samples)


def _searching(chain: dict[str, str]) -> list[str]:
    """The stages a method spends before it holds its architecture: training, then choosing (if separate)."""
    return [chain["train"]] + ([chain["choose"]] if chain["choose"] != chain["train"] else [])


def arch_id(arch: dict[str, Any]) -> str:
    return hashlib.sha1(json.dumps(arch, sort_keys=True).encode()).hexdigest()[:8]


def result_rows(plan: Plan, records: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Long-form rows ``method, seed, stage, arch_id, metric, value`` from the stage records: the chosen
    architecture's test scores with inherited weights (stage ``inherited``), after fine-tuning and after
    retraining, its size, and what the search cost (stage ``search``: the training and choosing stages)."""
    rows = []
    for (method, seed), chain in plan.chains.items():
        chose = records[chain["choose"]]
        aid = arch_id(chose["arch"])

        def add(stage: str, metric: str, value: float) -> None:
            rows.append({"method": method, "seed": seed, "stage": stage, "arch_id": aid, "metric": metric,
                         "value": float(value)})

        searched = [records[name] for name in _searching(chain)]
        add("search", "device_hours", sum(r["device_hours"] for r in searched))
        add("search", "wall_s", sum(r["wall_s"] for r in searched))
        add("search", "params", chose["params"])
        add("search", "macs", chose["macs"])
        for metric, value in chose["test"].items():
            add("inherited", metric, value)
        for kind in ("finetune", "retrain"):
            record = records[chain[kind]]
            if record["arch"] != chose["arch"]:
                raise ConfigError(f"stage {chain[kind]} trained another architecture than {chain['choose']} chose")
            for metric, value in record["test"].items():
                add(kind, metric, value)
            add(kind, "inference_ms", record["inference_ms"])
    return rows


def anytime_curves(plan: Plan, records: dict[str, dict[str, Any]]) -> dict[str, dict[str, list]]:
    """Per x axis ('wall', 'device') and method: one curve per seed of the validation score of the architecture
    the method holds (TangleNAS: the argmax during its search; SPOS: none while its supernet trains, then the
    search's best so far), against the time and device-hours its stages took."""
    curves: dict[str, dict[str, list]] = {"wall": {}, "device": {}}
    for (method, _seed), chain in plan.chains.items():
        before = [records[name] for name in _searching(chain)[:-1]]  # a SPOS supernet: no architecture yet
        t0, d0 = sum(r["wall_s"] for r in before), sum(r["device_hours"] for r in before)
        chose = records[chain["choose"]]
        wall = [(t0 + t, score) for t, score in chose["anytime"]]
        device = [(d0 + t * chose["devices"] / 3600, score) for t, score in chose["anytime"]]
        if wall:
            curves["wall"].setdefault(method, []).append(wall)
            curves["device"].setdefault(method, []).append(device)
    return curves
