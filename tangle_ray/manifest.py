"""Manifests: what a folder tangle_ray wrote holds (sizes, sha256 hashes, the tangle_ray version), written last.

A folder is complete and unchanged when its manifest checks: every listed file present as a regular file, of
the listed size and hash. A folder written by several processes (the ranks of a run checkpoint) holds one
manifest per part, ``manifest.part{i}.json``, each listing what that process wrote; the folder checks when
all parts are there. ``strict`` folders (run checkpoints, whose DeepSpeed files are found by pattern) may hold
nothing unlisted. A manifest is an integrity check, not a signature: see docs/reliability.md. So the readers of
a folder check what they read whether or not a manifest vouches for it: ``check_safetensors`` parses a
safetensors file's header (names, dtypes, shapes, offsets covering the file) inside one clean error.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
from collections.abc import Iterable
from importlib import metadata
from pathlib import Path
from typing import Any

from tangle_ray.configs import read_json
from tangle_ray.errors import DataError, TangleRayError, clip, shorten
from tangle_ray.names import check_relative

MANIFEST = "manifest.json"
FORMAT = "tangle_ray.manifest/1"
MAX_MANIFEST_BYTES = 16 << 20
_CHUNK = 8 << 20
_verified: dict[Path, tuple] = {}  # folder -> stat key of the last successful check (hashing is the cost)


def version() -> str:
    try:
        return metadata.version("tangle-ray")
    except metadata.PackageNotFoundError:
        return "unknown"


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def manifest_name(part: int = 0, parts: int = 1) -> str:
    return MANIFEST if parts == 1 else f"manifest.part{part}.json"


def write_manifest(folder: str | Path, files: Iterable[str] | None = None, part: int = 0, parts: int = 1) -> Path:
    """Write the manifest of ``folder`` (every file under it unless ``files`` names them), atomically, last.

    ``part``/``parts``: this writer's share of a folder written by several processes (e.g. rank, world size).
    """
    root = Path(folder)
    if not 0 <= part < parts:
        raise ValueError(f"manifest part {part} of {parts}")
    names = sorted(files) if files is not None else [n for n in _all_files(root) if not _is_manifest(n)]
    entries = {}
    for name in names:
        path = root / check_relative(name, f"manifest entry of {root}")
        entries[name] = {"bytes": path.stat().st_size, "sha256": sha256(path)}
    body = {"format": FORMAT, "tangle_ray": version(), "part": part, "parts": parts, "files": entries}
    target = root / manifest_name(part, parts)
    tmp = target.with_name(f".{target.name}.tmp")
    tmp.write_text(json.dumps(body, indent=1) + "\n")
    os.replace(tmp, target)
    _verified.pop(root.resolve(), None)
    return target


def remove_manifests(folder: str | Path) -> None:
    """Delete the manifests of ``folder`` before rewriting its files: until a new one is written, readers refuse it."""
    for path in Path(folder).glob("manifest*.json"):
        path.unlink()


def check_manifest(folder: str | Path, what: str = "folder", strict: bool = False,
                   required: Iterable[str] = ()) -> dict[str, dict[str, Any]]:
    """The files of ``folder`` ({name: {bytes, sha256}}) if its manifest checks, else a ConfigError naming the file.

    ``strict``: files the manifest does not list are refused too. ``required``: names that must be listed.
    A successful check is remembered until a file of the folder changes size or modification time.
    """
    root = Path(folder)
    where = f"{what} {root}"
    if not root.is_dir():
        raise DataError(f"{where}: not a folder")
    files = _read_manifests(root, where)
    missing = sorted(set(required) - set(files))
    if missing:
        raise DataError(f"{where}: the manifest does not list {missing}; was it written by tangle_ray?")
    present = _all_files(root)
    if strict:
        extra = sorted(n for n in present if n not in files and not _is_manifest(n))
        if extra:
            raise DataError(f"{where}: holds files its manifest does not list: {shorten(extra)}; "
                              "a folder written by tangle_ray holds nothing else")
    key = tuple(sorted(present.items()))
    if _verified.get(root.resolve()) == key:
        return files
    for name, entry in files.items():
        path = root / name
        if name not in present:
            raise DataError(f"{where}: {name} is missing (listed in its manifest); the folder is incomplete")
        size = present[name][0]
        if size < 0:
            raise DataError(f"{where}: {name} is not a regular file (a link or a special file)")
        if size != entry["bytes"]:
            raise DataError(f"{where}: {name} is {size} bytes, its manifest says {entry['bytes']}: "
                              "truncated or modified")
        if sha256(path) != entry["sha256"]:
            raise DataError(f"{where}: {name} does not match the sha256 of its manifest: corrupt or modified")
    _verified[root.resolve()] = key
    return files


def check_safetensors(path: str | Path, what: str, fix: str = "export again", module: Any = None,
                      empty_ok: bool = False) -> dict[str, tuple[str, tuple[int, ...]]]:
    """{tensor name: (dtype, shape)} of a safetensors file whose header parses and whose offsets cover the file
    exactly (the data is not read); a DataError naming ``what``, the file and ``fix`` for a file that is cut,
    empty, garbled, of another format or holds no tensor (unless ``empty_ok``). With ``module`` (a torch module,
    e.g. built on the meta device: no memory), its state must be what the file holds: every tensor a
    floating-point one of the module's shape, none unknown, none missing (a tied weight stored once is one)."""
    from safetensors import safe_open

    path = Path(path)
    try:
        with safe_open(str(path), "pt") as f:
            tensors = {}
            for name in f.keys():
                part = f.get_slice(name)
                tensors[name] = (str(part.get_dtype()), tuple(int(n) for n in part.get_shape()))
    except Exception as e:  # SafetensorError (header, offsets, size), OSError; never a traceback
        raise DataError(f"{what}: {path.name} is not a readable safetensors file ({clip(str(e), 200)}): "
                        f"{fix}") from None
    if not tensors and not empty_ok:
        raise DataError(f"{what}: {path.name} holds no tensors: {fix}")
    if module is not None:
        _check_state(module, tensors, f"{what}: {path.name}", fix)
    return tensors


