"""``prunekit report``: a sweep's runs as a leaderboard and the study's tables."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console

from prunekit.cli.app import app, user_errors

stdout = Console()


@app.command()
@user_errors
def report(
    runs_dir: Path = typer.Argument(..., help="The --runs-dir of a sweep."),
    out: Path = typer.Option(..., "--out", "-o", help="Report directory: report.md, report.html, results.csv (the leaderboard), cells.csv, results.json, heatmaps/."),
    metric: str = typer.Option("perplexity", "--finding-metric", help="Metric of the printed diagonal finding: perplexity, snr_db, pruning_error or a task table such as belebele/acc."),
    open_page: bool = typer.Option(False, "--open", help="Open report.html in your web browser when it is written."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Print only where the report went."),
) -> None:
    """Turn a sweep's runs into a leaderboard and the study's Tables 1–4.

    The leaderboard comes first: one row per checkpoint (model, method, sparsity or bits,
    calibration set) with perplexity, SNR and pruning error per evaluation language, their averages
    (geometric mean for perplexity), one score per task group, the Hub repo when pushed and the
    dense model as the reference row, ranked. In report.html click a header to sort it (again to
    reverse), filter by model / method / calibration, and pick a target language (or task) to rank
    the checkpoints for it. The page is one self-contained file: it loads nothing from the network.

    Then the study's tables: rows are calibration sets, columns evaluation languages, one table per
    metric, with deltas against dense, the best cell per column, heatmaps with the diagonal outlined
    and a calibration advisor. Cells are mean ± std over seeds.

    Example: prunekit report runs/tiny --out report/tiny --open
    """
    from prunekit.io import check_output_location
    from prunekit.report import build_report, diagonal_finding

    check_output_location(out, in_place=True)
    result = build_report(runs_dir, out)
    for warning in result.collected.warnings:
        typer.echo(f"warning: {warning}", err=True)
    if not quiet:
        board = result.leaderboard
        if board.entries and board.rank_by is not None and board.entries[0].rank is not None:
            top = board.entries[0]
            value = top.cells[board.rank_by.key]
            stdout.print(f"leaderboard: {len(board.entries)} checkpoints; best by {board.rank_by.header}: "
                         f"{top.name} ({value.mean:.{board.rank_by.metric.decimals}f})", highlight=False)
        for line in diagonal_finding(result, metric):
            typer.echo(line)
        if result.collected.missing:
            stdout.print(f"[yellow]{len(result.collected.missing)} run(s) have no results yet (listed in the report)[/yellow]")
    page = result.files["report.html"]
    stdout.print(f"report written to [bold]{page}[/bold] "
                 f"({len(result.collected.runs)} runs, {len(result.tables)} tables, {len(result.heatmaps)} heatmaps)")
    if open_page:
        import webbrowser

        if not webbrowser.open(page.resolve().as_uri()):
            stdout.print(f"[yellow]no web browser could be started here; open {page} yourself[/yellow]")
