"""``prunekit eval``."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Optional

import typer
from rich.console import Console
from rich.table import Table

from prunekit.cli.app import app, user_errors
from prunekit.cli.evaluation_options import evaluation_options

stdout = Console()


def _fmt(value: Any, spec: str = ".4f") -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and math.isinf(value):
        return "+inf" if value > 0 else "-inf"
    return format(value, spec)


def print_results(results: dict[str, Any], out: Path | None) -> None:
    """Per-language perplexity / SNR / PE table and the task table."""
    model = results["model"]["spec"]
    if results["perplexity"]:
        table = Table(title=f"{model} · perplexity" + (" and hidden-state error vs " + results["dense"]["spec"] if results["dense"] else ""))
        for column in ("lang", "PPL", "tokens", "windows"):
            table.add_column(column, justify="right")
        if results["hidden_states"]:
            for column in ("SNR dB", "PE ×10⁶", "SNR tokens"):
                table.add_column(column, justify="right")
        for lang in results["languages"]:
            ppl = results["perplexity"].get(lang)
            if ppl is None:
                continue
            row = [lang, _fmt(ppl["ppl"], ".3f"), str(ppl["tokens"]), str(ppl["windows"])]
            hidden = results["hidden_states"].get(lang)
            if hidden is not None:
                row += [_fmt(hidden["snr_db"], ".2f"), _fmt(hidden["pruning_error"] * 1e6, ".2f"), str(hidden["tokens"])]
            table.add_row(*row)
        stdout.print(table)
        from prunekit.artifacts import PERPLEXITY_SETTINGS_NOTE, windows_perplexity_settings

        stdout.print(windows_perplexity_settings(results["settings"]) + ". " + PERPLEXITY_SETTINGS_NOTE, style="dim")
    if results["tasks"]:
        table = Table(title=f"{model} · downstream tasks")
        for column in ("task", "group", "lang", "status", "metrics (± stderr)", "samples / note"):
            table.add_column(column)
        for name, cell in results["tasks"].items():
            metrics = ", ".join(
                f"{metric} {_fmt(value)}" + (f" ± {_fmt(cell['stderr'][metric])}" if cell["stderr"].get(metric) is not None else "")
                for metric, value in cell["metrics"].items()
            )
            tail = str(cell["samples"]) if cell["status"] == "ok" else (cell["note"] or "")
            table.add_row(name, cell["group"], cell["language"] or "-", cell["status"], metrics or "-", tail)
        stdout.print(table)
    if out is not None:
        stdout.print(f"results written to [bold]{out}[/bold]")


@app.command("eval")
@user_errors
@evaluation_options
def evaluate_command(
    spec: Any,  # prunekit.evaluation.EvaluationSpec, made from the options by @evaluation_options
    checkpoint: str = typer.Argument(..., help="Checkpoint to evaluate: a local dir (e.g. from `prunekit prune`), Hub id, .gguf file or embedded:gemma-3-270m."),
    dense: Optional[str] = typer.Option(None, "--dense", help="The dense model CHECKPOINT was pruned from: enables SNR / pruning error of hidden states (cached per dense model). Default: the base CHECKPOINT's prunekit.json names, when it is available without a download."),
    no_dense: bool = typer.Option(False, "--no-dense", help="No dense reference: perplexity (and tasks) only, no SNR / pruning error."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Write the results JSON here (written atomically, perplexity and SNR before the tasks start; a rerun skips what it holds; schema in prunekit/evaluation/SCHEMA.md). Default: CHECKPOINT/results.json for a local checkpoint dir (where push finds it), else ./NAME.results.json."),
    no_save: bool = typer.Option(False, "--no-save", help="Write no results file; print the tables only."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars or tables."),
    force: bool = typer.Option(False, "--force", help="Run --tasks even when the memory check says the whole model will not fit in host or GPU memory (PRUNEKIT_FORCE=1 does the same for every command and sweep)."),
) -> None:
    """Evaluate CHECKPOINT per language: perplexity, SNR / pruning error against --dense, lm-eval tasks.

    Every language runs in one pass over the checkpoint's layers, streamed from its shards.

    Example: prunekit eval gemma-sw --dense embedded:gemma-3-270m --langs sw,en --ppl-source embedded --tasks belebele,xcopa --task-data data/ --limit 50 --out results.json

    Shortest: prunekit eval gemma-sw (the study's seven languages plus gemma-sw's calibration languages; SNR against the base gemma-sw's record names when it is available offline; results in gemma-sw/results.json)
    """
    from prunekit.errors import ConfigError
    from prunekit.evaluation import evaluate
    from prunekit.evaluation.defaults import default_results_path, recorded_dense
    from prunekit.io import check_output_location
    from prunekit.models import ModelSource, check_task_memory, memory_check_forced, resolve_model

    if no_save and out is not None:
        raise ConfigError("--no-save and --out contradict each other: give one")
    if no_dense and dense is not None:
        raise ConfigError("--no-dense and --dense contradict each other: give one")
    source = resolve_model(checkpoint)  # a model that is not there fails here, before any default is chosen
    if out is None and not no_save:
        out, note = default_results_path(checkpoint)
        typer.echo(note, err=True)
    check_output_location(out, kind="file")  # before the model loads
    if dense is None and not no_dense and spec.ppl_source is not None:
        dense, note = recorded_dense(checkpoint)
        if note:
            typer.echo(note, err=True)
        if isinstance(dense, ModelSource):  # a Hub base in the cache: its snapshot as it is, no Hub call
            from prunekit.evaluation.hidden_states import DenseReference

            dense = DenseReference.from_source(dense, spec.dtype, spec.trust_remote_code)
    if spec.langs is None:
        from prunekit.artifacts import read_record

        spec, note = spec.with_default_languages(read_record(source.path))
        typer.echo(note, err=True)
    with memory_check_forced(force):
        if spec.tasks:  # lm-eval holds the whole model: refuse now what cannot fit, not after perplexity
            check_task_memory(checkpoint, spec.dtype, spec.device, spec.backend, spec.parallelize)
        results = evaluate(source, spec, dense=dense, out=out, progress=not quiet)  # resolved once, above
    if not quiet:
        print_results(results, out)
