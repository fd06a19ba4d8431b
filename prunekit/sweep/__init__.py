"""Sweeps: a YAML grid (models × methods × patterns × calibration sets × seeds) run as resumable,
atomic runs (prune -> eval -> push) on this machine or on Slurm, with the dense model's work done
once per model.

    from prunekit.sweep import run_sweep
    summary = run_sweep("configs/tiny-example.yaml", "runs/tiny")
"""

from prunekit.sweep.config import SweepConfig, load_config
from prunekit.sweep.grid import Grid, expand
from prunekit.sweep.orchestrate import SweepSummary, run_sweep
from prunekit.sweep.plan import Plan, make_plan, plan_table

__all__ = ["Grid", "Plan", "SweepConfig", "SweepSummary", "expand", "load_config", "make_plan", "plan_table", "run_sweep"]
