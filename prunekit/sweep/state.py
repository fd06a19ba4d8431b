"""Stage status files: atomic JSON saying running / done / failed, with timings and who runs it.

A stage that says ``running`` is *stale* (its process is gone) when it ran on this host and
its pid no longer exists (or was reused); when it was written by an earlier run of this very
Slurm job (same job id and rank: a requeued job after a preemption or a node failure, as Slurm
runs one instance of a job at a time); or when its heartbeat is older than ``STALE_AFTER_S``
(another host, e.g. a Slurm node that was killed). Stale stages are redone.

Who runs a stage is decided by an exclusive POSIX record lock (``fcntl.lockf``, which NFS, Lustre
and GPFS carry to every node) on ``.STAGE.lock`` beside the status file, held for the whole stage:
two processes that reach the same stage at the same moment (two sweeps on one runs directory,
array tasks sharing a dense model) cannot both run it, and the lock dies with its process. Where
the filesystem has no locks, the status file alone decides, as before.

A status file that cannot be read (truncated, not JSON, another kind or major version) counts as "never
ran": its stage is redone, with a warning that names the file. So does a 'done' stage whose output
(:data:`STAGE_OUTPUTS`: an evaluation's ``results.json``, an analysis's ``result.json``, a checkpoint's record)
cannot be read: files are parsed and checked for their kind and version, not only found.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import threading
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator

from prunekit import locks
from prunekit.artifacts import (ANALYSIS_RESULT_FILE, CHECKPOINT_KIND, RECORD_FILE, RESULTS_FILE, RESULTS_KIND,
                                SWEEP_ANALYSIS_RESULT_KIND)
from prunekit.artifacts import STAGE_STATUS_KIND as STATUS_KIND
from prunekit.errors import SchemaError
from prunekit.io import pid_alive, read_versioned, versioned, write_json_atomic

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


def status_path(directory: Path, stage: str) -> Path:
    return Path(directory) / f"{stage}.status.json"


_WARNED: set[str] = set()


REDONE = "its stage counts as not done and is redone"


def _warn_corrupt(path: Path, err: Exception, consequence: str = REDONE) -> None:
    if str(path) in _WARNED:
        return
    _WARNED.add(str(path))
    from prunekit.progress import stderr_console

    reason = err.msg if isinstance(err, json.JSONDecodeError) else str(err)
    stderr_console.print(f"warning: {path} cannot be read ({reason}); {consequence}",
                         markup=False, highlight=False, soft_wrap=True)


def read_artifact(path: str | Path, kind: str, consequence: str = REDONE) -> dict[str, Any] | None:
    """A sweep's JSON artefact (``run.json``, ``results.json``, a config snapshot…) parsed and checked for its
    kind and major version; None when it is missing, or damaged: then one warning names it and says
    ``consequence`` (what happens instead)."""
    path = Path(path)
    if not path.exists():
        return None
    try:
        data = read_versioned(path, kind)
        if not isinstance(data, dict):
            raise ValueError("not a JSON object")
    except (OSError, UnicodeDecodeError, ValueError, SchemaError, AttributeError, TypeError) as err:
        _warn_corrupt(path, err, consequence)
        return None
    return data


# What a 'done' stage left in its directory, and its kind; True: the stage is not done without it (False: it
# may have been removed on purpose, e.g. a checkpoint the sweep does not keep, so only a damaged one counts).
STAGE_OUTPUTS: dict[str, tuple[str, str, bool]] = {
    "eval": (RESULTS_FILE, RESULTS_KIND, True),
    "dense": (RESULTS_FILE, RESULTS_KIND, True),
    "analysis": (ANALYSIS_RESULT_FILE, SWEEP_ANALYSIS_RESULT_KIND, True),
    "prune": (f"checkpoint/{RECORD_FILE}", CHECKPOINT_KIND, False),
}


def outputs_ok(directory: Path, stage: str) -> bool:
    """Whether a stage's output (:data:`STAGE_OUTPUTS`) is there, when required, and readable (a warning names
    a damaged one)."""
    if stage not in STAGE_OUTPUTS:
        return True
    name, kind, required = STAGE_OUTPUTS[stage]
    path = Path(directory) / name
    if not path.exists():
        return not required
    return read_artifact(path, kind) is not None


def read_status(directory: Path, stage: str) -> dict[str, Any] | None:
    """The stage's status, or None when it never ran -- or when its file cannot be read (a warning says so)."""
    path = status_path(directory, stage)
    if not path.exists():
        return None
    try:
        status = read_versioned(path, STATUS_KIND)
        if not isinstance(status, dict) or not isinstance(status.get("state"), str):
            raise ValueError("no stage state in it")
    except (OSError, UnicodeDecodeError, ValueError, SchemaError, AttributeError, TypeError) as err:  # JSONDecodeError is a ValueError
        _warn_corrupt(path, err)
        return None
    return status


def job_identity() -> dict[str, Any]:
    """Which Slurm/submitit job (and which of its ranks) this process is: stored in every status."""
    if os.environ.get("SUBMITIT_EXECUTOR"):
        with contextlib.suppress(Exception):  # noqa: BLE001 - not in a job after all
            import submitit

            env = submitit.JobEnvironment()
            return {"job_id": str(env.job_id), "job_rank": int(env.global_rank)}
    job_id = None
    if os.environ.get("SLURM_JOB_ID"):  # an sbatch script that runs prunekit itself
        array = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
        job_id = f"{array[0]}_{array[1]}" if all(array) else os.environ["SLURM_JOB_ID"]
    rank = os.environ.get("SLURM_PROCID", "0")
    return {"job_id": job_id, "job_rank": int(rank) if rank.isdigit() else 0}


