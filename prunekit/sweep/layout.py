"""Where a sweep's runs live and what state they are in: the runs directory's layout, each task's
directory and description, the fingerprints that say when a stage must run again, each stage's state
(read from the status files of :mod:`prunekit.sweep.state`), the config snapshot every worker re-reads
and the sweep log. :mod:`prunekit.sweep.plan` reads a sweep through this module alone; the work of a
stage is :mod:`prunekit.sweep.stages`'s, which planning never imports.

Runs-dir layout::

    RUNS_DIR/
      sweeps/<config digest>.json      the validated config each worker re-reads
      sweep.log                        one line per stage start/end (append-only)
      dense/<model key>/               dense.json, dense.status.json, results.json
      runs/<run hash>/                 run.json, prune.status.json, checkpoint/, eval.status.json,
                                       results.json, push.status.json, push.json
      analysis/<pair key>/             analysis.json, analysis.status.json, result.json
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import socket
from pathlib import Path
from typing import Any

from prunekit.artifacts import (ANALYSIS_FILE, DENSE_FILE, RUN_FILE, SWEEP_ANALYSIS_KIND, SWEEP_CONFIG_KIND, SWEEP_DENSE_KIND,
                                SWEEP_RUN_KIND, record_path, results_path)
from prunekit.io import atomic_directory, read_versioned, versioned, write_json_atomic
from prunekit.sweep.config import SweepConfig, load_config
from prunekit.sweep.grid import AnalysisTask, DenseTask, RunTask
from prunekit.sweep.state import now_iso, read_artifact, read_status, stage_state

CONFIG_KIND, RUN_KIND, DENSE_KIND, ANALYSIS_KIND = SWEEP_CONFIG_KIND, SWEEP_RUN_KIND, SWEEP_DENSE_KIND, SWEEP_ANALYSIS_KIND


def digest(data: Any) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]


# ---------------------------------------------------------------------------------------------
# Paths and fingerprints
# ---------------------------------------------------------------------------------------------


def dense_dir(runs_dir: Path, task: DenseTask) -> Path:
    return Path(runs_dir) / "dense" / task.key


def run_dir(runs_dir: Path, task: RunTask) -> Path:
    return Path(runs_dir) / "runs" / task.run_id


def analysis_dir(runs_dir: Path, task: AnalysisTask) -> Path:
    return Path(runs_dir) / "analysis" / task.key


def task_dir(runs_dir: Path, task) -> Path:
    if isinstance(task, DenseTask):
        return dense_dir(runs_dir, task)
    if isinstance(task, RunTask):
        return run_dir(runs_dir, task)
    return analysis_dir(runs_dir, task)


def dense_fingerprint(config: SweepConfig) -> str:
    return digest({"eval": config.eval_settings})


def eval_fingerprint(config: SweepConfig, directory: Path) -> str:
    """Eval settings plus the prune attempt it evaluates: a re-pruned checkpoint is re-evaluated."""
    prune_status = read_status(directory, "prune") or {}
    return digest({"eval": config.eval_settings, "checkpoint": prune_status.get("finished")})


def push_fingerprint(config: SweepConfig, directory: Path) -> str:
    eval_status = read_status(directory, "eval") or {}
    return digest({"push": config.push, "results": eval_status.get("finished")})


def analysis_fingerprint(config: SweepConfig, runs_dir: Path, task: AnalysisTask) -> str:
    """The comparison's own fingerprint (what changes its numbers: analyses, languages, text, sizes, ...) plus
    the prune attempts it compares: a changed ``analysis:`` section or a re-pruned checkpoint runs it again."""
    finished = [(read_status(Path(runs_dir) / "runs" / rid, "prune") or {}).get("finished") for rid in task.runs]
    return digest({"compare": config.compare_spec(task.model.dtype).fingerprint(), "runs": finished})


def fingerprints(config: SweepConfig, runs_dir: Path, task) -> dict[str, str | None]:
    """Each stage of a task (:func:`stage_names`) with what it depends on besides its inputs (None: nothing, the
    prune, whose run hash names its directory): a stage done with another fingerprint is run again."""
    directory = task_dir(runs_dir, task)
    compute = {
        "dense": lambda: dense_fingerprint(config),
        "prune": lambda: None,
        "eval": lambda: eval_fingerprint(config, directory),
        "push": lambda: push_fingerprint(config, directory),
        "analysis": lambda: analysis_fingerprint(config, runs_dir, task),
    }
    return {name: compute[name]() for name in stage_names(config, task)}


def stage_names(config: SweepConfig, task) -> list[str]:
    if isinstance(task, DenseTask):
        return ["dense"]
    if isinstance(task, AnalysisTask):
        return ["analysis"]
    return ["prune", "eval"] + (["push"] if config.push else [])


def task_states(config: SweepConfig, runs_dir: Path, task) -> dict[str, str]:
    """Current state of each stage of a task: done / todo / failed / stale / busy."""
    directory = task_dir(runs_dir, task)
    states = {name: stage_state(directory, name, fingerprint) for name, fingerprint in fingerprints(config, runs_dir, task).items()}
    if not isinstance(task, RunTask):
        return states
    checkpoint_ok = record_path(directory / "checkpoint").exists()
    eval_state = states["eval"]
    if states["prune"] == "done" and not checkpoint_ok and not (eval_state == "done" and not config.keep_checkpoints):
        states["prune"] = "todo"  # the checkpoint was removed by hand
    states["eval"] = eval_state if states["prune"] == "done" else ("todo" if eval_state != "busy" else "busy")
    if eval_state == "done" and not results_path(directory).exists():
        states["eval"] = "todo"
    if "push" in states:
        push_state = states["push"]
        states["push"] = push_state if states["eval"] == "done" else ("todo" if push_state != "busy" else "busy")
    return states


def is_complete(states: dict[str, str]) -> bool:
    return all(state == "done" for state in states.values())


# ---------------------------------------------------------------------------------------------
# The snapshot every worker re-reads, the log, the task dirs
# ---------------------------------------------------------------------------------------------


def write_snapshot(runs_dir: Path, config: SweepConfig) -> str:
    path = Path(runs_dir) / "sweeps" / f"{config.digest}.json"
    if read_artifact(path, CONFIG_KIND, "it is written again from the config") is None:  # missing or damaged
        write_json_atomic(path, versioned(CONFIG_KIND, {"name": config.name, "config": config.to_json(), "created": now_iso()}))
    return config.digest


def read_snapshot(runs_dir: Path, config_digest: str) -> SweepConfig:
    data = read_versioned(Path(runs_dir) / "sweeps" / f"{config_digest}.json", CONFIG_KIND)
    return load_config(data["config"])


def log(runs_dir: Path, message: str) -> None:
    line = f"{now_iso()} {socket.gethostname()}:{os.getpid()} {message}\n"
    with contextlib.suppress(OSError), open(Path(runs_dir) / "sweep.log", "a", encoding="utf-8") as handle:
        handle.write(line)


def ensure_task_dir(directory: Path, kind: str, payload: dict[str, Any]) -> Path:
    """Create a task dir atomically with its description file (run.json / dense.json / analysis.json)."""
    filename = {RUN_KIND: RUN_FILE, DENSE_KIND: DENSE_FILE, ANALYSIS_KIND: ANALYSIS_FILE}[kind]
    if read_artifact(directory / filename, kind, "it is written again from the config") is not None:
        return directory
    if directory.exists():  # a dir without its (readable) description: left by hand or an old layout; fill it in
        write_json_atomic(directory / filename, versioned(kind, payload))
        return directory
    try:
        with atomic_directory(directory) as staging:
            write_json_atomic(staging / filename, versioned(kind, payload))
    except FileExistsError:  # another process created it a moment before us
        pass
    except FileNotFoundError:  # our staging dir was cleaned away by a sweep starting on the same runs dir
        if not (directory / filename).exists():
            directory.mkdir(parents=True, exist_ok=True)
            write_json_atomic(directory / filename, versioned(kind, payload))
    return directory
