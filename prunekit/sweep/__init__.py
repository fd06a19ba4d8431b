"""Sweeps: a YAML grid (models × methods × patterns × calibration sets × seeds) run as resumable,
atomic runs (prune -> eval -> push) on this machine or on Slurm, with the dense model's work done
once per model.

    from prunekit.sweep import run_sweep
    summary = run_sweep("configs/tiny-example.yaml", "runs/tiny")

Each name below is imported on first use, so that importing one module of the package (the plan, say)
does not import the others (the stages' work, the pipeline, the evaluation).
"""

# name -> the module it lives in, imported on first use
_LAZY = {
    "SweepConfig": "prunekit.sweep.config",
    "load_config": "prunekit.sweep.config",
    "Grid": "prunekit.sweep.grid",
    "expand": "prunekit.sweep.grid",
    "SweepSummary": "prunekit.sweep.orchestrate",
    "run_sweep": "prunekit.sweep.orchestrate",
    "Plan": "prunekit.sweep.plan",
    "make_plan": "prunekit.sweep.plan",
    "plan_table": "prunekit.sweep.table",
}


def __getattr__(name: str):
    """The package's names, each imported from its module on first use (see ``_LAZY``)."""
    if name not in _LAZY:
        raise AttributeError(f"module 'prunekit.sweep' has no attribute '{name}'")
    import importlib

    return getattr(importlib.import_module(_LAZY[name]), name)


__all__ = ["Grid", "Plan", "SweepConfig", "SweepSummary", "expand", "load_config", "make_plan", "plan_table", "run_sweep"]
