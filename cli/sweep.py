"""``prunekit sweep`` (``prunekit report`` lives in cli/report.py)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from prunekit.cli.app import app, user_errors

stdout = Console()


@app.command()
@user_errors
def sweep(
    config: Path = typer.Argument(..., help="Sweep config (YAML): models, methods, calibration sets, seeds, evaluation, push, slurm."),
    executor: str = typer.Option("local", "--executor", "-e", help="local (this machine) or slurm (submitit job arrays; slurm.cluster: local tests them here)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Validate the config and print the plan (what is done, what would run); write nothing."),
    max_parallel: int = typer.Option(0, "--max-parallel", "-j", help="local: worker processes at a time, each on its own GPU (0 = one per visible GPU, or 1 on the CPU; 1 = sequential, in this process; more than the GPUs is capped, with a warning); slurm: array jobs running at once (0 = no cap)."),
    runs_dir: Optional[Path] = typer.Option(None, "--runs-dir", "-o", help="Where run dirs go (default: runs/<config name> beside the current directory)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No plan table or progress bars (the summary is still printed)."),
) -> None:
    """Prune every model with every calibration set (× methods × sparsities × seeds), evaluate, optionally push.

    Each run lives in RUNS_DIR/runs/<run hash> with one status file per stage (prune, eval, push);
    rerunning the same command skips finished stages and redoes those whose process died, so a
    sweep killed at any moment resumes without losing or corrupting runs. The dense model is
    evaluated once per model (RUNS_DIR/dense/). A failing run is recorded and the sweep goes on;
    the exit code is 1 if any run failed.

    GPUs: one worker per visible GPU by default, each on its own device. Slurm: job arrays that run
    in parallel; a preempted or timed-out job is requeued and resumes. Two sweeps may share one
    runs dir: each stage runs once, and each summary counts the other's work (README: GPUs and Slurm).

    Example: prunekit sweep configs/tiny-example.yaml --runs-dir runs/tiny && prunekit report runs/tiny --out report/tiny
    """
    from prunekit.io import check_output_location
    from prunekit.sweep import load_config, run_sweep

    cfg = load_config(config)
    target = runs_dir if runs_dir is not None else Path("runs") / cfg.name
    if not dry_run:
        check_output_location(target, in_place=True, option="--runs-dir")
    summary = run_sweep(cfg, target, executor=executor, dry_run=dry_run, max_parallel=max_parallel, progress=not quiet)
    for line in summary.lines():
        print(line, file=sys.stdout if summary.ok else sys.stderr)
    if not summary.ok:
        raise SystemExit(summary.exit_code)
