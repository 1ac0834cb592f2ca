"""Scoring architectures and models: with a supernet's inherited weights, or an exported standalone model.

Serves the two-stage search (every Tune trial), ``tangle-ray evaluate``, the test score of a retrained model
and the any-time curve of a training run. Evaluation sets are read batch by batch (``Task.eval_set``), so
memory holds a few batches whatever the set's size; the ranks of a run score a share of the batches each
(``Shard``). What is measured is the task's business (``Task.tally``, ``Task.summarize``): sums are exact, so a
score depends on the outputs only; the outputs depend on the batch size at float32 round-off (torch's kernels
differ with the number of rows), so scores are reproduced bit for bit at the same batch size, on any number
of ranks.

A family that ``calibrates`` (MobileNetV3: batch norms) is scored with inherited weights as the standalone model
of the architecture, extracted and prepared by the family on the task's calibration batches
(``inherited_model``); every other family as the supernet's single path. Both give the same outputs where no
statistics need preparing.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from tangle_ray import storage
from tangle_ray.errors import ConfigError
from tangle_ray.folders import load_supernet
from tangle_ray.models import check_model_folder, get_family
from tangle_ray.space import Arch, read_arch
from tangle_ray.tasks import EvalSet, Task, get_task
from tangle_ray.tasks.base import Tally, num_batches

DEFAULT_BATCH_SIZE = 16


@dataclass(frozen=True)
class Shard:
    """This rank's share of an evaluation scored by ``world`` ranks: batches ``rank``, ``rank + world``, ...;
    ``gather`` (a collective) returns every rank's value in rank order."""

    rank: int
    world: int
    gather: Callable[[Any], list[Any]]


ALONE = Shard(0, 1, lambda value: [value])


