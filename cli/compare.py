"""``prunekit compare``."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from prunekit.cli.app import app, user_errors

stdout = Console()


def _split(value: Optional[str]) -> list[str]:
    return [p.strip() for p in (value or "").split(",") if p.strip()]


@app.command()
@user_errors
def compare(
    a: str = typer.Argument(..., help="Pruned checkpoint A: local dir or Hub id."),
    b: str = typer.Argument(..., help="Pruned checkpoint B: local dir or Hub id."),
    dense: Optional[str] = typer.Option(None, "--dense", "-d", help="The dense base model: masks become A ∧ [W_dense ≠ 0]; LSAR/LAPE/drift compare A and B against it (else B against A)."),
    seeds_a: Optional[str] = typer.Option(None, "--seeds-a", help="More checkpoints of A's calibration language (other seeds), comma-separated: masks use their intersection."),
    seeds_b: Optional[str] = typer.Option(None, "--seeds-b", help="More checkpoints of B's calibration language, comma-separated."),
    langs: str = typer.Option("all", "--langs", "-l", help="Evaluation languages for LSAR/LAPE/drift, comma-separated (de,en,sw) or 'all' (the study's seven)."),
    text_source: str = typer.Option("embedded", "--text-source", help="embedded (prunekit's parallel passages), mc4 or a PATH (dir with {lang}.txt/.jsonl/.parquet); the evaluation split is used."),
    only: Optional[str] = typer.Option(None, "--only", help="Analyses to run, comma-separated from masks,lsar,lape,drift (default: all)."),
    max_tokens: Optional[int] = typer.Option(None, "--max-tokens", help="At most this many content tokens per language (default: all of the text)."),
    max_length: int = typer.Option(512, "--max-length", help="Tokens per document at most (longer ones are cut)."),
    lsar_rank: Optional[int] = typer.Option(None, "--lsar-rank", help="Rank r of the LSAR subspace, 1..K−1 (default K−1)."),
    subspace: str = typer.Option("per_model", "--subspace", help="per_model (the study: one subspace per model) or dense (the reference's subspace for both)."),
    lape_thresholds: str = typer.Option("none", "--lape-thresholds", help="none (the study) or tang (Tang et al.: top 1 %, filter 0.95, activation bar 0.95) for selecting language-specific neurons."),
    deactivate: bool = typer.Option(False, "--deactivate", help="Also switch off each language's specific neurons and measure the per-language perplexity change (K extra passes per model)."),
    dtype: str = typer.Option("auto", "--dtype", help="auto (each checkpoint's own dtype), float32, bfloat16 or float16."),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda[:i]."),
    batch_size: int = typer.Option(1, "--batch-size", help="Documents per forward pass (right-padded)."),
    out: Path = typer.Option(..., "--out", "-o", help="Output directory: compare.json, summary.md, figures/*.png, lape.npz (written atomically)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a non-empty --out directory."),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code", help="Allow model code from the Hub (off by default)."),
    conventions: Optional[str] = typer.Option(None, "--conventions", help="study or prunekit: the conventions the checkpoints should have been pruned with (default: what their prunekit.json records); a checkpoint made with others gets a warning, and the choice is recorded in compare.json."),
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
        result = run_compare(
            a, b, dense=dense, seeds_a=_split(seeds_a), seeds_b=_split(seeds_b), langs=langs, text_source=text_source,
            only=only, out=out, overwrite=overwrite, max_tokens=max_tokens, max_length=max_length, lsar_rank=lsar_rank,
            subspace=subspace, lape_thresholds=lape_thresholds, deactivate=deactivate, dtype=dtype, device=device,
            batch_size=batch_size, trust_remote_code=trust_remote_code, progress=not quiet, conventions=conventions,
        )
    if not quiet:
        print_summary(result, stdout)
        if result.get("perplexity"):  # one model's counts: every model reads the same texts
            from prunekit.evaluation.perplexity import describe_perplexity

            settings = result["settings"] | {"windowing": "documents", "source": result["settings"]["text_source"]}
            stdout.print(describe_perplexity(settings, next(iter(result["perplexity"].values()))), highlight=False, markup=False)
        stdout.print(f"written to [bold]{out}[/bold]: {', '.join(result.get('files', []))}")
    for warning in result["warnings"]:
        typer.echo(f"warning: {warning}", err=True)