def _same_job_earlier_run(status: dict[str, Any]) -> bool:
    """Written by an earlier run of the job this process belongs to (same job id and rank, another
    process): that run is over, since a job (array task) runs one instance at a time."""
    if not os.environ.get("SUBMITIT_EXECUTOR"):  # a plain sbatch script may start two sweeps in one job
        return False
    me = job_identity()
    if me["job_id"] is None or status.get("job_id") != me["job_id"] or int(status.get("job_rank") or 0) != me["job_rank"]:
        return False
    if status.get("host") == socket.gethostname():
        pid = int(status.get("pid", -1))
        return pid != os.getpid() and not (pid > 0 and pid_alive(pid) and status.get("pid_start") in (None, _proc_start(pid)))
    return True


def is_stale(status: dict[str, Any]) -> bool:
    """True when a 'running' status belongs to a process that no longer exists."""
    if status.get("state") != RUNNING:
        return False
    if _same_job_earlier_run(status):
        return True
    if status.get("host") == socket.gethostname():
        pid = int(status.get("pid", -1))
        if pid <= 0 or not pid_alive(pid):
            return True
        start = _proc_start(pid)
        if start is not None and status.get("pid_start") not in (None, start):
            return True
        return False
    return time.time() - float(status.get("heartbeat", 0)) > STALE_AFTER_S


def stage_state(directory: Path, stage: str, fingerprint: str | None = None) -> str:
    """'done', 'todo' (never ran, its settings changed, or its output is missing or damaged), 'failed', 'stale'
    or 'busy' (running elsewhere)."""
    status = read_status(directory, stage)
    if status is None:
        return "todo"
    state = status.get("state")
    if state == DONE:
        if fingerprint is not None and status.get("fingerprint") != fingerprint:
            return "todo"
        return "done" if outputs_ok(directory, stage) else "todo"
    if state == RUNNING:
        return "stale" if is_stale(status) else "busy"
    return "failed"


# ---------------------------------------------------------------------------------------------
# Stage locks: one runner per stage, across processes and hosts (prunekit.locks)
# ---------------------------------------------------------------------------------------------


def lock_path(directory: Path, stage: str) -> Path:
    return Path(directory) / f".{stage}.lock"


@contextlib.contextmanager
def stage_lock(directory: Path, name: str) -> Iterator[bool]:
    """Hold the stage's exclusive lock for the block; yields False when another live process holds it
    (or this process already runs the stage): the block should then not run it.
    The lock only makes the claim exclusive; whether a 'running' status is stale is still decided by the
    status (pid, job id, heartbeat), so a filesystem whose locks are not shared (NFS ``nolock``) is no worse."""
    with contextlib.ExitStack() as stack:
        try:  # no marker where the filesystem has no locks: one left by a killed process would block the stage
            taken = stack.enter_context(locks.exclusive(lock_path(directory, name), wait=False, marker=False))
        except locks.LockBusy:
            taken = False
        yield taken


def abandon(directory: Path, name: str, job_id: str, error: str) -> bool:
    """A job we know is dead (timeout, OOM kill, node failure) left its stage 'running': record it as failed."""
    status = read_status(directory, name)
    if status is None or status.get("state") != RUNNING or status.get("job_id") != job_id:
        return False
    if locks.held_elsewhere(lock_path(directory, name)):
        return False  # somebody runs it after all (the job was requeued and runs again)
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
    with stage_lock(directory, name) as mine:
        previous = read_status(directory, name)
        busy = previous is not None and previous.get("state") == RUNNING and not is_stale(previous)
        if not mine and not (previous is not None and _same_job_earlier_run(previous)):
            busy = True  # a live process holds the lock (a lock left by an earlier run of this job is not honoured)
        if busy:
            who = f"pid {previous.get('pid')} on {previous.get('host')}" if previous else "another process"
            raise StageBusy(f"{directory.name}/{name} is being run by {who}")
        with _run_stage(directory, name, fingerprint, extra, previous) as details:
            yield details


@contextlib.contextmanager
def _run_stage(directory: Path, name: str, fingerprint: str | None, extra: dict[str, Any] | None,
               previous: dict[str, Any] | None) -> Iterator[dict[str, Any]]:
    base = {
        "stage": name,
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "pid_start": _proc_start(os.getpid()),
        "fingerprint": fingerprint,
        "executions": int((previous or {}).get("executions", 0)) + 1,
        "started": now_iso(),
        "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
        **job_identity(),
        "device": os.environ.get("PRUNEKIT_DEVICE"),
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
        if isinstance(err, KeyboardInterrupt):
            message = "interrupted"
        elif isinstance(err, SystemExit):  # submitit's requeue after a preemption or a timeout signal
            message = f"interrupted (exit {err.code}): the job was preempted or ran out of time; a requeued job redoes it"
        else:
            message = f"{type(err).__name__}: {err}"
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
            if path.is_dir() and (path / ".prunekit-staging.json").exists():
                continue  # a streamed prune's resumable staging (prunekit.staging): its rerun resumes or removes it
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
            removed.append(path)
    return removed
