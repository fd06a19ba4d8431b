"""Atomic writes and versioned artefacts.

Every file prunekit writes goes through a temporary name and ``os.replace``, so a
crash never leaves a half-written file or directory that looks whole.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import socket
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterator

from prunekit.errors import ConfigError, ModelError, PrunekitError, SchemaError

SCHEMA_MAJOR = 1
SCHEMA_VERSION = f"{SCHEMA_MAJOR}.0"


def prunekit_version() -> str:
    from prunekit.version import __version__

    return __version__


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_text_atomic(path: str | Path, text: str) -> Path:
    path = Path(path)
    with disk_errors(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the file normal permissions
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise _disk_error(err, path) or err
    return path


def write_json_atomic(path: str | Path, data: Any) -> Path:
    return write_text_atomic(path, json.dumps(data, indent=2, ensure_ascii=False, allow_nan=True) + "\n")


def versioned(kind: str, payload: dict[str, Any]) -> dict[str, Any]:
    """Stamp an artefact with its kind, schema version and the writing prunekit version."""
    return {"kind": kind, "schema_version": SCHEMA_VERSION, "prunekit_version": prunekit_version(), **payload}


def read_versioned(path: str | Path, kind: str) -> dict[str, Any]:
    """Read a JSON artefact, refusing an unknown major schema version with a clear message."""
    path = Path(path)
    data = read_json(path)
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
def atomic_directory(target: str | Path, overwrite: bool = False, staging: str | Path | None = None,
                     kept: Callable[[], str | None] | None = None) -> Iterator[Path]:
    """Yield a temporary sibling directory that replaces ``target`` only if the block succeeds.

    The sibling is ``.TARGET.<random>.partial``, owned by this process while the block runs (``owned``: a
    later run removes it once this process is gone, ``remove_leftovers``), and removed if the block fails.
    ``staging``: an existing directory to fill instead (a resumable one: ``prunekit.staging`` owns it,
    and it is kept when the block fails; ``kept()`` says what of it a failure leaves, for the error
    message, or None when nothing is). With ``overwrite`` the old ``target`` is moved aside to an
    owned ``.TARGET.old-<random>`` and deleted once the new one is in place."""
    target = Path(target)
    given = staging is not None
    with disk_errors(target):
        target.parent.mkdir(parents=True, exist_ok=True)
        if staging is None:
            staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".partial", dir=target.parent))
            os.chmod(staging, 0o777 & ~_umask())
    staging = Path(staging)
    try:
        with contextlib.ExitStack() as owner:
            if not given:
                owner.enter_context(owned(staging, target.name))
            yield staging
        normal_permissions(staging)
        if target.exists():
            if not overwrite:
                raise FileExistsError(target)
            trash = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))  # unique across hosts
            with owned(trash, target.name):
                os.replace(target, trash / target.name)
                os.replace(staging, target)
                shutil.rmtree(trash / target.name, ignore_errors=True)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            try:
                os.replace(staging, target)
            except OSError as err:  # another process put a non-empty target there since the check: as above
                if err.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                    raise
                raise FileExistsError(target) from err
    except BaseException as err:
        if not given:
            shutil.rmtree(staging, ignore_errors=True)
        raise _disk_error(err, target, None if kept is None else kept()) or err


def normal_permissions(directory: str | Path) -> None:
    """Give every file under ``directory`` the permissions a new file gets (``0o666 & ~umask``: others may
    read on a shared disk), whatever the library that wrote it chose (a temp file's 0600)."""
    mode = 0o666 & ~_umask()
    for file in Path(directory).rglob("*"):
        if file.is_file() and not file.is_symlink():
            os.chmod(file, mode)


# ---------------------------------------------------------------------------------------------
# Who is writing a staging directory, and what an interrupted run left behind
# ---------------------------------------------------------------------------------------------

OWNER_FILE = ".prunekit-owner.json"  # inside a staging directory: {"host", "pid", "target"}
OWNER_LOCK = ".prunekit-owner.lock"  # held (prunekit.locks) by the owner while it lives
LEGACY_STALE_S = 3600.0  # a leftover with no owner recorded (an older prunekit) is stale once unchanged this long


@contextlib.contextmanager
def owned(directory: str | Path, target: str) -> Iterator[None]:
    """Mark ``directory`` as this process's work towards ``target`` (a sibling's name) for the block: a lock
    that dies with the process and a record of host and pid. Raises ``prunekit.locks.LockBusy`` when a
    live process owns it. The marks are removed when the block ends."""
    from prunekit.locks import exclusive

    directory = Path(directory)
    with exclusive(directory / OWNER_LOCK, wait=False, marker=False):
        write_json_atomic(directory / OWNER_FILE, {"host": socket.gethostname(), "pid": os.getpid(), "target": target})
        try:
            yield
        finally:
            with contextlib.suppress(FileNotFoundError):
                (directory / OWNER_FILE).unlink()
    with contextlib.suppress(FileNotFoundError):
        (directory / OWNER_LOCK).unlink()


def owner_of(directory: str | Path) -> dict[str, Any] | None:
    """The owner record ``owned`` wrote in ``directory``; None when there is none (or it is damaged)."""
    with contextlib.suppress(OSError, ValueError):
        record = json.loads((Path(directory) / OWNER_FILE).read_text(encoding="utf-8"))
        if isinstance(record, dict):
            return record
    return None


def pid_alive(pid: Any) -> bool:
    """Whether process ``pid`` runs on this host (a pid that is not a positive int: no)."""
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def owner_alive(directory: str | Path, record: dict[str, Any] | None = None) -> bool:
    """Whether another live process owns ``directory``: its lock is held; or, where the filesystem has no
    locks, its recorded pid runs on this host (or it was recorded on another host, which cannot be asked)."""
    from prunekit.locks import lock_state

    directory = Path(directory)
    record = owner_of(directory) if record is None else record
    state = lock_state(directory / OWNER_LOCK)
    if state in ("held", "free"):
        return state == "held"
    if record is None:
        return False
    if record.get("host") != socket.gethostname():
        return state == "unsupported"
    return record.get("pid") != os.getpid() and pid_alive(record.get("pid"))


def tree_bytes(path: str | Path) -> int:
    """The bytes of the files under ``path`` (0 when it does not exist)."""
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(root, name)).st_size
    return total


