"""Mixers: architecture parameters -> mixing weights W (one probability vector per choice and layer).

Every mixer is called ``mixer(alphas, gen, *, step=0, steps=1)``: ``step`` is the 0-based weight step of
a run of ``steps`` (only GDAS's temperature uses them). Random mixers draw from a generator keyed by
(seed, step, global micro-batch index, purpose) (``keyed.py``), never from process-local state, so a run is
a function of its config and seed, not of its number of workers.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor

from tangle_ray.errors import ConfigError

Weights = dict[str, Tensor]
GDAS_SCHEDULES = ("reference", "linear")


def _fork_seed(gen: torch.Generator) -> int:
    return int(torch.randint(0, 2**62, (1,), generator=gen))


def drnas(alphas: Mapping[str, Tensor], gen: torch.Generator, *, step: int = 0, steps: int = 1) -> Weights:
    """DrNAS: a reparameterised Dirichlet sample per row, concentration ELU(alpha) + 1."""
    out = {}
    for name, a in alphas.items():
        concentration = (F.elu(a) + 1.0).cpu()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(_fork_seed(gen))
            sample = torch.distributions.Dirichlet(concentration).rsample()
        out[name] = sample.to(a.device)
    return out


def darts(
    alphas: Mapping[str, Tensor], gen: torch.Generator | None = None, *, step: int = 0, steps: int = 1
) -> Weights:
    """DARTS: a softmax per row."""
    return {name: F.softmax(a, dim=-1) for name, a in alphas.items()}


def gdas_tau(
    step: int, steps: int, schedule: str = "reference", tau_max: float = 10.0, tau_min: float = 0.1
) -> float:
    """GDAS temperature at 0-based ``step`` of a run of ``steps``.

    ``reference``: TangleNAS's nanoGPT search (train_search.py with GDASSampler: taus (0.1, 10), 100
    "epochs", ``before_epoch`` once before the loop and then every ``eval_interval`` = 100 steps from step
    0 on): tau = tau_max - (tau_max - tau_min) * (step // 100 + 1) / 99, whatever the run length: 9.9 for
    steps 0-99, 9.8 for 100-199, ..., 4.0 at the end of 6,000 steps. Floored at ``tau_min`` (reached at step
    9,800; the reference divides by zero at 9,900). ``linear``: tau_max - (tau_max - tau_min) * step / steps.
    """
    if schedule == "reference":
        return max(tau_min, tau_max - (tau_max - tau_min) * (step // 100 + 1) / 99)
    if schedule == "linear":
        return tau_max - (tau_max - tau_min) * min(max(step / max(steps, 1), 0.0), 1.0)
    raise ConfigError(f"gdas_schedule = {schedule!r} is not known; allowed: {list(GDAS_SCHEDULES)}")


def gdas(
    alphas: Mapping[str, Tensor],
    gen: torch.Generator,
    *,
    step: int = 0,
    steps: int = 1,
    schedule: str = "reference",
) -> Weights:
    """GDAS: hard Gumbel-softmax, one-hot forward and the soft sample's gradient (straight-through)."""
    tau = gdas_tau(step, steps, schedule)
    out = {}
    for name, a in alphas.items():
        u = torch.rand(a.shape, generator=gen, dtype=torch.float64).clamp_(1e-20, 1.0 - 1e-12)
        gumbel = (-torch.log(-torch.log(u))).to(a.device, a.dtype)
        soft = F.softmax((a + gumbel) / tau, dim=-1)
        hard = F.one_hot(soft.argmax(-1), a.size(-1)).to(a.dtype)
        out[name] = hard - soft.detach() + soft
    return out


def uniform(alphas: Mapping[str, Tensor], gen: torch.Generator, *, step: int = 0, steps: int = 1) -> Weights:
    """A uniformly drawn one-hot row per choice (no gradient): single-path sampling, as SPOS trains."""
    out = {}
    for name, a in alphas.items():
        idx = torch.randint(0, a.size(-1), a.shape[:-1], generator=gen)
        out[name] = F.one_hot(idx, a.size(-1)).to(a.device, a.dtype)
    return out


def argmax(
    alphas: Mapping[str, Tensor], gen: torch.Generator | None = None, *, step: int = 0, steps: int = 1
) -> Weights:
    """The one-hot of the largest architecture parameter per row."""
    return {name: F.one_hot(a.detach().argmax(-1), a.size(-1)).to(a.dtype) for name, a in alphas.items()}


MIXERS: dict[str, Callable[..., Weights]] = {
    "drnas": drnas, "darts": darts, "gdas": gdas, "uniform": uniform, "argmax": argmax,
}


def get_mixer(
    name: str, source: str = "mixer", *, gdas_schedule: str = "reference"
) -> Callable[..., Weights]:
    """The mixer ``name``; GDAS with its temperature schedule bound (see ``gdas_tau``)."""
    if name not in MIXERS:
        raise ConfigError(f"{source} = {name!r} is not known; allowed: {sorted(MIXERS)}")
    if gdas_schedule not in GDAS_SCHEDULES:
        raise ConfigError(f"gdas_schedule = {gdas_schedule!r} is not known; allowed: {list(GDAS_SCHEDULES)}")
    return partial(gdas, schedule=gdas_schedule) if name == "gdas" else MIXERS[name]


def entropy(alphas: Mapping[str, Tensor]) -> float:
    """Mean entropy (nats) of the softmax of every row: how undecided the search still is."""
    rows = [F.softmax(a.detach().float(), -1).reshape(-1, a.size(-1)) for a in alphas.values()]
    ent = [-(p * p.clamp_min(1e-12).log()).sum(-1) for p in rows]
    return float(torch.cat(ent).mean())
