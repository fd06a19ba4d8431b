"""``run_sweep``: validate, expand, plan, run the phases (dense -> runs -> analysis) through a backend,
summarize. The plan is :mod:`prunekit.sweep.plan`'s (read through :mod:`prunekit.sweep.layout`; its table
:mod:`prunekit.sweep.table`'s), the work of one
task :mod:`prunekit.sweep.stages`'s, where it runs :mod:`prunekit.sweep.backends`'s."""

from __future__ import annotations

import importlib.util
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prunekit.artifacts import SWEEP_FILE, SWEEP_KIND, SWEEP_SUMMARY_FILE, SWEEP_SUMMARY_KIND
from prunekit.errors import ConfigError
from prunekit.io import versioned, write_json_atomic
from prunekit.progress import stderr_console
from prunekit.sweep.backends import choose_executor, describe
from prunekit.sweep.config import SweepConfig, load_config
from prunekit.sweep.grid import AnalysisTask, DenseTask, RunTask, expand
from prunekit.sweep.layout import write_snapshot
from prunekit.sweep.plan import Plan, read_plan
from prunekit.sweep.stages import TaskOutcome, publish_collection
from prunekit.sweep.state import now_iso
from prunekit.sweep.table import plan_console, plan_table


@dataclass
class FailedTask:
    task_id: str
    label: str
    stage: str | None
    error: str | None


@dataclass
class SweepSummary:
    runs_dir: Path
    name: str
    tasks: int
    runs: int
    already_done: int  # tasks complete before this sweep started
    completed: int  # tasks completed by this sweep
    completed_elsewhere: int = 0  # tasks another process (a second sweep on this runs dir) completed meanwhile
    failed: list[FailedTask] = field(default_factory=list)
    busy: list[str] = field(default_factory=list)  # tasks another live process is running
    notes: list[str] = field(default_factory=list)  # advice, e.g. a dense cache that was not shared
    pending: int = 0  # dry run: tasks that would run
    seconds: float = 0.0
    dry_run: bool = False
    outcomes: list[TaskOutcome] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failed and not self.busy

    @property
    def exit_code(self) -> int:
        return 0 if self.ok else 1

    def lines(self) -> list[str]:
        if self.dry_run:
            return [f"dry run: {self.pending} of {self.tasks} tasks would run ({self.already_done} already done); nothing was written"]
        out = [f"sweep '{self.name}': {self.tasks} tasks ({self.runs} runs) · {self.already_done} already done · "
               f"{self.completed} completed now · "
               + (f"{self.completed_elsewhere} completed by another process · " if self.completed_elsewhere else "")
               + f"{len(self.failed)} failed · {len(self.busy)} running elsewhere · "
               f"{self.seconds:.1f}s · {self.runs_dir}"]
        for item in self.failed:
            out.append(f"  FAILED {item.label} [{item.stage or '?'}]: {item.error}")
        for task_id in self.busy:
            out.append(f"  still running elsewhere: {task_id}")
        if self.failed:
            out.append("  rerun the same command to retry the failed stages (finished ones are skipped)")
        out += [f"  note: {note}" for note in self.notes]
        return out

    def to_json(self) -> dict[str, Any]:
        return {
            "runs_dir": str(self.runs_dir), "name": self.name, "tasks": self.tasks, "runs": self.runs,
            "already_done": self.already_done, "completed": self.completed,
            "completed_elsewhere": self.completed_elsewhere, "busy": self.busy,
            "failed": [f.__dict__ for f in self.failed], "notes": self.notes, "seconds": self.seconds, "ok": self.ok,
        }