def _newest_change(path: Path) -> float:
    newest = path.stat().st_mtime
    for root, _, files in os.walk(path):
        for name in files:
            with contextlib.suppress(OSError):
                newest = max(newest, os.lstat(os.path.join(root, name)).st_mtime)
    return newest


def remove_leftovers(out: str | Path, say: Callable[[str], None], staging: bool = True) -> int:
    """Remove what interrupted runs left beside ``out`` and say so, one line each with its size:
    ``.OUT.<random>.partial`` (an atomic write's staging), ``.OUT.old-<random>`` (an interrupted
    --overwrite) and, with ``staging``, the resumable ``.OUT.partial`` (``prunekit.staging``). What a live
    process owns is never touched (named, once); what an older prunekit left without an owner record is
    removed once unchanged for an hour. Returns the bytes removed."""
    out = Path(out)
    if not out.parent.is_dir():
        return 0
    name = re.escape(out.name)
    pattern = re.compile(rf"^\.{name}\.(?:[a-z0-9_]{{8}}\.partial|old-[a-z0-9_]{{8}}" + ("|partial)$" if staging else ")$"))
    removed = 0
    for path in sorted(out.parent.iterdir()):
        if not pattern.match(path.name) or not path.is_dir() or path.is_symlink():
            continue
        record = owner_of(path)
        if record is not None and record.get("target") not in (None, out.name):
            continue
        size = tree_bytes(path)
        if owner_alive(path, record):
            who = f"pid {record.get('pid')} on {record.get('host')}" if record else "a live process"
            say(f"left {path.name} ({_size(size)}) alone: {who} is writing it")
            continue
        if record is None and path.name != f".{out.name}.partial":
            idle = time.time() - _newest_change(path)
            if idle < LEGACY_STALE_S:
                say(f"left {path.name} ({_size(size)}) alone: no owner recorded and changed {idle / 60:.0f} min ago; "
                    "remove it yourself if no prunekit is writing it")
                continue
        shutil.rmtree(path, ignore_errors=True)
        removed += size
        why = f"pid {record.get('pid')} on {record.get('host')} is gone" if record else "an interrupted run's"
        say(f"removed {path.name} ({_size(size)}) beside {out.name}: {why}")
    return removed


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


# ---------------------------------------------------------------------------------------------
# Inputs that are damaged, outputs that cannot be written: errors the user (or the machine) causes
# ---------------------------------------------------------------------------------------------

