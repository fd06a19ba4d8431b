"""What a Slurm (or submitit LocalExecutor) job runs, as the local pool's worker runs
:mod:`prunekit.sweep.pool_worker`: a callable, checkpointable, so that a preempted or
timed-out job is requeued and picks up where it stopped.

On the signal Slurm sends before the time limit (or on a preemption), submitit calls ``checkpoint``
and requeues the job with the same arguments: the requeued job skips the stages that are done and
redoes the one that was interrupted (its ``running`` status, written by an earlier run of this very
job id, is recognised as stale at once, not after the 5-minute heartbeat timeout). A job with
``gpus_per_node`` > 1 runs one rank per GPU (``tasks_per_node``), each with its own device and its
share of the job's tasks. Imported only where submitit is installed (``prunekit[slurm]``).
"""

from __future__ import annotations

import os
from typing import Any

import submitit

from prunekit.placement import rank_device, split_for_rank


class SweepJob(submitit.helpers.Checkpointable):
    """``SweepJob()(runs_dir, config_digest, task_ids)``: this rank's share of ``task_ids``."""

    def __call__(self, runs_dir: str, config_digest: str, task_ids: list[str]) -> list[dict[str, Any]]:
        from prunekit.sweep.stages import execute_tasks, read_snapshot

        env = submitit.JobEnvironment()
        mine = split_for_rank(list(task_ids), env.global_rank, env.num_tasks)
        if not mine:
            return []
        device = rank_device(read_snapshot(runs_dir, config_digest).device, env.local_rank, _visible_gpus())
        if device is not None:
            os.environ["PRUNEKIT_DEVICE"] = device  # what this rank's device=auto means
        return execute_tasks(runs_dir, config_digest, mine)


def _visible_gpus() -> int:
    try:
        import torch

        return torch.cuda.device_count()
    except Exception:  # noqa: BLE001 - no usable CUDA: no GPU
        return 0