def run_sweep(
    config: str | Path | dict[str, Any] | SweepConfig,
    runs_dir: str | Path,
    executor: str = "local",
    dry_run: bool = False,
    max_parallel: int | None = None,
    progress: bool = True,
) -> SweepSummary:
    """Run a sweep: expand ``config`` into its tasks under ``runs_dir`` and execute what is not done yet; what
    ``prunekit sweep`` does.

    Safe to interrupt at any moment (even SIGKILL) and to rerun: finished stages are skipped, stages whose
    process died are redone, partial temp dirs are removed. A failing task records its error and the sweep goes
    on; check ``summary.ok`` / ``summary.exit_code`` at the end. Two sweeps on one ``runs_dir`` share the work.

    Args:
        config (`str`, `Path`, `dict` or `SweepConfig`):
            The sweep: a YAML file's path, its parsed content, or a config already loaded with
            :func:`~prunekit.sweep.load_config` (see ``configs/tiny-example.yaml``).
        runs_dir (`str` or `Path`):
            Where the runs live (created when missing): ``dense/``, ``runs/``, ``analysis/``, ``sweeps/``,
            ``sweep.log``, ``sweep.json`` and ``sweep-summary.json`` (layout: :mod:`prunekit.sweep.layout`).
        executor (`str`, *optional*, defaults to `"local"`):
            Where the tasks run: ``"local"`` (this machine) or ``"slurm"`` (submitit job arrays; ``slurm.cluster:
            local`` runs the same jobs with submitit's LocalExecutor; needs ``pip install 'prunekit[slurm]'``).
        dry_run (`bool`, *optional*, defaults to `False`):
            Plan only: print the plan, write nothing, run nothing (``summary.pending`` counts what would run).
        max_parallel (`int`, *optional*):
            Local: 1 runs the tasks one after another in this process, N in N worker processes, each on its own
            GPU (at most one per visible GPU), None or 0 one worker per visible GPU (or one on the CPU). Slurm: the
            jobs that may run at once (None or 0: no cap).
        progress (`bool`, *optional*, defaults to `True`):
            Print the plan table, each task as it starts, and progress bars.

    Returns:
        [`SweepSummary`]: the tasks and runs, how many were already done, completed now or by another process,
        the failed ones (with their stage and error), those still running elsewhere, notes and the seconds taken;
        also written to ``runs_dir/sweep-summary.json`` (not on a dry run).

    Raises:
        [`~prunekit.errors.ConfigError`]: a mistake in the config (naming its YAML path), an unknown executor, a
            negative ``max_parallel``, ``--executor slurm`` without submitit, or a ``runs_dir`` that is a file;
            all before any work. A task's own failure is not raised: it is in the summary.

    Example:

    ```python
    >>> from prunekit.sweep import run_sweep
    >>> summary = run_sweep("configs/tiny-example.yaml", "runs/tiny", max_parallel=1)
    >>> print("\\n".join(summary.lines()))
    >>> raise SystemExit(summary.exit_code)
    ```
    """
    started = time.perf_counter()
    cfg = load_config(config)  # every config mistake fails here, before any work
    # how many workers, each on which GPU (prunekit.placement.worker_plan); a dry run plans none
    run, max_parallel = choose_executor(executor, max_parallel, cfg, plan_workers=not dry_run)
    runs_dir = Path(runs_dir).expanduser().resolve()
    if executor == "slurm" and importlib.util.find_spec("submitit") is None:
        raise ConfigError("--executor slurm needs submitit: pip install 'prunekit[slurm]'")
    if runs_dir.exists() and not runs_dir.is_dir():
        raise ConfigError(f"--runs-dir '{runs_dir}' exists and is not a directory")
    console = plan_console() if progress else None
    if not dry_run and runs_dir.exists():
        for sub in ("runs", "dense", "analysis", "sweeps"):
            clean_partials_top(runs_dir / sub)
    grid = expand(cfg)  # what the sweep does; the plan is the state of each of its tasks, read again as they move
    plan = read_plan(cfg, runs_dir, grid)
    if console is not None:
        console.print(plan_table(plan))
    counts = plan.counts
    summary = SweepSummary(runs_dir, cfg.name, counts["tasks"], counts["runs"], counts["complete"], 0, dry_run=dry_run)
    if dry_run:
        summary.pending = sum(not row.complete for row in plan.rows)
        summary.busy = [row.task.task_id for row in plan.rows if "busy" in row.states.values()]
        summary.failed = []
        summary.seconds = round(time.perf_counter() - started, 3)
        return summary

    runs_dir.mkdir(parents=True, exist_ok=True)
    digest = write_snapshot(runs_dir, cfg)
    write_json_atomic(runs_dir / SWEEP_FILE, versioned(SWEEP_KIND, {
        "name": cfg.name, "config_digest": digest, "executor": executor, "max_parallel": max_parallel,
        "started": now_iso(), "runs": [t.run_id for t in plan.grid.runs], "dense": [t.key for t in plan.grid.dense],
        "calibration_sets": cfg.calib_sets, "eval_languages": cfg.eval_languages,
    }))
    outcomes: list[TaskOutcome] = []
    for kind in (DenseTask, RunTask, AnalysisTask):
        done, plan = run_phase(plan, kind, run, progress, digest, max_parallel)
        outcomes += done

    tally(summary, plan, outcomes)  # the plan as the last phase last read it: nothing pending or running anywhere
    summary.notes = dense_cache_notes(runs_dir, [o.task_id for o in outcomes if "eval" in o.ran])
    summary.notes += publish_collection(cfg, runs_dir, plan.grid.runs) if cfg.push else []
    summary.seconds = round(time.perf_counter() - started, 3)
    write_json_atomic(runs_dir / SWEEP_SUMMARY_FILE, versioned(SWEEP_SUMMARY_KIND, summary.to_json() | {"finished": now_iso()}))
    return summary


