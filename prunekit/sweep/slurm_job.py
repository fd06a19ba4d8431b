"""What a Slurm (or submitit LocalExecutor) job runs, as the local pool's worker runs
:mod:`prunekit.sweep.pool_worker`: a callable, checkpointable, so that a preempted or
timed-out job is requeued and picks up where it stopped.

On the signal Slurm sends before the time limit (or on a preemption), submitit calls ``checkpoint``
and requeues the job with the same arguments: the requeued job skips the stages that are done and
redoes the one that was interrupted (its ``running`` status, written by an earlier run of this very
job id, is recognised as stale at once, not after the 5-minute heartbeat timeout). A job with
``gpus_per_node`` > 1 runs one rank per GPU (per ``execution.gpus_per_worker`` GPUs:
``tasks_per_node``), each with its share of the job's tasks and its own GPU as its whole
``CUDA_VISIBLE_DEVICES``, set before anything in the rank initialises CUDA. Imported only where
submitit is installed (``prunekit[slurm]``).
"""

from __future__ import annotations

import os
from typing import Any

import submitit

from prunekit.placement import rank_device, split_for_rank


class SweepJob(submitit.helpers.Checkpointable):
    """``SweepJob()(runs_dir, config_digest, task_ids)``: this rank's share of ``task_ids``."""

    def __call__(self, runs_dir: str, config_digest: str, task_ids: list[str]) -> list[dict[str, Any]]:
        from prunekit.sweep.layout import read_snapshot
        from prunekit.sweep.stages import execute_tasks

        env = submitit.JobEnvironment()
        mine = split_for_rank(list(task_ids), env.global_rank, env.num_tasks)
        if not mine:
            return []
        config = read_snapshot(runs_dir, config_digest)
        own_gpus(config.device, env.local_rank, config.gpus_per_worker)
        return execute_tasks(runs_dir, config_digest, mine)


def own_gpus(device: str, local_rank: int, gpus_per_rank: int = 1, environ=os.environ) -> None:
    """Narrow this rank's ``CUDA_VISIBLE_DEVICES`` to its own GPU(s) and say what ``device=auto`` means
    (``PRUNEKIT_DEVICE``), before CUDA is initialised here (it reads the variable once)."""
    visible, device = rank_device(device, local_rank, visible_gpu_ids(environ), gpus_per_rank)
    if visible is not None:
        environ["CUDA_VISIBLE_DEVICES"] = visible
    if device is not None:
        environ["PRUNEKIT_DEVICE"] = device  # what this rank's device=auto means


def visible_gpu_ids(environ=os.environ) -> list[str] | int:
    """The GPU ids this rank sees: ``CUDA_VISIBLE_DEVICES`` (Slurm sets it for the job's GPUs), else
    Slurm's ``SLURM_STEP_GPUS`` / ``SLURM_JOB_GPUS``; else only torch's count (CUDA then reads the
    variable before it could be narrowed)."""
    for name in ("CUDA_VISIBLE_DEVICES", "SLURM_STEP_GPUS", "SLURM_JOB_GPUS"):
        value = environ.get(name)
        if value is not None:
            return [g.strip() for g in value.split(",") if g.strip() and g.strip() != "-1"]
    try:
        import torch

        return torch.cuda.device_count()
    except Exception:  # noqa: BLE001 - no usable CUDA: no GPU
        return 0
