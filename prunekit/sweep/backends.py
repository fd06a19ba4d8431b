"""Backends: where tasks run (``--executor local | slurm`` picks one).

- ``inprocess``: sequentially in this process (``--executor local``, ``--max-parallel 1``).
- ``pool``: ``--executor local --max-parallel N``: N worker processes at a time, one task each;
  worker i owns its own GPU (``execution.gpus_per_worker`` of them): its ``CUDA_VISIBLE_DEVICES`` is
  that GPU alone and its ``device: auto`` (or ``cuda``) means ``cuda:0`` (``PRUNEKIT_DEVICE``), so
  neither prunekit nor lm-eval in it can touch another worker's GPU
  (``prunekit.placement.worker_plan``); an explicit ``cuda:N`` is left as written.
- ``submitit``: ``--executor slurm``: one job-array task per ``slurm.runs_per_job`` runs (× the GPUs
  of a node: one rank per GPU), ``slurm_array_parallelism = --max-parallel`` (default: no cap);
  each job is a checkpointable ``slurm_job.SweepJob``, requeued after a preemption or a timeout;
  ``slurm.cluster: local`` runs the same jobs through submitit's LocalExecutor (for testing on a
  workstation).

Each backend returns one ``TaskOutcome`` per task; a task that fails never stops the others.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

from prunekit.errors import ConfigError, did_you_mean
from prunekit.progress import progress_bar, stderr_console
from prunekit.sweep.config import SweepConfig
from prunekit.sweep.layout import is_complete, stage_names, task_dir, task_states
from prunekit.sweep.stages import TaskOutcome, execute_task

EXECUTORS = ("local", "slurm")


def visible_gpus() -> list[str]:
    """GPUs this process may hand out (CUDA_VISIBLE_DEVICES, else every device torch sees); worker i
    of the pool uses the i-th of them, as cuda:i."""
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        return [g.strip() for g in env.split(",") if g.strip() and g.strip() != "-1"]
    try:
        import torch

        return [str(i) for i in range(torch.cuda.device_count())]
    except Exception:  # noqa: BLE001
        return []


def local_worker_plan(config: SweepConfig, max_parallel: int | None):
    """Workers and their devices on this machine; a warning for each request that was capped."""
    from prunekit.placement import worker_plan

    plan = worker_plan(config.device, max_parallel, len(visible_gpus()), config.gpus_per_worker)
    for warning in plan.warnings:
        stderr_console.print(f"warning: {warning}", markup=False, highlight=False)
    return plan


def outcome_from_disk(config: SweepConfig, runs_dir: Path, task, note: str | None = None) -> TaskOutcome:
    """What a worker that ran elsewhere achieved, read back from the status files."""
    from prunekit.sweep.state import read_status

    states = task_states(config, runs_dir, task)
    if is_complete(states):
        return TaskOutcome(task.task_id, "done")
    if "busy" in states.values():
        return TaskOutcome(task.task_id, "busy", error=f"stages {states} are being run by another process")
    directory = task_dir(runs_dir, task)
    for name in stage_names(config, task):
        status = read_status(directory, name) if directory.exists() else None
        if status and status.get("state") == "failed":
            return TaskOutcome(task.task_id, "failed", error=status.get("error"), stage=name)
        if states.get(name) != "done":
            return TaskOutcome(task.task_id, "failed", error=note or f"stage {name} did not finish ({states[name]})", stage=name)
    return TaskOutcome(task.task_id, "failed", error=note or "did not finish")


def describe(task) -> str:
    from prunekit.sweep.grid import DenseTask, RunTask

    if isinstance(task, DenseTask):
        return f"dense {task.model.name}"
    if isinstance(task, RunTask):
        seed = "" if task.seed is None else f" · seed {task.seed}"
        pattern = "" if task.pattern is None else f" {task.pattern_label}"
        return f"run {task.run_id} · {task.model.name} · {task.method.label}{pattern} · calib {task.calib or 'none'}{seed}"
    return f"analysis {task.model.name} · {task.method.label} · {task.pair[0]} vs {task.pair[1]} · {len(task.runs_a)} seed(s)"


def run_inprocess(config: SweepConfig, runs_dir: Path, tasks: list, progress: bool, **_: Any) -> list[TaskOutcome]:
    outcomes = []
    for i, task in enumerate(tasks, 1):
        if progress:
            stderr_console.print(f"[bold][{i}/{len(tasks)}][/bold] {describe(task)}")
        outcome = execute_task(config, runs_dir, task, progress)
        if progress and outcome.state != "done":
            stderr_console.print(f"  [red]{outcome.state}[/red] in {outcome.stage}: {outcome.error}")
        outcomes.append(outcome)
    return outcomes


def run_pool(config: SweepConfig, runs_dir: Path, tasks: list, progress: bool, config_digest: str, max_parallel: int, **_: Any) -> list[TaskOutcome]:
    from prunekit.placement import worker_environment, worker_plan

    gpus = visible_gpus()
    plan = worker_plan(config.device, max_parallel, len(gpus), config.gpus_per_worker)  # warned once in run_sweep
    max_parallel = plan.workers
    logs = runs_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    queue = list(tasks)
    free = list(range(max_parallel))
    running: dict[subprocess.Popen, tuple[Any, int, Path, Any]] = {}
    outcomes: dict[str, TaskOutcome] = {}
    with progress_bar(f"sweep · {max_parallel} local workers", len(tasks), progress) as update:
        try:
            while queue or running:
                while queue and free:
                    slot, task = free.pop(0), queue.pop(0)
                    env = worker_environment(dict(os.environ), plan, slot, gpus)  # its own GPU(s) only
                    log_path = logs / f"{task.task_id.replace(':', '-')}.log"
                    handle = open(log_path, "a", encoding="utf-8")  # noqa: SIM115 - closed when the worker ends
                    cmd = [sys.executable, "-m", "prunekit.sweep.pool_worker", str(runs_dir), config_digest, task.task_id]
                    proc = subprocess.Popen(cmd, stdout=handle, stderr=subprocess.STDOUT, env=env, stdin=subprocess.DEVNULL)
                    running[proc] = (task, slot, log_path, handle)
                for proc in [p for p in running if p.poll() is not None]:
                    task, slot, log_path, handle = running.pop(proc)
                    handle.close()
                    free.append(slot)
                    note = None if proc.returncode == 0 else f"worker exited with code {proc.returncode}; see {log_path}"
                    outcomes[task.task_id] = outcome_from_disk(config, runs_dir, task, note)
                    update(len(outcomes), len(tasks))
                time.sleep(0.2)
        except BaseException:
            for proc in running:
                proc.terminate()
            for proc in running:
                proc.wait()
            raise
    return [outcomes[t.task_id] for t in tasks]


def job_layout(config: SweepConfig, max_parallel: int | None):
    """Ranks and tasks of each job (``prunekit.placement.slurm_layout``); a local "cluster" has only
    the GPUs this machine shows."""
    from prunekit.placement import slurm_layout

    gpus = config.slurm["gpus_per_node"]
    if config.slurm["cluster"] != "slurm":
        gpus = min(gpus, len(visible_gpus()))
    return slurm_layout(gpus, config.slurm["runs_per_job"], max_parallel, config.gpus_per_worker)


def submitit_executor(config: SweepConfig, runs_dir: Path, max_parallel: int | None):
    try:
        import submitit
    except ImportError as err:
        raise ConfigError("--executor slurm needs submitit: pip install 'prunekit[slurm]'") from err
    slurm = config.slurm
    cluster = slurm["cluster"]
    try:
        executor = submitit.AutoExecutor(folder=str(runs_dir / "slurm" / "%j"), cluster=cluster)
    except RuntimeError as err:  # no srun / sbatch on this machine
        raise ConfigError(f"--executor slurm: {err}; to try the same jobs on this machine set slurm.cluster: local") from err
    layout = job_layout(config, max_parallel)
    params: dict[str, Any] = {
        "name": f"prunekit-{config.name}",
        "timeout_min": slurm["time_min"],
        "gpus_per_node": layout.gpus_per_node,
        "cpus_per_task": slurm["cpus_per_task"],
        "mem_gb": slurm["mem_gb"],
        "tasks_per_node": layout.ranks,  # one rank per GPU (per gpus_per_worker GPUs), each on its own
        "nodes": 1,
    }
    if cluster == "slurm":
        if layout.array_parallelism is not None:
            params["slurm_array_parallelism"] = layout.array_parallelism
        for key in ("partition", "account", "qos", "constraint"):
            if key in slurm:
                params[f"slurm_{key}"] = slurm[key]
        if slurm["setup"]:
            params["slurm_setup"] = list(slurm["setup"])
        if slurm["additional"]:
            params["slurm_additional_parameters"] = dict(slurm["additional"])
    executor.update_parameters(**params)
    return executor


def chunk(tasks: list, size: int) -> list[list]:
    return [tasks[i:i + size] for i in range(0, len(tasks), size)]


def run_submitit(config: SweepConfig, runs_dir: Path, tasks: list, progress: bool, config_digest: str, max_parallel: int | None, **_: Any) -> list[TaskOutcome]:
    from prunekit.sweep.slurm_job import SweepJob
    from prunekit.sweep.state import abandon

    executor = submitit_executor(config, runs_dir, max_parallel)
    if config.slurm["cluster"] == "slurm":
        groups = chunk(tasks, job_layout(config, max_parallel).tasks_per_job)
    else:  # a workstation: at most max_parallel concurrent jobs, each working through its share
        jobs_at_once = max(1, min(max_parallel or 1, len(tasks)))
        groups = chunk(tasks, -(-len(tasks) // jobs_at_once))
    ids = [[t.task_id for t in group] for group in groups]
    jobs = executor.map_array(SweepJob(), [str(runs_dir)] * len(ids), [config_digest] * len(ids), ids)
    if progress:
        stderr_console.print(f"submitted {len(jobs)} {config.slurm['cluster']} job(s) for {len(tasks)} task(s): "
                             f"{', '.join(j.job_id for j in jobs[:6])}{' …' if len(jobs) > 6 else ''}")
    outcomes: dict[str, TaskOutcome] = {}
    pending = dict(zip(range(len(jobs)), jobs))
    with progress_bar(f"sweep · {config.slurm['cluster']} jobs", len(tasks), progress) as update:
        while pending:
            for index, job in list(pending.items()):
                if not job.done():
                    continue
                del pending[index]
                note = None
                try:
                    job.result()
                except Exception as err:  # noqa: BLE001 - a job that died (timeout, OOM, node failure)
                    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
                    note = f"job {job.job_id} failed: {first}; see {job.paths.stderr}"
                    for task in groups[index]:  # its stages cannot still be running: say so now, not in 5 minutes
                        for name in stage_names(config, task):
                            abandon(task_dir(runs_dir, task), name, str(job.job_id), note)
                for task in groups[index]:
                    outcomes[task.task_id] = outcome_from_disk(config, runs_dir, task, note)
                update(len(outcomes), len(tasks))
            if pending:
                time.sleep(0.5)
    return [outcomes[t.task_id] for t in tasks]


def choose_executor(name: str, max_parallel: int | None, config: SweepConfig,
                    plan_workers: bool = True) -> tuple[Callable[..., list[TaskOutcome]], int | None]:
    """The backend ``--executor NAME`` runs the tasks with, and how many it runs at a time: local workers, each
    on its own GPU (``local_worker_plan``, planned only where the tasks will run: ``plan_workers``), or Slurm
    jobs (None: no cap). An unknown executor or a negative count raises ConfigError before any work."""
    get_executor(name, max_parallel)  # an unknown executor or a negative count fails first
    if name == "slurm":
        return run_submitit, max_parallel or None
    if plan_workers:  # a plan may be printed where the GPUs are not
        max_parallel = local_worker_plan(config, max_parallel).workers
    return (run_inprocess if (max_parallel or 1) == 1 else run_pool), max_parallel


def get_executor(name: str, max_parallel: int | None) -> Callable[..., list[TaskOutcome]]:
    """``max_parallel``: local workers (already planned: ``local_worker_plan``), or Slurm jobs at a time (None: no cap)."""
    if name not in EXECUTORS:
        raise ConfigError(f"unknown executor '{name}'{did_you_mean(name, EXECUTORS)}; use local or slurm")
    if max_parallel is not None and max_parallel < 0:
        raise ConfigError(f"--max-parallel must be at least 1 (or 0: automatic), got {max_parallel}")
    if name == "slurm":
        return run_submitit
    return run_inprocess if (max_parallel or 1) == 1 else run_pool
