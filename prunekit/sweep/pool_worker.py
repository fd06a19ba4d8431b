"""What a worker process of the local pool runs: ``python -m prunekit.sweep.pool_worker RUNS_DIR
CONFIG_DIGEST TASK_ID...`` runs tasks of a sweep in a fresh process (``backends.run_pool`` starts one
per task; a Slurm job runs :class:`prunekit.sweep.slurm_job.SweepJob` instead). Failures are recorded
in the status files; the exit code is 0 unless the worker itself broke."""

from __future__ import annotations

import json
import sys


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) < 3:
        print("usage: python -m prunekit.sweep.pool_worker RUNS_DIR CONFIG_DIGEST TASK_ID...", file=sys.stderr)
        return 2
    from prunekit.sweep.stages import execute_tasks

    outcomes = execute_tasks(args[0], args[1], args[2:], progress=False)
    print(json.dumps(outcomes))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
