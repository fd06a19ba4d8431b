"""``prunekit prune``."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from prunekit.cli.app import app, user_errors
from prunekit.conventions import HELP as CONVENTIONS_HELP

stdout = Console()


def print_prune_summary(record: dict, out: Path | None) -> None:
    sparsity = record["sparsity"]
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
        f"load {timings['load_s']:.1f}s, calibration {timings['calibration_s']:.1f}s, pruning {timings['prune_s']:.1f}s"
    )
    if out is not None:
        stdout.print(f"checkpoint written to [bold]{out}[/bold] (prunekit.json holds the full record)")


@app.command()
@user_errors
def prune(
    model: str = typer.Argument(..., help="Local model dir, .gguf file, Hub id (org/name) or embedded:gemma-3-270m."),
    method: str = typer.Option("wanda", "--method", "-m", help="magnitude, wanda or sparsegpt (GPTQ: `prunekit quantize`)."),
    sparsity: Optional[float] = typer.Option(None, "--sparsity", "-s", help="Fraction of weights to prune, in (0, 1). Default 0.5; implied by --pattern."),
    pattern: Optional[str] = typer.Option(None, "--pattern", "-p", help="'unstructured' (default) or N:M such as 2:4 or 4:8."),
    calib: Optional[str] = typer.Option(None, "--calib", "-c", help="Calibration language: a code (de), a mix (en+de, equal shares) or 'all' (the study's seven). Default en; magnitude uses none."),
    calib_source: str = typer.Option("embedded", "--calib-source", help="mc4 (streamed with datasets), embedded (prunekit's own texts) or a PATH (.txt/.jsonl/.parquet, or a dir with one file per language)."),
    nsamples: Optional[int] = typer.Option(None, "--nsamples", help="Number of calibration sequences (default: the study's 128, or as many as the text supplies; the choice is printed)."),
    seqlen: Optional[int] = typer.Option(None, "--seqlen", help="Tokens per calibration sequence (default: the study's 8192 capped by the model's context, or shorter when the text is short)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the calibration sampling."),
    out: Path = typer.Option(..., "--out", "-o", help="Output checkpoint directory (written atomically)."),
    dtype: str = typer.Option("auto", "--dtype", help="auto (the checkpoint's own dtype, kept in the output), bfloat16, float16 or float32 (statistics are always fp32)."),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda[:i]: where each decoder layer is computed."),
    skip_layers: Optional[str] = typer.Option(None, "--skip-layers", help="Layers kept dense: 'first', 'last' and/or indices, comma-separated."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a non-empty --out directory."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Calibration sequences per forward (default: ~8192 tokens)."),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code", help="Allow model code from the Hub (off by default)."),
    conventions: str = typer.Option("prunekit", "--conventions", help=CONVENTIONS_HELP),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars or tables."),
    solve_threads: Optional[int] = typer.Option(
        None, "--solve-threads",
        help="SparseGPT on the CPU: 1 solves on one thread; 2 or more (the default on a multi-core CPU) factorises "
        "the widest Hessians (down_proj's) on a second thread while the other groups are solved. Same results either way.",
    ),
) -> None:
    """Prune MODEL layer by layer, calibrated on text in one language or a mix.

    Example: prunekit prune embedded:gemma-3-270m --method sparsegpt --calib sw --nsamples 32 --seqlen 256 --out gemma-sw

    Shortest: prunekit prune embedded:gemma-3-270m --method wanda --out gemma-wanda
    """
    from prunekit.errors import ConfigError
    from prunekit.methods import available_methods, get_method
    from prunekit.pipeline import prune as run_prune

    if get_method(method).kind != "prune":
        raise ConfigError(
            f"'{method}' is a quantization method: use `prunekit quantize` (pruning methods: {', '.join(available_methods('prune'))})"
        )
    result = run_prune(
        model, method=method, sparsity=sparsity, pattern=pattern, calib=calib, calib_source=calib_source,
        nsamples=nsamples, seqlen=seqlen, seed=seed, out=out, dtype=dtype, device=device,
        skip_layers=skip_layers, overwrite=overwrite, batch_size=batch_size,
        trust_remote_code=trust_remote_code, progress=not quiet, solve_threads=solve_threads, conventions=conventions,
    )
    if not quiet:
        print_prune_summary(result.record, result.out)
