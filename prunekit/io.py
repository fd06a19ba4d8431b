"""Atomic writes and versioned artefacts.

Every file prunekit writes goes through a temporary name and ``os.replace``, so a
crash never leaves a half-written file or directory that looks whole.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator

from prunekit.errors import SchemaError

SCHEMA_MAJOR = 1
SCHEMA_VERSION = f"{SCHEMA_MAJOR}.0"


def prunekit_version() -> str:
    from prunekit import __version__

    return __version__


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_text_atomic(path: str | Path, text: str) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the file normal permissions
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return path


def write_json_atomic(path: str | Path, data: Any) -> Path:
    return write_text_atomic(path, json.dumps(data, indent=2, ensure_ascii=False, allow_nan=True) + "\n")


def versioned(kind: str, payload: dict[str, Any]) -> dict[str, Any]:
    """Stamp an artefact with its kind, schema version and the writing prunekit version."""
    return {"kind": kind, "schema_version": SCHEMA_VERSION, "prunekit_version": prunekit_version(), **payload}


def read_versioned(path: str | Path, kind: str) -> dict[str, Any]:
    """Read a JSON artefact, refusing an unknown major schema version with a clear message."""
    path = Path(path)
    data = json.loads(path.read_text(encoding="utf-8"))
    version = str(data.get("schema_version", "0"))
    major = int(version.split(".")[0])
    if major != SCHEMA_MAJOR:
        raise SchemaError(
            f"{path} has {kind} schema version {version}, but this prunekit ({prunekit_version()}) "
            f"reads major version {SCHEMA_MAJOR}; upgrade prunekit or regenerate the file"
        )
    if data.get("kind", kind) != kind:
        raise SchemaError(f"{path} is a '{data.get('kind')}' file, expected '{kind}'")
    return data


@contextlib.contextmanager
def atomic_directory(target: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling directory that replaces ``target`` only if the block succeeds."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".partial", dir=target.parent))
    os.chmod(staging, 0o777 & ~_umask())
    try:
        yield staging
        if target.exists():
            if not overwrite:
                raise FileExistsError(target)
            trash = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))  # unique across hosts
            os.replace(target, trash)
            os.replace(staging, target)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def publish_directory(target: str | Path, build: Callable[[Path], Any],
                      complete: Callable[[Path], bool] = Path.exists) -> Path:
    """Build ``target`` once for every process and host sharing its folder (a cache on NFS): under an
    exclusive lock beside it (``prunekit.locks``), ``build(staging)`` fills a staging folder that is
    renamed into place. A process that finds ``target`` complete uses it; one that waited for another's
    build uses that; one whose build finds ``target`` already published discards its own staging.
    A present but incomplete ``target`` (``complete`` says no) is moved aside under a unique name."""
    from prunekit.locks import exclusive

    target = Path(target)
    if complete(target):
        return target
    with exclusive(target.parent / f".{target.name}.lock"):
        if complete(target):  # another process built it while we waited
            return target
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".partial", dir=target.parent))
        os.chmod(staging, 0o777 & ~_umask())
        try:
            build(staging)
            if complete(target):  # published meanwhile by a process that took no lock: keep theirs
                return target
            if target.exists():
                trash = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
                os.replace(target, trash / target.name)
                shutil.rmtree(trash, ignore_errors=True)
            try:
                os.rename(staging, target)
            except OSError:  # a whole target appeared in between (ENOTEMPTY / EEXIST): keep it
                if not complete(target):
                    raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return target


def cache_dir(*parts: str) -> Path:
    """prunekit's cache root (``$PRUNEKIT_CACHE`` or ``~/.cache/prunekit``)."""
    root = Path(os.environ.get("PRUNEKIT_CACHE", Path.home() / ".cache" / "prunekit"))
    path = root.joinpath(*parts)
    path.mkdir(parents=True, exist_ok=True)
    return path
