"""Stage status files: atomic JSON saying running / done / failed, with timings and who runs it.

A stage that says ``running`` is *stale* (its process is gone) when it ran on this host and
its pid no longer exists (or was reused), or when its heartbeat is older than
``STALE_AFTER_S`` (another host, e.g. a Slurm node that was killed). Stale stages are redone.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import threading
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator

from prunekit.io import read_versioned, versioned, write_json_atomic

STATUS_KIND = "prunekit-stage-status"
HEARTBEAT_S = 30.0
STALE_AFTER_S = 300.0
RUNNING, DONE, FAILED = "running", "done", "failed"


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _proc_start(pid: int) -> str | None:
    """Start time of a process (clock ticks since boot) to tell a live pid from a reused one."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def status_path(directory: Path, stage: str) -> Path:
    return Path(directory) / f"{stage}.status.json"


def read_status(directory: Path, stage: str) -> dict[str, Any] | None:
    path = status_path(directory, stage)
    if not path.exists():
        return None
    return read_versioned(path, STATUS_KIND)


def is_stale(status: dict[str, Any]) -> bool:
    """True when a 'running' status belongs to a process that no longer exists."""
    if status.get("state") != RUNNING:
        return False
    if status.get("host") == socket.gethostname():
        pid = int(status.get("pid", -1))
        if pid <= 0 or not _pid_alive(pid):
            return True
        start = _proc_start(pid)
        if start is not None and status.get("pid_start") not in (None, start):
            return True
        return False
    return time.time() - float(status.get("heartbeat", 0)) > STALE_AFTER_S


def stage_state(directory: Path, stage: str, fingerprint: str | None = None) -> str:
    """'done', 'todo' (never ran, or its settings changed), 'failed', 'stale' or 'busy' (running elsewhere)."""
    status = read_status(directory, stage)
    if status is None:
        return "todo"
    state = status.get("state")
    if state == DONE:
        if fingerprint is not None and status.get("fingerprint") != fingerprint:
            return "todo"
        return "done"
    if state == RUNNING:
        return "stale" if is_stale(status) else "busy"
    return "failed"


def submitit_job_id() -> str | None:
    """The submitit job id (``123_4`` for an array task) when running inside a submitit job."""
    if not os.environ.get("SUBMITIT_EXECUTOR"):
        return None
    try:
        import submitit

        return str(submitit.JobEnvironment().job_id)
    except Exception:  # noqa: BLE001 - not in a job after all
        return None


def abandon(directory: Path, name: str, job_id: str, error: str) -> bool:
    """A job we know is dead (timeout, OOM kill, node failure) left its stage 'running': record it as failed."""
    status = read_status(directory, name)
    if status is None or status.get("state") != RUNNING or status.get("job_id") != job_id:
        return False
    status.update(state=FAILED, error=error, finished=now_iso())
    write_json_atomic(status_path(directory, name), status)
    return True


class StageBusy(Exception):
    """Another live process is running this stage."""


@contextlib.contextmanager
def stage(directory: Path, name: str, fingerprint: str | None = None, extra: dict[str, Any] | None = None) -> Iterator[dict[str, Any]]:
    """Record a stage: 'running' (with a heartbeat thread) on entry, 'done' or 'failed' on exit.

    The yielded dict may be filled with details to store in the final status.
    A failure records the error and re-raises.
    """
    directory = Path(directory)
    previous = read_status(directory, name)
    if previous is not None and previous.get("state") == RUNNING and not is_stale(previous):
        raise StageBusy(f"{directory.name}/{name} is being run by pid {previous.get('pid')} on {previous.get('host')}")
    base = {
        "stage": name,
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "pid_start": _proc_start(os.getpid()),
        "fingerprint": fingerprint,
        "executions": int((previous or {}).get("executions", 0)) + 1,
        "started": now_iso(),
        "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
        "job_id": submitit_job_id(),
        "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
        **(extra or {}),
    }
    t0 = time.perf_counter()
    lock = threading.Lock()
    stop = threading.Event()

    def write(state: str, **more: Any) -> None:
        payload = versioned(STATUS_KIND, {**base, "state": state, "heartbeat": time.time(), **more})
        with lock:
            write_json_atomic(status_path(directory, name), payload)

    def beat() -> None:
        while not stop.wait(HEARTBEAT_S):
            with contextlib.suppress(OSError):
                if not stop.is_set():
                    write(RUNNING, error=None)

    write(RUNNING, error=None)
    details: dict[str, Any] = {}
    thread = threading.Thread(target=beat, name=f"heartbeat-{name}", daemon=True)
    thread.start()
    try:
        yield details
    except BaseException as err:
        stop.set()
        thread.join()
        message = f"{type(err).__name__}: {err}" if not isinstance(err, KeyboardInterrupt) else "interrupted"
        write(FAILED, error=message, traceback=traceback.format_exc(limit=20), finished=now_iso(),
              seconds=round(time.perf_counter() - t0, 3), details=details)
        raise
    stop.set()
    thread.join()
    write(DONE, error=None, finished=now_iso(), seconds=round(time.perf_counter() - t0, 3), details=details)


def clear_status(directory: Path, *stages: str) -> None:
    for name in stages:
        with contextlib.suppress(FileNotFoundError):
            status_path(directory, name).unlink()


def clean_partials(root: Path) -> list[Path]:
    """Remove leftovers of interrupted atomic writes under ``root`` (two levels deep):
    ``.*.partial`` staging dirs, ``.*.tmp`` files and ``.*.old-PID`` trash dirs."""
    removed: list[Path] = []
    root = Path(root)
    if not root.exists():
        return removed
    candidates = list(root.glob(".*")) + list(root.glob("*/.*")) + list(root.glob("*/*/.*"))
    for path in candidates:
        name = path.name
        if name.endswith(".partial") or name.endswith(".tmp") or ".old-" in name:
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
            removed.append(path)
    return removed
