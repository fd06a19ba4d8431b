"""``prunekit prune``."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from prunekit.cli.app import app, user_errors
from prunekit.cli.checkpoint_options import CheckpointOptions, checkpoint_options

stdout = Console()


def print_prune_summary(record: dict, out: Path | None) -> None:
    from prunekit.artifacts import method_seconds, sparsity_summary

    sparsity = sparsity_summary(record)
    table = Table(title=f"{record['recipe']['method']} · {record['base_model']['spec']}")
    table.add_column("layer", justify="right")
    modules = sorted({m["name"] for layer in sparsity["per_layer"] for m in layer["modules"]})
    short = [name.split(".")[-1] for name in modules]
    for name in short:
        table.add_column(f"{name} sparsity / rel.err", justify="right")
    table.add_column("seconds", justify="right")
    for layer in sparsity["per_layer"]:
        cells = {m["name"]: m for m in layer["modules"]}
        row = [str(layer["index"])]
        for name in modules:
            if layer["skipped"] or name not in cells:
                row.append("dense (skipped)" if layer["skipped"] else "-")
                continue
            m = cells[name]
            err = "-" if m["relative_error"] is None else f"{m['relative_error']:.2e}"
            row.append(f"{m['sparsity']:.3f} / {err}")
        row.append(f"{layer['seconds']:.1f}")
        table.add_row(*row)
    stdout.print(table)
    timings = record["timings"]
    stdout.print(
        f"overall sparsity of the pruned linears: [bold]{sparsity['overall']:.4f}[/bold] · "
        f"load {timings['load_s']:.1f}s, calibration {timings['calibration_s']:.1f}s, pruning {method_seconds(record):.1f}s"
    )
    if out is not None:
        stdout.print(f"checkpoint written to [bold]{out}[/bold] (prunekit.json holds the full record)")


@app.command()
@user_errors
@checkpoint_options(uncalibrated="magnitude")
def prune(
    options: CheckpointOptions,
    method: str = typer.Option("wanda", "--method", "-m", help="magnitude, wanda or sparsegpt (GPTQ: `prunekit quantize`)."),
    sparsity: Optional[float] = typer.Option(None, "--sparsity", "-s", help="Fraction of weights to prune, in (0, 1). Default 0.5; implied by --pattern."),
    pattern: Optional[str] = typer.Option(None, "--pattern", "-p", help="'unstructured' (default) or N:M such as 2:4 or 4:8."),
    solve_threads: Optional[int] = typer.Option(
        None, "--solve-threads",
        help="SparseGPT on the CPU: 1 solves on one thread; 2 or more (the default on a multi-core CPU) factorises "
        "the widest Hessians (down_proj's) on a second thread while the other groups are solved. Same results either way; "
        "1 holds one Hessian at a time (8B shapes: 2.91 GB peak against 3.34 GB, 1.23x the time).",
    ),
) -> None:
    """Prune MODEL layer by layer, calibrated on text in one language or a mix.

    Example: prunekit prune embedded:gemma-3-270m --method sparsegpt --calib sw --nsamples 32 --seqlen 256 --out gemma-sw

    Shortest: prunekit prune embedded:gemma-3-270m --method wanda --out gemma-wanda
    """
    from prunekit.pipeline import method_of_kind, prune as run_prune

    arguments = options.pipeline_arguments(solve_threads=solve_threads)
    method_of_kind(method, "prune")  # a quantization method names `prunekit quantize`
    result = run_prune(options.model, method, sparsity=sparsity, pattern=pattern, **arguments)
    if not options.quiet:
        print_prune_summary(result.record, result.out)