def read_json(path: str | Path, what: str = "") -> Any:
    """A JSON file's content; a file that is not UTF-8 JSON is the user's to fix, named with the place."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as err:
        raise SchemaError(
            f"{path}{what and f' ({what})'} is not UTF-8 text (byte {err.start}); restore it or regenerate it"
        ) from None
    except json.JSONDecodeError as err:
        raise SchemaError(
            f"{path}{what and f' ({what})'} is not valid JSON ({err.msg} at line {err.lineno} column {err.colno}); "
            "restore it or regenerate it"
        ) from None


def safetensors_header(file: str | Path) -> dict[str, Any]:
    """A .safetensors file's JSON header (tensor name -> dtype, shape, data_offsets; ``__metadata__``), read
    from its first bytes only, and checked against the file's size (8-byte length, JSON, then the data).

    Raises:
        ModelError: a file cut short (an interrupted download or copy) or whose header is not JSON, naming it.
    """
    return safetensors_layout(file)[1]


def safetensors_layout(file: str | Path) -> tuple[int, dict[str, Any]]:
    """(data start, header) of a .safetensors file, as :func:`safetensors_header` reads and checks it: the
    header's ``data_offsets`` count from the data start (8 bytes of length + the JSON header)."""
    file = Path(file)
    size = file.stat().st_size

    def damaged(reason: str) -> ModelError:
        return ModelError(f"{file} is damaged ({reason}: truncated or corrupt); download or write the checkpoint again")

    with open(file, "rb") as handle:
        head = handle.read(8)
        if len(head) < 8:
            raise damaged(f"{size} bytes, shorter than a safetensors header")
        length = int.from_bytes(head, "little")
        if 8 + length > size:
            raise damaged(f"its header needs {8 + length} bytes but the file has {size}")
        try:
            header = json.loads(handle.read(length))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise damaged("its header is not JSON") from None
    if not isinstance(header, dict):
        raise damaged("its header is not a JSON object")
    ends = [entry["data_offsets"][1] for name, entry in header.items()
            if name != "__metadata__" and isinstance(entry, dict) and isinstance(entry.get("data_offsets"), list)
            and len(entry["data_offsets"]) == 2 and isinstance(entry["data_offsets"][1], int)]
    if ends and 8 + length + max(ends) > size:
        raise damaged(f"its tensors end at byte {8 + length + max(ends)} but the file has {size}")
    return 8 + length, header


DISK_ERRNOS = {errno.ENOSPC: "no space left on the device", errno.EDQUOT: "disk quota exceeded",
               errno.EROFS: "read-only file system", errno.EACCES: "permission denied", errno.EPERM: "not permitted"}


def _disk_error(err: BaseException, target: Path, kept: str | None = None) -> PrunekitError | None:
    """The user error for a write that failed because of the disk (full, read-only, no permission)."""
    code = getattr(err, "errno", None)
    if code is None and type(err).__name__ == "SafetensorError":  # safetensors reports the OS error in its text
        text = str(err)
        code = errno.ENOSPC if any(k in text for k in ("os error 28", "code: 28", "StorageFull")) else None
    if code not in DISK_ERRNOS:
        return None
    if code == errno.ENOSPC or code == errno.EDQUOT:
        hint = "free some space or write somewhere else"
    else:
        hint = "choose a location you can write to"
    return PrunekitError(f"cannot write {target}: {DISK_ERRNOS[code]}; {hint} ({kept or 'nothing was left behind'})")


@contextlib.contextmanager
def disk_errors(target: str | Path) -> Iterator[None]:
    """Turn a write that fails for a full, read-only or forbidden disk into a user error naming ``target``."""
    try:
        yield
    except Exception as err:
        converted = _disk_error(err, Path(target))
        if converted is None:
            raise
        raise converted from None


def format_size(n: float) -> str:
    """Bytes for people: ``512 B``, ``3.6 GiB``."""
    return _size(n)


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def check_output_location(path: str | Path | None, expected_bytes: int = 0, *, kind: str = "dir",
                          in_place: bool = False, option: str = "--out") -> Path | None:
    """Before any work: can ``path`` be written, and does its disk have ``expected_bytes`` free?

    ``kind`` is ``dir`` or ``file``. A file or an atomic directory is staged beside ``path`` (in its
    parent); an ``in_place`` directory (a sweep's runs dir, a report dir) is written inside itself once
    it exists. The check creates and removes one empty probe file where the writing will happen, so a
    read-only mount, missing permissions or a file in the way fail now rather than after hours of work."""
    if path is None:
        return None
    path = Path(path).expanduser()
    if kind == "file" and path.is_dir():
        raise ConfigError(f"{option} '{path}' is a directory; give the name of a new file inside it")
    if kind == "dir" and path.exists() and not path.is_dir():
        raise ConfigError(f"{option} '{path}' is a file; give a directory (a new one, or --overwrite an old one)")
    folder = path if in_place and path.is_dir() else path.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():
        raise ConfigError(f"cannot write {option} '{path}': '{folder}' is not a directory; choose another {option}")
    try:
        fd, probe = tempfile.mkstemp(prefix=".prunekit-probe-", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        reason = DISK_ERRNOS.get(err.errno, err.strerror or type(err).__name__)
        raise ConfigError(
            f"cannot write {option} '{path}': '{folder}' is not writable ({reason}); choose a location you "
            "can write to"
        ) from None
    if expected_bytes > 0:
        free = shutil.disk_usage(folder).free
        if free < expected_bytes:
            raise ConfigError(
                f"not enough free space for {option} '{path}': it needs about {_size(expected_bytes)}, but "
                f"'{folder}' has {_size(free)} free; free some space or choose another {option}"
            )
    return path
