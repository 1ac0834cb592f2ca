"""Language modelling: next-token prediction on windows of prepared token files, scored by cross-entropy."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from tangle_ray.data.text.prepare import check_token_folder, load_split, prepare_text
from tangle_ray.data.text.sampler import EvalWindows, WindowSampler, eval_starts
from tangle_ray.data.text.sources import TextSource
from tangle_ray.errors import ConfigError
from tangle_ray.space import SearchSpace
from tangle_ray.tasks import register_task
from tangle_ray.tasks.base import Metric, Tally, Task


def lm_loss(logits: Tensor, targets: Tensor | None) -> Tensor | None:
    """Mean next-token cross-entropy, in float32 at least (no bf16 softmax over the vocabulary)."""
    if targets is None:
        return None
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1)


def perplexity(loss: float) -> float:
    """``exp(loss)``; infinity where it overflows (a loss above about 709.78 nats, as a diverged model's)."""
    try:
        return math.exp(loss)
    except OverflowError:
        return math.inf


MAX_PROCESSES = 1024  # tokenizer processes of any machine


@dataclass(frozen=True)
class TextData:
    """The ``data:`` section of a language-model run: prepared token files, or a source to prepare."""

    dir: str = "data/tinystories"  # prepared token files (train.bin, valid.bin, test.bin, meta.json)
    source: dict[str, Any] | None = None  # a TextSource to prepare into ``dir`` when it is not there yet
    tokenizer: str = "gpt2"
    bpe_file: str | None = None
    valid_fraction: float = 0.2  # the architecture split's share of the training documents
    num_proc: int = 1

    def __post_init__(self) -> None:
        if not 0.0 < self.valid_fraction < 1.0:
            raise ConfigError(f"run config: data.valid_fraction = {self.valid_fraction} must be in (0, 1)")
        if not 1 <= self.num_proc <= MAX_PROCESSES:
            raise ConfigError(f"run config: data.num_proc = {self.num_proc} tokenizer processes; allowed: 1 to "
                              f"{MAX_PROCESSES} (and at most the cores of the machine that prepares the data)")


def _refuse_preparation_settings(data: TextData, folder: Path) -> None:
    """Without ``data.source`` the folder is used as it was prepared: settings that only preparing would use are
    refused rather than ignored."""
    defaults = TextData()
    unused = [f"data.{name} = {getattr(data, name)!r}" for name in ("tokenizer", "bpe_file", "num_proc")
              if getattr(data, name) != getattr(defaults, name)]
    if unused:
        raise ConfigError(f"{', '.join(unused)}: ignored because data.dir {str(folder)!r} is already prepared and "
                          "no data.source is given; remove them, or give data.source to prepare again with them")


@register_task
class LanguageModelling(Task):
    name = "lm"
    data_config = TextData
    unit = "tokens"
    metrics = (Metric("loss", "loss", "min"), Metric("perplexity", "perplexity", "min", ".2f"))

    def prepare(self, data: TextData, space: SearchSpace, seed: int) -> TextData:
        folder = Path(data.dir)
        if data.source is not None:  # prepared now, or reused where the folder holds this very preparation
            cores = os.cpu_count() or 1
            if data.num_proc > cores:
                raise ConfigError(f"data.num_proc = {data.num_proc}: this machine, which prepares the data, has "
                                  f"{cores} cores; set data.num_proc to at most {cores}")
            try:
                source = TextSource(**data.source)
            except TypeError as e:
                raise ConfigError(f"data.source = {data.source!r}: {e}; see `tangle-ray data prepare --help`") from None
            prepare_text(source, folder, tokenizer=data.tokenizer, bpe_file=data.bpe_file,
                         valid_fraction=data.valid_fraction, seed=seed, num_proc=data.num_proc)
        elif not (folder / "meta.json").is_file():
            raise ConfigError(
                f"data.dir = {str(folder)!r} holds no prepared data (meta.json); prepare it with "
                "`tangle-ray data prepare` or give data.source to prepare it now"
            )
        else:
            _refuse_preparation_settings(data, folder)
        meta = check_token_folder(folder, space.fixed["vocab_size"])  # sizes, the vocabulary, every token id
        stored = meta.get("fractions", {}).get("valid", data.valid_fraction)
        if abs(stored - data.valid_fraction) > 1e-9:
            raise ConfigError(
                f"data.dir {folder} was prepared with valid_fraction {stored}, the run asks for "
                f"data.valid_fraction = {data.valid_fraction}: prepare another folder (tangle-ray data prepare "
                f"--valid-fraction {data.valid_fraction}) or set data.valid_fraction: {stored}"
            )
        return replace(data, dir=str(folder.resolve()))

    def batches(self, data: TextData, fixed: dict[str, Any], split: str, micro_batch: int,
                seed: int, micro_per_step: int = 1) -> WindowSampler:
        check_token_folder(data.dir, fixed["vocab_size"])  # in each worker too: once per process
        return WindowSampler(load_split(data.dir, split), fixed["block_size"], micro_batch, seed, split)

    def eval_set(self, data: TextData, fixed: dict[str, Any], split: str, num: int, seed: int) -> EvalWindows:
        """``num`` fixed windows of ``split`` (fewer if the split is short) of a checked folder."""
        check_token_folder(data.dir, fixed["vocab_size"])
        block_size = fixed["block_size"]
        starts = eval_starts(load_split(data.dir, split), block_size, num, seed)
        # an absolute path: the set may be read in another working directory (a Tune trial's)
        return EvalWindows(partial(load_split, str(Path(data.dir).resolve()), split), block_size, starts)

    def random_batch(self, fixed: dict[str, Any], n: int, gen: torch.Generator) -> tuple[Tensor, Tensor]:
        tokens = torch.randint(0, fixed["vocab_size"], (n, fixed["block_size"] + 1), generator=gen)
        return tokens[:, :-1], tokens[:, 1:]

    def units_per_sample(self, fixed: dict[str, Any]) -> int:
        return fixed["block_size"]

    def tally(self, output: Tensor, y: Tensor) -> Tally:
        """Each token's cross-entropy (in float32, kept as float64) and each window's mean."""
        nll = F.cross_entropy(output.reshape(-1, output.size(-1)).float(), y.to(output.device).reshape(-1),
                              reduction="none")
        return Tally([nll.double().cpu().numpy()], [nll.view(len(y), -1).mean(1).double().cpu().numpy()])

    def summarize(self, tally: Tally) -> dict[str, Any]:
        """Mean cross-entropy as the exactly rounded sum (``math.fsum``) of per-token losses over their count."""
        loss = tally.mean_loss()
        return {"loss": loss, "perplexity": perplexity(loss), "samples": tally.samples, "tokens": tally.units,
                "sample_losses": tally.per_sample()}
