"""The model-family registry: a family is one module of ``tangle_ray/models/`` that registers itself.

A family says what its space files hold (fixed settings, choices, their checks), builds the weight-entangled
net of a space and the standalone model of one architecture, loads an exported model folder and counts
parameters and FLOPs. Everything outside ``models/`` reaches a family through ``get_family(space.model)``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from safetensors.torch import load_model, save_model
from torch import Tensor, nn

from tangle_ray.configs import read_json
from tangle_ray.errors import ConfigError, DataError, TangleRayError, clip, shorten
from tangle_ray.manifest import check_manifest, check_safetensors, remove_manifests, write_manifest
from tangle_ray.space import Arch, SearchSpace
from tangle_ray.supernet import Supernet

REQUIRED = object()
_DTYPES = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64}


@dataclass(frozen=True)
class Setting:
    """One fixed setting of a family's space files: its type and default (``REQUIRED`` if none)."""

    type: type
    default: Any = REQUIRED


MODEL_FILES = ("model.safetensors", "config.json")


def check_model_folder(folder: str | Path) -> dict[str, Any]:
    """The checks every reader of an exported model folder runs (``evaluate``, a retrain's test score,
    ``load_model``), whether or not its manifest vouches for it; returns its ``config.json``.

    Both files are there and match the manifest; ``config.json`` is a JSON object naming a family and holding
    its settings; ``model.safetensors``'s header parses and holds tensors (``check_safetensors``; the model's
    own shapes are compared when it is loaded). A DataError names the folder, the file, the value and says to
    export again."""
    folder = Path(folder)
    for name in MODEL_FILES:
        if not (folder / name).is_file():
            raise DataError(f"model folder {folder}: missing {name} (write one with save_pretrained or export)")
    check_manifest(folder, "model folder", required=MODEL_FILES)
    try:
        config = read_json(folder / "config.json", "model folder file")
    except TangleRayError as e:
        raise DataError(f"model folder {folder}: config.json cannot be read ({clip(str(e), 200)}): "
                        "export again") from None
    if not isinstance(config, dict) or not isinstance(config.get("config"), dict):
        raise DataError(f"model folder {folder}: config.json must hold a JSON object with the model's settings "
                        "under \"config\": export again")
    check_safetensors(folder / "model.safetensors", f"model folder {folder}")
    return config


