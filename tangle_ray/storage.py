"""Run, search and export folders on object storage (``s3://``, ``gs://``), through pyarrow's file systems.

A folder on object storage is mirrored in a local cache (``$TANGLE_RAY_CACHE``, default
``~/.cache/tangle_ray``): ``pull`` copies what the cache lacks (or holds at another size) down, the command works
on the cache as on any folder, and ``push`` copies what the bucket lacks up, one object per file (a single PUT,
so a reader sees a file whole or not at all). Ray Train and Ray Tune write their checkpoints and experiment
state to the bucket themselves. Credentials and endpoints come from the environment as for any AWS or GCP
client (``AWS_ENDPOINT_URL_S3`` reaches an S3-compatible server).
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable
from pathlib import Path, PurePosixPath

from tangle_ray.errors import ConfigError, StorageError, TangleRayError, clip, shorten

SCHEMES = ("s3", "gs", "gcs")
CHUNK = 8 << 20


def is_uri(path: str | Path) -> bool:
    return "://" in str(path)


def check_uri(uri: str, what: str) -> str:
    """``uri`` if it names a bucket of a supported object store; a ConfigError naming ``what`` otherwise."""
    scheme, _, rest = uri.partition("://")
    if scheme not in SCHEMES:
        raise ConfigError(f"{what} = {shorten(uri)}: the scheme {scheme!r} is not supported; allowed: "
                          f"{[s + '://' for s in SCHEMES]} or a folder every node mounts (NFS)")
    bucket = rest.split("/", 1)[0]
    if not bucket or any(part in (".", "..") for part in rest.split("/")):
        raise ConfigError(f"{what} = {shorten(uri)}: expected {scheme}://bucket/folder")
    return uri.rstrip("/")


def join(uri: str, *parts: str) -> str:
    return "/".join([uri.rstrip("/"), *parts])


def cache_path(uri: str) -> Path:
    """The local mirror of ``uri``: ``$TANGLE_RAY_CACHE/storage/<scheme>/<bucket>/<key>``."""
    scheme, _, rest = uri.partition("://")
    root = Path(os.environ.get("TANGLE_RAY_CACHE", "~/.cache/tangle_ray")).expanduser()
    return root.joinpath("storage", scheme, *PurePosixPath(rest).parts)


def _filesystem(uri: str):
    import pyarrow.fs

    try:
        return pyarrow.fs.FileSystem.from_uri(uri)
    except Exception as e:  # unknown bucket, no credentials, no network: one line
        raise StorageError(f"cannot reach {shorten(uri)} ({type(e).__name__}: {clip(str(e), 200)}); check the "
                          "bucket name, the credentials and the endpoint (AWS_ENDPOINT_URL_S3 for S3-compatible "
                          "servers)") from None


def _remote_files(fs, root: str) -> dict[str, int]:
    """Relative path -> size of every file under ``root`` (nothing when it does not exist)."""
    import pyarrow.fs

    if fs.get_file_info(root).type == pyarrow.fs.FileType.NotFound:
        return {}
    infos = fs.get_file_info(pyarrow.fs.FileSelector(root, recursive=True))
    return {PurePosixPath(i.path).relative_to(root).as_posix(): i.size for i in infos
            if i.type == pyarrow.fs.FileType.File}


def exists(uri: str) -> bool:
    fs, root = _filesystem(uri)
    return bool(_remote_files(fs, root))


def mirror(path: str | Path) -> tuple[Path, str | None]:
    """(the local folder, the object-store folder it mirrors or None) of a folder given as a path or a URI."""
    if not is_uri(path):
        return Path(path), None
    uri = check_uri(str(path), "folder")
    return cache_path(uri), uri


def pull(uri: str, local: Path | None = None, only: Callable[[str], bool] | None = None) -> Path:
    """Mirror the folder ``uri`` into ``local`` (default: its cache path): every file (whose relative name
    ``only`` accepts) the mirror lacks or holds at another size, written next to its place and renamed into it.
    Returns the local folder."""
    local = cache_path(uri) if local is None else local
    fs, root = _filesystem(uri)
    for name, size in _remote_files(fs, root).items():
        if only is not None and not only(name):
            continue
        target = local / name
        if target.is_file() and target.stat().st_size == size:
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.{os.getpid()}.part")  # workers of one node may pull at once
        with fs.open_input_stream(f"{root}/{name}") as src, open(tmp, "wb") as dst:
            while chunk := src.read(CHUNK):
                dst.write(chunk)
        os.replace(tmp, target)
    return local


def push(local: Path, uri: str) -> None:
    """Copy every file under ``local`` that the folder ``uri`` lacks or holds at another size, one object each."""
    fs, root = _filesystem(uri)
    remote = _remote_files(fs, root)
    for path in sorted(p for p in local.rglob("*") if p.is_file() and not p.name.endswith((".part", ".tmp"))):
        name = path.relative_to(local).as_posix()
        if remote.get(name) == path.stat().st_size:
            continue
        with open(path, "rb") as src, fs.open_output_stream(f"{root}/{name}") as dst:
            while chunk := src.read(CHUNK):
                dst.write(chunk)


def localize(path: str | Path, what: str) -> Path:
    """A local folder for ``path``: itself, or the cache mirror of an object-store folder (pulled now)."""
    if not is_uri(path):
        return Path(path)
    uri = check_uri(str(path), what)
    if not exists(uri):
        raise StorageError(f"{what} = {shorten(uri)}: nothing there (no such folder in the bucket)")
    return pull(uri)


def probe(uri: str) -> str:
    """Nothing when an object can be written under ``uri``, read back and deleted from here; else the problem."""
    try:
        fs, root = _filesystem(uri)
        name = f"{root}/.tangle-ray-probe-{uuid.uuid4().hex}"
        with fs.open_output_stream(name) as f:
            f.write(b"probe")
        with fs.open_input_stream(name) as f:
            ok = f.read() == b"probe"
        fs.delete_file(name)
    except (TangleRayError, OSError) as e:
        return f"cannot write to {shorten(uri)} ({clip(str(e), 200)})"
    return "" if ok else f"{shorten(uri)} did not read back what was written"
