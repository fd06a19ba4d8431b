"""``prunekit compare``."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Optional

import typer
from rich.console import Console

from prunekit.cli.app import app, user_errors
from prunekit.cli.compare_options import compare_options

stdout = Console()


def _split(value: Optional[str]) -> list[str]:
    return [p.strip() for p in (value or "").split(",") if p.strip()]


@app.command()
@user_errors
@compare_options
def compare(
    spec: Any,  # prunekit.analysis.CompareSpec, made from the options by @compare_options
    a: str = typer.Argument(..., help="Pruned checkpoint A: local dir or Hub id."),
    b: str = typer.Argument(..., help="Pruned checkpoint B: local dir or Hub id."),
    dense: Optional[str] = typer.Option(None, "--dense", "-d", help="The dense base model: masks become A ∧ [W_dense ≠ 0]; LSAR/LAPE/drift compare A and B against it (else B against A)."),
    seeds_a: Optional[str] = typer.Option(None, "--seeds-a", help="More checkpoints of A's calibration language (other seeds), comma-separated: masks use their intersection."),
    seeds_b: Optional[str] = typer.Option(None, "--seeds-b", help="More checkpoints of B's calibration language, comma-separated."),
    out: Path = typer.Option(..., "--out", "-o", help="Output directory: compare.json, summary.md, figures/*.png, lape.npz (written atomically)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a non-empty --out directory."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars or tables."),
) -> None:
    """Explain what pruning changed between checkpoints A and B: mask IoU (with seed intersections),
    LSAR subspace drift, LAPE shifts and per-layer hidden-state drift (the study's §5 and App. D).

    Example: prunekit compare gemma-de gemma-sw --dense embedded:gemma-3-270m --langs de,en,sw --out cmp-de-sw

    Masks only, with three seeds per language: prunekit compare de-s0 sw-s0 --seeds-a de-s1,de-s2 --seeds-b sw-s1,sw-s2 --only masks --out iou
    """
    from prunekit.analysis import compare as run_compare
    from prunekit.analysis.figures import print_summary
    from prunekit.io import check_output_location

    check_output_location(out)  # before the models load
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # warnings are collected into the result and printed below
        result = run_compare([a, *_split(seeds_a)], [b, *_split(seeds_b)], spec, dense=dense, out=out,
                             overwrite=overwrite, progress=not quiet)
    if not quiet:
        print_summary(result, stdout)
        if result.get("perplexity"):  # how its perplexity was measured, and why eval's differs
            from prunekit.artifacts import PERPLEXITY_SETTINGS_NOTE, passage_perplexity_settings

            stdout.print(f"{passage_perplexity_settings(result['settings'])}. {PERPLEXITY_SETTINGS_NOTE}", style="dim")
        stdout.print(f"written to [bold]{out}[/bold]: {', '.join(result.get('files', []))}")
    for warning in result["warnings"]:
        typer.echo(f"warning: {warning}", err=True)