def score(model: nn.Module, output_of: Callable[[Tensor], Tensor], task: Task, samples: EvalSet,
          batch_size: int = DEFAULT_BATCH_SIZE, per_sample: bool = False, shard: Shard = ALONE) -> dict[str, Any]:
    """The task's metrics of ``output_of`` (a function of ``model``) on ``samples``, in eval mode, without
    gradients; ``per_sample`` adds ``sample_losses`` (each sample's loss, in order). With a ``shard``, every rank
    calls it, scores its batches and gets the metrics of the whole set (the same as one rank's)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    n = num_batches(samples, batch_size)
    mine = range(shard.rank, n, shard.world)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            tallies = task.tallies(lambda x: output_of(x.to(device)), samples, batch_size, mine)
            for x, _ in samples.batches(batch_size, [0] * (math.ceil(n / shard.world) - len(mine))):
                output_of(x.to(device))  # as many passes as the other ranks: ZeRO-3 gathers weights in each
    finally:
        model.train(was_training)
    ranks = shard.gather(tallies)  # ranks[r][j]: batch r + j * world
    scores = task.summarize(Tally.of(ranks[i % shard.world][i // shard.world] for i in range(n)))
    if not per_sample:
        del scores["sample_losses"]
    return scores


def calibration_batches(task: Task, data: Any, space: Any) -> list[Tensor] | None:
    """The batches an extracted model of ``space`` is prepared on before it is scored (``Task.calibration_set``
    of the run's or search's data section), or None for a family that needs none."""
    return task.calibration_set(data, space.fixed) if space.family.calibrates else None


def inherited_model(net: nn.Module, arch: Arch, calibration: Sequence[Tensor]) -> nn.Module:
    """The standalone model of ``arch`` with a supernet's (a ``Supernet`` or its ``net``) weights, prepared by its
    family on ``calibration`` (MobileNetV3: batch-norm statistics recomputed), in eval mode."""
    model = net.extract(arch)
    net.space.family.prepare_for_eval(model, calibration)
    return model.eval()


def evaluate_arch(net: nn.Module, arch: Arch, task: Task, samples: EvalSet,
                  batch_size: int = DEFAULT_BATCH_SIZE, per_sample: bool = False,
                  calibration: Sequence[Tensor] | None = None) -> dict[str, Any]:
    """``arch`` of a supernet (a ``Supernet`` or its ``net``) with inherited weights: its single path, or, given
    ``calibration`` batches (``calibration_batches``), its extracted model prepared on them."""
    if calibration is not None:
        return evaluate_model(inherited_model(net, arch, calibration), task, samples, batch_size, per_sample)
    return score(net, lambda xb: net(xb, None, arch=arch)[0], task, samples, batch_size, per_sample)


def evaluate_model(model: nn.Module, task: Task, samples: EvalSet,
                   batch_size: int = DEFAULT_BATCH_SIZE, per_sample: bool = False) -> dict[str, Any]:
    """A standalone model (e.g. an extracted one), scored as ``evaluate_arch`` scores a path."""
    return score(model, lambda xb: model(xb)[0], task, samples, batch_size, per_sample)


def evaluate_on_split(
    data_dir: str | Path,
    split: str = "test",
    supernet: str | Path | None = None,
    arch: Arch | str | Path | None = None,
    model: str | Path | None = None,
    num_samples: int = 256,
    seed: int = 0,
    batch_size: int = DEFAULT_BATCH_SIZE,
    per_sample: bool = False,
) -> dict[str, Any]:
    """The task's metrics on ``num_samples`` fixed samples of ``split``: ``arch`` (a dict or an arch.json;
    default the supernet's argmax) with a supernet folder's inherited weights, or an exported ``model``.

    The result says how many samples were asked and how many the split could give (``samples``)."""
    if (supernet is None) == (model is None):
        raise ConfigError("evaluate: give a supernet folder (optionally with an architecture) or a model folder")
    data_dir = storage.localize(data_dir, "--data")  # a folder on object storage: its local mirror
    supernet = None if supernet is None else storage.localize(supernet, "--supernet")
    model = None if model is None else storage.localize(model, "--model")
    if model is not None:
        if arch is not None:
            raise ConfigError("evaluate: an architecture goes with a supernet folder; a model folder holds its own")
        config = check_model_folder(Path(model))  # files, manifest, config.json, safetensors header
        family, arch = get_family(config.get("model"), f"model folder {model}: config.json"), config.get("arch")
        net = family.load_model(Path(model))
        task = get_task(family.task)
        samples = task.eval_set(task.data_config(dir=str(data_dir)), family.model_settings(net), split, num_samples,
                                seed)
        scores, params = evaluate_model(net, task, samples, batch_size, per_sample), net.num_parameters()
    else:
        sn = load_supernet(supernet)
        space, task = sn.space, get_task(sn.space.family.task)
        if arch is None:
            _check_chose(Path(supernet))
        source = str(arch) if isinstance(arch, (str, Path)) else "architecture"
        if isinstance(arch, (str, Path)):
            arch = read_arch(arch)
        arch = space.validate(sn.argmax_arch() if arch is None else arch, source)
        data = task.data_config(dir=str(data_dir))
        samples = task.eval_set(data, space.fixed, split, num_samples, seed)
        scores = evaluate_arch(sn, arch, task, samples, batch_size, per_sample, calibration_batches(task, data, space))
        params = space.param_count(arch)
    return {"split": split, "asked": num_samples, **scores, "params": params, "arch": arch}


def _check_chose(supernet: Path) -> None:
    """Without an architecture, the supernet's argmax is scored: refused for a supernet whose method chooses none
    (SPOS: its architecture parameters were never trained, their argmax is noise)."""
    from tangle_ray.configs import read_json
    from tangle_ray.methods import METHODS

    meta = read_json(supernet / "meta.json", "supernet meta")
    method = METHODS.get(meta.get("method")) if isinstance(meta, dict) else None
    if method is not None and not method.chooses_arch:
        raise ConfigError(f"evaluate: supernet {supernet} was trained by {method.name}, which chooses no "
                          f"architecture (its architecture parameters are untrained); pass --arch arch.json (e.g. a "
                          f"`tangle-ray tune` search's best_arch.json)")
