"""The typed configuration of a baseline campaign, read from a campaign file (YAML) plus ``key=value`` overrides.

A campaign names a space and its data, the methods to compare (``PIPELINES``), the seeds, and per stage kind a
run or search file (relative to the campaign file) with settings on top. Seed ``s`` sets every stage's
``seed``: each method sees the same data order, splits and initial weights where they share a model.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tangle_ray.campaign.pipelines import DEFAULT_PIPELINES, PIPELINES, REFERENCE
from tangle_ray.configs import INT64, build, check_range, read_settings, read_yaml, set_dotted
from tangle_ray.errors import ConfigError, shorten
from tangle_ray.names import check_name

STAGE_KINDS = ("search", "supernet", "shrink", "random", "evolution", "finetune", "retrain")


@dataclass(frozen=True)
class StageSettings:
    """A run file (search, supernet, finetune, retrain) or a search file (random, evolution), relative to the
    campaign file, with ``settings`` (nested, or dotted keys) on top."""

    file: str | None = None
    settings: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class CampaignStages:
    search: StageSettings = field(default_factory=StageSettings)  # the TangleNAS search
    supernet: StageSettings = field(default_factory=StageSettings)  # the SPOS supernet, shared by RS and ES
    shrink: StageSettings = field(default_factory=StageSettings)  # the OFA supernet (progressive shrinking)
    random: StageSettings = field(default_factory=StageSettings)  # SPOS + random search (Ray Tune)
    evolution: StageSettings = field(default_factory=StageSettings)  # SPOS + evolutionary search (Ray Tune)
    finetune: StageSettings = field(default_factory=StageSettings)  # the chosen architecture, inherited weights
    retrain: StageSettings = field(default_factory=StageSettings)  # the chosen architecture, from scratch


@dataclass(frozen=True)
class CampaignConfig:
    name: str
    space: str
    data: dict[str, Any]  # over every run's data section (a stage's own settings may still change it)
    methods: list[str] = field(default_factory=lambda: list(DEFAULT_PIPELINES))
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    reference: str = REFERENCE  # the method every other is compared with
    stages: CampaignStages = field(default_factory=CampaignStages)
    test_samples: int = 256  # test-split samples every chosen architecture is scored on
    throughput: float | None = None  # units (tokens, images) per second per device, for --dry-run estimates

    def __post_init__(self) -> None:
        check_name(self.name, "campaign config: name")
        if not self.methods or any(not isinstance(m, str) or m not in PIPELINES for m in self.methods):
            raise ConfigError(f"campaign config: methods = {shorten(self.methods)}; allowed: a non-empty list of "
                              f"{list(PIPELINES)}")
        if len(set(self.methods)) != len(self.methods):
            raise ConfigError(f"campaign config: methods = {shorten(self.methods)} names a method twice")
        if self.reference not in self.methods:
            raise ConfigError(f"campaign config: reference = {shorten(self.reference)} must be one of the methods "
                              f"{self.methods}")
        if not self.seeds or len(set(map(str, self.seeds))) != len(self.seeds):
            raise ConfigError(f"campaign config: seeds = {shorten(self.seeds)} must be a non-empty list of "
                              "distinct integers")
        for seed in self.seeds:
            if isinstance(seed, bool) or not isinstance(seed, int):
                raise ConfigError(f"campaign config: seeds = {shorten(self.seeds)}: {shorten(seed)} is not an "
                                  "integer")
            check_range(seed, "campaign config: seeds[]", 0, INT64[1])
        if not isinstance(self.data.get("dir"), str):
            raise ConfigError(f"campaign config: data = {shorten(self.data)} needs dir (a prepared data folder)")
        check_range(self.test_samples, "campaign config: test_samples", 1, 10**7)
        if self.throughput is not None and self.throughput <= 0:
            raise ConfigError(f"campaign config: throughput = {self.throughput} must be > 0 (units per second "
                              "per device)")


def load_campaign(path: str | Path, overrides: list[str] | None = None) -> tuple[CampaignConfig, Path]:
    """The campaign file with overrides applied, and the folder its relative stage files are read from."""
    raw, source = read_settings(path, overrides, "campaign")
    return build(CampaignConfig, raw, source, "campaign config"), Path(path).resolve().parent


def stage_settings(config: CampaignConfig, kind: str, base: Path, source: str, data: bool = True) -> dict[str, Any]:
    """A stage kind's settings: its file (relative to ``base``), the campaign's ``data`` (unless ``data`` is
    false), then the stage's ``settings`` on top (a stage may keep its own data folder), as one mapping."""
    entry: StageSettings = getattr(config.stages, kind)
    raw: dict[str, Any] = {}
    if entry.file is not None:
        path = base / entry.file
        if not path.is_file():
            raise ConfigError(f"{source}: stages.{kind}.file = {shorten(entry.file)}: no such file {path}")
        loaded = read_yaml(path, f"{kind} file")
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: a {kind} file must be a mapping of settings")
        raw = loaded
    for key, value in config.data.items() if data else ():
        set_dotted(raw, f"data.{key}", value)
    for key, value in flat_settings(entry.settings):
        set_dotted(raw, key, value, f"stages.{kind}.settings.{key}")
    return raw


def flat_settings(settings: dict[str, Any], prefix: str = ""):
    """Dotted (key, value) pairs of a nested mapping; mappings under ``data`` and ``source`` stay whole."""
    for key, value in settings.items():
        if isinstance(value, dict) and key not in ("source", "augment", "arch", "deepspeed"):
            yield from flat_settings(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value
