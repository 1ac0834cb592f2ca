"""Folders tangle_ray writes for other commands to read: the supernet folder.

A supernet folder (written by ``tangle-ray export``) holds ``space.yaml`` (the space as it was trained),
``supernet.safetensors`` (the entangled weights), ``alphas.safetensors`` (architecture parameters) and
``meta.json`` (method, step, anything else given), and ``manifest.json`` (sizes and hashes, written last and
checked before anything is read: ``tangle_ray.manifest``). Model folders are written by each family's
``save_pretrained`` and read by ``tangle_ray.models.load_model``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from tangle_ray.configs import parse_yaml, read_json
from tangle_ray.errors import DataError, TangleRayError, clip, shorten
from tangle_ray.manifest import check_manifest, check_safetensors, remove_manifests, write_manifest
from tangle_ray.models import space_from_dict
from tangle_ray.space import SearchSpace, space_to_dict
from tangle_ray.supernet import Supernet

SUPERNET_FILES = ("space.yaml", "supernet.safetensors", "alphas.safetensors", "meta.json")


def save_supernet(supernet: Supernet, out_dir: str | Path, meta: dict[str, Any] | None = None) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    remove_manifests(out)  # until the new manifest is written, the folder is refused
    save_file(unique_tensors(supernet.net.state_dict()), str(out / "supernet.safetensors"))
    save_file(unique_tensors(dict(supernet.alphas)), str(out / "alphas.safetensors"))
    (out / "space.yaml").write_text(yaml.safe_dump(space_to_dict(supernet.space), sort_keys=False))
    (out / "meta.json").write_text(json.dumps(meta or {}, indent=2, allow_nan=False) + "\n")
    write_manifest(out, SUPERNET_FILES)
    return out


def check_supernet_folder(path: str | Path, space: SearchSpace | None = None) -> SearchSpace:
    """The checks every reader of a supernet folder runs (``evaluate``, ``tune``, a run that inherits from one),
    whether or not its manifest vouches for it; returns the space it was trained on.

    Every file is there and matches the manifest; ``space.yaml`` is a valid space (of the same shape as
    ``space``, when given); ``meta.json`` is a JSON object; both safetensors headers parse (``check_safetensors``)
    and hold exactly the tensors of that space's supernet with its shapes, compared with the supernet built on the
    meta device, so that nothing is allocated. A DataError names the folder, the file, the value and says to
    export again."""
    from tangle_ray.train.capacity import meta_supernet

    folder = Path(path)
    where = f"supernet checkpoint {folder}"
    missing = [name for name in SUPERNET_FILES if not (folder / name).is_file()]
    if missing:
        raise DataError(
            f"{where}: missing {missing}; expected a folder written by "
            f"`tangle-ray export RUN` (files {list(SUPERNET_FILES)})"
        )
    check_manifest(folder, "supernet checkpoint", required=SUPERNET_FILES)
    try:
        text = (folder / "space.yaml").read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{where}: cannot read space.yaml ({clip(str(e), 200)})") from None
    source = str(folder / "space.yaml")
    stored = space_from_dict(parse_yaml(text, source), source=source)
    if space is not None and space_shape(space) != space_shape(stored):
        want, have = space_shape(space), space_shape(stored)
        diff = sorted(k for k in want if want[k] != have[k])
        raise DataError(
            f"{where} was trained on space {stored.name!r}, which differs from space = "
            f"{space.name!r} in {diff}: {[have[k] for k in diff]} vs {[want[k] for k in diff]}"
        )
    try:
        meta = read_json(folder / "meta.json", "supernet meta")
    except TangleRayError as e:
        raise DataError(f"{where}: meta.json cannot be read ({clip(str(e), 200)}): export again") from None
    if not isinstance(meta, dict):
        raise DataError(f"{where}: meta.json holds {type(meta).__name__}, not a JSON object: export again")
    shapes = meta_supernet(stored)
    check_safetensors(folder / "supernet.safetensors", where, module=shapes.net)
    check_safetensors(folder / "alphas.safetensors", where, module=shapes.alphas, empty_ok=True)
    return stored


def load_supernet(path: str | Path, space: SearchSpace | None = None, **overrides) -> Supernet:
    """Load a folder written by ``save_supernet`` (or ``tangle-ray export``), checked by
    ``check_supernet_folder`` and, before anything is built, against this machine's memory.

    With ``space`` given, the checkpoint must have been trained on a space of the same shape.
    """
    from tangle_ray.train.capacity import check_build

    folder = Path(path)
    stored = check_supernet_folder(folder, space)
    check_build(stored, f"supernet checkpoint {folder}")
    supernet = stored.build_supernet(**overrides)
    try:
        load_weights(supernet.net, load_file(str(folder / "supernet.safetensors")), f"supernet checkpoint {folder}")
        supernet.alphas.load_state_dict(load_file(str(folder / "alphas.safetensors")))
    except TangleRayError:
        raise
    except Exception as e:  # corrupt file or shapes of another space
        raise DataError(f"supernet checkpoint {folder}: cannot load weights ({type(e).__name__}: "
                        f"{clip(str(e), 200)})") from None
    tensors = {**supernet.net.state_dict(), **{f"alphas.{k}": a for k, a in supernet.alphas.items()}}
    bad = next((n for n, t in tensors.items() if t.is_floating_point() and not t.isfinite().all()), None)
    if bad is not None:
        raise DataError(f"supernet checkpoint {folder}: non-finite values in {bad} (garbled: an export never holds "
                        "them): export again")
    return supernet


def load_weights(module: nn.Module, state: dict[str, Tensor], where: str) -> None:
    """Load a full state dict; tied weights (an output head that is the token embedding) may be absent."""
    try:
        result = module.load_state_dict(state, strict=False)
    except RuntimeError as e:  # shapes of another space
        raise DataError(f"{where}: weights do not fit the model ({e})") from None
    own = module.state_dict()
    missing = set(result.missing_keys) - (set(own) - set(unique_tensors(own)))
    if missing or result.unexpected_keys:
        raise DataError(
            f"{where}: weights do not fit the model (missing {shorten(sorted(missing), 200)}, "
            f"unexpected {shorten(sorted(result.unexpected_keys), 200)})"
        )


def space_shape(space: SearchSpace) -> dict[str, Any]:
    """What the weights depend on: the model, the choices and the fixed settings except dropout."""
    d = space_to_dict(space)
    return {"model": d["model"], "choices": d["choices"], "per_layer": d["per_layer"],
            "fixed": {k: v for k, v in d["fixed"].items() if k != "dropout"}}


def unique_tensors(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Each tensor once (the tied output head is the token embedding), detached, contiguous, on the CPU."""
    seen, out = set(), {}
    for name, t in state.items():
        if t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        out[name] = t.detach().contiguous().cpu()
    return out
