"""Exclusive locks that hold across processes and hosts: POSIX record locks (``fcntl.lockf``), which NFS
(lockd / NFSv4), Lustre and GPFS carry to every node, and which die with their process -- a killed
holder never leaves a lock behind. Where the filesystem has no locks (ENOLCK, ENOSYS, EOPNOTSUPP),
an exclusively created marker file (``O_EXCL``) stands in, and is removed when the block ends.

``fcntl`` locks belong to a process, and closing any descriptor of the file drops them: a process
opens each lock file once (``_HELD``), so asking again for a lock it holds answers at once.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import socket
import time
from pathlib import Path
from typing import Iterator

_HELD: dict[str, int] = {}
_NO_LOCKS = (errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL)
_MARKER_STALE_S = 6 * 3600.0  # a marker this old (where there are no locks) was left by a dead process
POLL_S = 0.5


class LockBusy(Exception):
    """Another live process holds the lock (non-blocking request)."""


def _try(path: Path) -> int | None | bool:
    """An fd holding the lock; False when another process holds it; None where the filesystem has no locks."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError:
        return None
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as err:
        os.close(fd)
        if err.errno in (errno.EAGAIN, errno.EACCES):
            return False
        if err.errno in _NO_LOCKS:
            return None
        raise
    return fd


def _marker(path: Path) -> Path:
    return path.with_name(path.name + ".held")


def _try_marker(path: Path) -> bool:
    marker = _marker(path)
    try:
        fd = os.open(marker, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    except FileExistsError:
        with contextlib.suppress(FileNotFoundError):
            if time.time() - marker.stat().st_mtime > _MARKER_STALE_S:
                marker.unlink()
        return False
    with os.fdopen(fd, "w") as handle:
        handle.write(f"{socket.gethostname()} {os.getpid()}\n")
    return True


@contextlib.contextmanager
def exclusive(path: str | Path, wait: bool = True, timeout: float | None = None, marker: bool = True) -> Iterator[bool]:
    """Hold the exclusive lock ``path`` for the block. ``wait=False``: raise ``LockBusy`` at once when a
    live process holds it; else wait (up to ``timeout`` seconds, then ``LockBusy``). Yields True when
    this call took the lock, False when this process already held it. Where the filesystem has no
    locks: an ``O_EXCL`` marker file, or (``marker=False``) no exclusion at all, yielding True."""
    path = Path(path)
    key = str(path)
    if key in _HELD:
        yield False
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        fd = _try(path)
        if fd is None and (not marker or _try_marker(path)):
            fd = -1 if marker else -2  # no locks on this filesystem: the marker holds it (or nothing does)
        if fd is not None and fd is not False:
            break
        if not wait or (deadline is not None and time.monotonic() > deadline):
            raise LockBusy(f"{path} is held by another process")
        time.sleep(POLL_S)
    _HELD[key] = fd
    try:
        yield True
    finally:
        del _HELD[key]
        if fd == -1:
            with contextlib.suppress(FileNotFoundError):
                _marker(path).unlink()
        elif fd >= 0:
            os.close(fd)


def held_elsewhere(path: str | Path) -> bool:
    """True when another live process holds the lock ``path`` now (False where there are no locks)."""
    path = Path(path)
    if str(path) in _HELD or not path.exists():
        return False
    fd = _try(path)
    if fd is False:
        return True
    if fd is not None:
        os.close(fd)
    return False


def lock_state(path: str | Path) -> str:
    """``held`` (by another live process), ``free`` (a lock file nobody holds: its last holder is gone),
    ``absent`` (no lock file) or ``unsupported`` (the filesystem has no locks: ask the holder's pid)."""
    path = Path(path)
    if str(path) in _HELD:
        return "free"  # this process's own: not another's
    if not path.exists():
        return "absent"
    fd = _try(path)
    if fd is False:
        return "held"
    if fd is None:
        return "unsupported"
    os.close(fd)
    return "free"