class Pretrained(nn.Module):
    """A standalone model whose settings are a dataclass ``config``: its folder is ``model.safetensors`` plus a
    ``config.json`` a person reads ({"model": family, "config": ..., "arch": ...})."""

    family: ClassVar[str]
    config_class: ClassVar[type]
    config: Any

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def save_pretrained(self, out_dir: str | Path, arch: Arch | None = None) -> Path:
        """Write ``model.safetensors`` and ``config.json`` (plus the architecture, if given)."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        remove_manifests(out)  # refused until the new manifest is written, last
        save_model(self, str(out / "model.safetensors"))
        meta = {"model": self.family, "config": asdict(self.config), "arch": arch}
        (out / "config.json").write_text(json.dumps(meta, indent=2) + "\n")
        write_manifest(out, MODEL_FILES)
        return out

    @classmethod
    def from_pretrained(cls, model_dir: str | Path):
        path = Path(model_dir)
        meta = check_model_folder(path)
        where = f"model folder {path}"
        try:
            config = cls.config_class(**meta["config"])
            with torch.device("meta"):  # shapes only: the file is compared with them before anything is allocated
                shapes = cls(config)
        except (ValueError, KeyError, TypeError, RuntimeError) as e:
            raise DataError(f"{where}: config.json does not describe a {cls.family} model "
                            f"({clip(str(e), 200)}): export again") from None
        tensors = check_safetensors(path / "model.safetensors", where, module=shapes)
        try:
            model = cls(config)
            model.to(_DTYPES.get(next(iter(tensors.values()))[0], torch.float32))  # keep the stored precision
            load_model(model, str(path / "model.safetensors"))
        except Exception as e:  # SafetensorError, shapes: never a traceback
            raise DataError(f"{where}: cannot load ({type(e).__name__}: {clip(str(e), 200)}): export again") from None
        bad = next((n for n, t in model.state_dict().items() if t.is_floating_point() and not t.isfinite().all()),
                   None)
        if bad is not None:
            raise DataError(f"{where}: model.safetensors holds non-finite values in {bad} (garbled; an export "
                            "never holds them): export again")
        return model


class ModelFamily:
    """Base of every family. Subclass, fill in the class attributes and methods, and decorate with ``register``.

    The entangled net (``build_net``) runs ``net(x, targets, weights=W)`` (superposition), ``net(x, targets,
    arch=A, keep_all_params=...)`` (single path) and ``net.extract(A)`` (the standalone model); every forward
    returns ``(output, loss)``. A standalone model has ``forward(x, targets=None) -> (output, loss)``,
    ``num_parameters()`` and ``save_pretrained(folder, arch)``, which writes ``model.safetensors`` and a
    ``config.json`` naming the family under ``"model"``.
    """

    name: ClassVar[str]  # the ``model:`` key of space files
    task: ClassVar[str]  # the task it trains on (``tangle_ray.tasks``)
    depth_dim: ClassVar[str]  # the choice that sets the number of layers
    dims: ClassVar[dict[str, bool]]  # every choice of the family -> chosen per layer
    integer_dims: ClassVar[tuple[str, ...]] = ()  # choices whose values must be integers
    fixed: ClassVar[dict[str, Setting]]

    def check(self, space: SearchSpace) -> None:
        """Rules across settings and choices; raise ConfigError naming ``space.source``, the key and the value."""

    def build_net(self, space: SearchSpace, **overrides: Any) -> nn.Module:
        raise NotImplementedError

    def build_supernet(self, space: SearchSpace, **overrides: Any) -> Supernet:
        return Supernet(space, self.build_net(space, **overrides))

    def build_model(self, space: SearchSpace, arch: Arch, **overrides: Any) -> nn.Module:
        """A freshly initialised standalone model of ``arch`` (``overrides`` replace fixed settings)."""
        raise NotImplementedError

    model_class: ClassVar[type[Pretrained]]  # the standalone model

    def load_model(self, folder: Path) -> Pretrained:
        """The standalone model saved in ``folder``."""
        return self.model_class.from_pretrained(folder)

    def model_settings(self, model: nn.Module) -> dict[str, Any]:
        """The fixed settings a task reads (input size, vocabulary or classes...) of a standalone model."""
        raise NotImplementedError

    def param_count(self, space: SearchSpace, arch: Arch) -> int:
        raise NotImplementedError

    def flops(self, space: SearchSpace, arch: Arch) -> int:
        """Forward FLOPs (2 per multiply-add) of one sample: a sequence of the full context, or one image."""
        raise NotImplementedError

    def superposed_flops(self, space: SearchSpace, samples: int, backward: bool = False) -> int:
        """FLOPs of one superposed pass of the supernet over ``samples`` samples, forward (and ``backward``):
        what a TangleNAS step computes, against ``flops`` of the architecture it chooses (the scaling command's
        two MFUs)."""
        raise NotImplementedError(f"the {self.name} family does not count its superposed FLOPs")

    # Scoring with inherited weights. A family whose extracted models need preparing before they are scored
    # (batch-norm statistics gathered under other subnets) sets ``calibrates``: every scorer of an architecture
    # with a supernet's weights (``evaluate.evaluate_arch`` with calibration batches: Tune trials, ``tangle-ray
    # evaluate --supernet``, the any-time curve, the comparison with random architectures) and the export of a
    # model then extract the architecture and call ``prepare_for_eval`` on the task's calibration batches
    # (``Task.calibration_set``) instead of scoring the supernet's single path.
    calibrates: ClassVar[bool] = False

    def prepare_for_eval(self, model: nn.Module, batches: Sequence[Tensor]) -> nn.Module:
        """Make a standalone model extracted from a supernet ready to be scored (in place; returned). Default:
        nothing to do."""
        return model

    def no_weight_decay(self, name: str, param: nn.Parameter, module: nn.Module) -> bool:
        """Whether the weight optimizer exempts a parameter (biases, norms, embeddings by default)."""
        return param.ndim < 2 or isinstance(module, (nn.Embedding, nn.LayerNorm))


FAMILIES: dict[str, ModelFamily] = {}


def register(cls: type[ModelFamily]) -> type[ModelFamily]:
    """Class decorator: make ``cls`` the family of space files with ``model: <cls.name>``."""
    FAMILIES[cls.name] = cls()
    return cls


def get_family(name: str, source: str = "space") -> ModelFamily:
    """The family registered as ``name`` (``tangle_ray.models`` imports every family module)."""
    if not isinstance(name, str) or name not in FAMILIES:
        raise ConfigError(f"{source}: model = {shorten(name)} is not a known family; allowed: {sorted(FAMILIES)}")
    return FAMILIES[name]
