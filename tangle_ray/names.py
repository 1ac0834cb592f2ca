"""Names that become folders, and paths that must stay inside a folder or be writable output folders."""

from __future__ import annotations

import os
from pathlib import Path, PurePosixPath

from tangle_ray.errors import ConfigError, shorten

MAX_NAME_BYTES = 200  # file systems allow 255; Ray and tangle_ray append suffixes to some names
SYSTEM_ROOTS = ("/proc", "/sys", "/dev")  # never an output folder


def check_name(name: object, what: str) -> str:
    """``name`` if it is one plain folder or file name: a non-empty string without path separators, NUL or
    control characters, not ``.`` or ``..``, not starting with a space or ending with one, at most
    ``MAX_NAME_BYTES`` bytes of UTF-8."""
    if not isinstance(name, str) or not name:
        raise ConfigError(f"{what} = {shorten(name)} must be a non-empty folder name")
    bad = sorted({c for c in name if c in "/\\" or ord(c) < 32 or ord(c) == 127})
    problem = (
        f"contains {shorten(''.join(bad))} (path separators and control characters are not allowed)" if bad
        else "is a relative path, not a name" if name in (".", "..")
        else "starts or ends with a space" if name != name.strip()
        else f"is longer than {MAX_NAME_BYTES} bytes" if len(name.encode("utf-8", "surrogatepass")) > MAX_NAME_BYTES
        else "is not valid Unicode text" if _has_surrogates(name)
        else ""
    )
    if problem:
        raise ConfigError(f"{what} = {shorten(name)} {problem}; give a plain folder name such as 'run-1'")
    return name


def check_relative(path: object, what: str) -> PurePosixPath:
    """``path`` as a relative POSIX path that stays inside its folder: every part a plain name (no ``..``,
    no absolute path, no empty part)."""
    if not isinstance(path, str) or not path or path.startswith("/"):
        raise ConfigError(f"{what} = {shorten(path)} must be a relative path inside its folder")
    for part in path.split("/"):
        check_name(part, what)
    return PurePosixPath(path)


def check_not_uri(path: str, what: str) -> str:
    """``path`` if it is a file-system path: an object-store URI (``s3://``, ``gs://``) is refused, since
    tangle_ray writes its run folders, exports and reports as files (resolving one as a local path would
    silently write to ``./s3:/...`` on each node)."""
    if "://" in path:
        raise ConfigError(f"{what} = {shorten(path)} is an object-store URI; tangle_ray writes runs and reads data "
                          "as files: use a folder that every node mounts at the same path (NFS, EFS, Filestore, "
                          "Lustre), e.g. /shared/runs (docs/cluster.md)")
    return path


def check_output_dir(path: str | Path, what: str) -> Path:
    """``path`` resolved, if it can be an output folder: not ``/``, not under /proc, /sys or /dev, not an
    existing file, below an existing folder that is writable. Creates nothing."""
    text = str(path)
    if "\x00" in text:
        raise ConfigError(f"{what} = {shorten(text)} contains a NUL character")
    try:
        resolved = Path(text).expanduser().resolve()
    except (OSError, RuntimeError) as e:  # symlink loops
        raise ConfigError(f"{what} = {shorten(text)} cannot be resolved ({e})") from None
    if resolved == Path(resolved.anchor):
        raise ConfigError(f"{what} = {shorten(text)} is the root of the file system; give a folder of your own")
    if any(resolved == Path(r) or Path(r) in resolved.parents for r in SYSTEM_ROOTS):
        raise ConfigError(f"{what} = {shorten(text)} is under {', '.join(SYSTEM_ROOTS)}; give a folder of your own")
    try:
        if resolved.exists() and not resolved.is_dir():
            raise ConfigError(f"{what} = {shorten(text)} is an existing file, not a folder")
        parent = next(p for p in (resolved, *resolved.parents) if p.exists())
    except OSError as e:  # a name too long for the file system
        raise ConfigError(f"{what} = {shorten(text)}: {e.strerror or e}") from None
    if not parent.is_dir():
        raise ConfigError(f"{what} = {shorten(text)}: {parent} is a file, not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(f"{what} = {shorten(text)}: {parent} is not writable")
    return resolved


def _has_surrogates(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def output_folder(out: str | None, default: Path, what: str = "--out") -> Path:
    """The folder a command writes to: ``out`` if given (a file-system path, not empty), else ``default``,
    resolved."""
    if out is not None and not out.strip():
        raise ConfigError(f"{what} must not be empty")
    if out is not None:
        check_not_uri(out, what)
    return Path(out or default).resolve()