def tally(summary: SweepSummary, final, outcomes: list[TaskOutcome]) -> None:
    """Fill ``summary`` in from the plan after the phases (``final``) and what this process did (``outcomes``):
    what it completed, what others completed meanwhile, what is still running elsewhere, and what failed."""
    by_id = {o.task_id: o for o in outcomes}
    labels = {row.task.task_id: describe(row.task) for row in final.rows}
    summary.outcomes = outcomes
    # completed now: this process ran a stage of it (a task found done, run meanwhile elsewhere, is not counted)
    summary.completed = sum(1 for o in outcomes if o.state == "done" and (o.ran or not o.skipped) and final_complete(final, o.task_id))
    summary.completed_elsewhere = max(0, final.counts["complete"] - summary.already_done - summary.completed)
    summary.busy = [row.task.task_id for row in final.rows if "busy" in row.states.values()]
    for row in final.rows:
        if row.complete or row.task.task_id in summary.busy:
            continue
        outcome = by_id.get(row.task.task_id)
        summary.failed.append(FailedTask(row.task.task_id, labels[row.task.task_id],
                                         outcome.stage if outcome else None,
                                         outcome.error if outcome else "not run (an earlier stage or dependency failed)"))


WAIT_POLL_S = 5.0
MAX_BUSY_RETRIES = 720  # a task that keeps answering 'busy' although no live runner shows: left after ~1 h


def run_phase(plan: Plan, kind: type, run, progress: bool, digest: str,
              max_parallel: int) -> tuple[list[TaskOutcome], Plan]:
    """Run the phase's pending tasks, then wait for those another process runs (a second sweep on this
    runs dir): a task whose runner dies meanwhile becomes pending again and runs here. Each task is run
    at most once by this sweep (a failure is not retried until the next sweep), and the phase ends when
    none of its tasks is running anywhere, so the next phase finds its dependencies done. Returns what ran here
    and the plan as last read, after the phase's last change."""
    outcomes: dict[str, TaskOutcome] = {}
    attempted: set[str] = set()
    busy_retries: dict[str, int] = {}
    announced = False
    while True:
        plan = plan.refreshed()
        pending = [t for t in plan.pending(kind) if t.task_id not in attempted]
        claimed_elsewhere = []
        if pending:
            for outcome in run(plan.config, plan.runs_dir, pending, progress, config_digest=digest,
                               max_parallel=max_parallel):
                retries = busy_retries[outcome.task_id] = busy_retries.get(outcome.task_id, 0) + (outcome.state == "busy")
                if outcome.state == "busy" and retries < MAX_BUSY_RETRIES:
                    claimed_elsewhere.append(outcome.task_id)  # another process claimed it a moment before us
                    continue
                attempted.add(outcome.task_id)
                outcomes[outcome.task_id] = outcome
            if not claimed_elsewhere:
                continue  # look again at once: what ran meanwhile elsewhere may have changed the plan
        busy = [row.task.task_id for row in plan.rows if isinstance(row.task, kind) and "busy" in row.states.values()]
        waiting = busy + claimed_elsewhere
        if not waiting:
            return list(outcomes.values()), plan
        if progress and not announced:
            stderr_console.print(f"waiting for {len(waiting)} task(s) that another process is running "
                                 f"({', '.join(waiting[:4])}{' …' if len(waiting) > 4 else ''})")
            announced = True
        time.sleep(WAIT_POLL_S)


def dense_cache_notes(runs_dir: Path, evaluated: list[str]) -> list[str]:
    """Runs that had to recompute the dense hidden states did not see the dense stage's cache."""
    from prunekit.sweep.state import read_status

    recomputed = 0
    for task_id in evaluated:
        details = (read_status(runs_dir / "runs" / task_id.split(":", 1)[1], "eval") or {}).get("details") or {}
        recomputed += any(state == "computed" for state in (details.get("dense_hidden_states") or {}).values())
    if not recomputed:
        return []
    return [f"{recomputed} run(s) recomputed the dense hidden states instead of reading the dense stage's cache; "
            "on a cluster put PRUNEKIT_CACHE on storage every node shares"]


def final_complete(plan: Plan, task_id: str) -> bool:
    return any(row.complete for row in plan.rows if row.task.task_id == task_id)


def clean_partials_top(directory: Path) -> None:
    """Remove staging leftovers directly inside runs/, dense/, analysis/ (a task dir being created)."""
    if directory.exists():
        clean_partials_shallow(directory)


def clean_partials_shallow(directory: Path) -> None:
    for path in directory.glob(".*"):
        if path.name.endswith(".partial") or path.name.endswith(".tmp") or ".old-" in path.name:
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