_FLOATS = ("F16", "BF16", "F32", "F64")


def _check_state(module: Any, tensors: dict[str, tuple[str, tuple[int, ...]]], where: str, fix: str) -> None:
    state = set(module.state_dict())  # persistent buffers and parameters; tied ones under each of their names
    groups: dict[int, list[str]] = {}
    shapes: dict[str, tuple[tuple[int, ...], bool]] = {}
    for name, t in (*module.named_parameters(remove_duplicate=False), *module.named_buffers(remove_duplicate=False)):
        if name in state:
            groups.setdefault(id(t), []).append(name)
            shapes[name] = tuple(t.shape), t.is_floating_point()
    for name, (dtype, shape) in tensors.items():
        if name not in shapes:
            raise DataError(f"{where} holds tensor {shorten(name)}, which the model has not: {fix}")
        want, floating = shapes[name]
        if shape != want or floating and dtype not in _FLOATS:
            raise DataError(f"{where}: tensor {shorten(name)} is {dtype} {list(shape)}, the model's is "
                            f"{'floating point ' if floating else ''}{list(want)}: {fix}")
    missing = sorted(names[0] for names in groups.values() if not any(n in tensors for n in names))
    if missing:
        raise DataError(f"{where} lacks tensors {shorten(missing, 200)} of the model: {fix}")


def _read_manifests(root: Path, where: str) -> dict[str, dict[str, Any]]:
    paths = sorted(root.glob("manifest*.json"))
    if not paths:
        raise DataError(f"{where}: no {MANIFEST} (it was written before tangle_ray kept manifests, not by "
                          "tangle_ray, or its writing was cut short); write the folder again")
    files: dict[str, dict[str, Any]] = {}
    parts: set[int] = set()
    total = None
    for path in paths:
        body = _read_one(path, where)
        if total is not None and body["parts"] != total:
            raise DataError(f"{where}: {path.name} says {body['parts']} parts, another manifest {total}")
        total = body["parts"]
        if path.name != manifest_name(body["part"], total) or body["part"] in parts:
            raise DataError(f"{where}: {path.name} does not hold part {body['part']} of {total} it claims")
        parts.add(body["part"])
        for name, entry in body["files"].items():
            if name in files and files[name] != entry:
                raise DataError(f"{where}: {name} is listed by two manifests with different contents")
            files[name] = entry
    if parts != set(range(total)):
        raise DataError(f"{where}: manifest parts {sorted(set(range(total)) - parts)} of {total} are missing; "
                          "the folder is incomplete")
    return files


def _read_one(path: Path, where: str) -> dict[str, Any]:
    try:
        if path.is_symlink():
            raise ValueError("a symbolic link")
        body = read_json(path, "manifest", MAX_MANIFEST_BYTES, plain=False)
        ok = (isinstance(body, dict) and body.get("format") == FORMAT and isinstance(body.get("files"), dict)
              and all(isinstance(body.get(k), int) and not isinstance(body.get(k), bool) for k in ("part", "parts"))
              and 0 <= body["part"] < body["parts"] <= 1 << 16)
        if not ok:
            raise ValueError(f"not a {FORMAT} manifest")
        for name, entry in body["files"].items():
            check_relative(name, "entry")
            if not (isinstance(entry, dict) and isinstance(entry.get("bytes"), int) and entry["bytes"] >= 0
                    and isinstance(entry.get("sha256"), str) and len(entry["sha256"]) == 64):
                raise ValueError(f"entry {shorten(name)} is malformed")
    except (OSError, ValueError, RecursionError, TangleRayError) as e:
        raise DataError(f"{where}: cannot read {path.name} ({clip(str(e), 200)})") from None
    return body


def _is_manifest(name: str) -> bool:
    return "/" not in name and name.startswith(("manifest", ".manifest")) and name.endswith((".json", ".tmp"))


def _all_files(root: Path) -> dict[str, tuple[int, int]]:
    """Every non-directory entry under ``root`` (symbolic links included, not followed): name -> (size, mtime)."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        rel = Path(dirpath).relative_to(root)
        for name in filenames + [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]:
            st = os.lstat(os.path.join(dirpath, name))
            regular = stat.S_ISREG(st.st_mode)  # links and special files never match an entry
            out[(rel / name).as_posix()] = (st.st_size if regular else -1, st.st_mtime_ns)
    return out
