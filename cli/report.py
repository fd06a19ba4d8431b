"""``prunekit report``: a sweep's runs as a leaderboard and the study's tables."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from prunekit.cli.app import app, user_errors

stdout = Console()


@app.command()
@user_errors
def report(
    runs_dir: Path = typer.Argument(..., help="The --runs-dir of a sweep."),
    out: Path = typer.Option(..., "--out", "-o", help="Report directory: report.md, report.html, results.csv (the leaderboard), cells.csv, leaderboard.json, heatmaps/."),
    metric: str = typer.Option("perplexity", "--finding-metric", help="Metric of the printed diagonal finding: perplexity, snr_db, pruning_error or a task table such as belebele/acc."),
    open_page: bool = typer.Option(False, "--open", help="Open report.html in your web browser when it is written."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Print only where the report went."),
    push: Optional[str] = typer.Option(None, "--push", help="Also publish the leaderboard as a static Hugging Face Space ORG/NAME (created if missing): report.html as index.html, results.csv and the heatmaps, in one commit. The sweep's collection and the cards of its pushed checkpoints link it."),
    private: bool = typer.Option(False, "--private", help="With --push: create the Space private."),
    endpoint: Optional[str] = typer.Option(None, "--endpoint", help="With --push: Hub URL (default: $HF_ENDPOINT or https://huggingface.co)."),
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

    With --push ORG/NAME the same page is hosted as a static Space (no server code, nothing loaded from the
    network), next to results.csv and the figures; publishing again updates it (unchanged files are not sent).

    Example: prunekit report runs/tiny --out report/tiny --open

    Hosted: `prunekit report runs/tiny --out report/tiny --push my-org/tiny-leaderboard`.
    """
    from prunekit.errors import ConfigError
    from prunekit.io import check_output_location
    from prunekit.report import build_report, diagonal_finding

    if push is None and (private or endpoint):
        raise ConfigError("--private and --endpoint only apply with --push ORG/NAME (the Space to publish to)")
    if push is not None:
        from prunekit.hub.names import validate_repo_id

        validate_repo_id(push)  # before the report is built
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
    if push is not None:
        from prunekit.hub.space import push_report_space

        space = push_report_space(out, push, title=f"{result.name} leaderboard", private=private, endpoint=endpoint)
        stdout.print(f"leaderboard published to [bold]{space.url}[/bold] (commit {space.commit}; "
                     f"{len(space.files)} files: {', '.join(space.files)})", highlight=False)
        repos = list(dict.fromkeys(link["repo_id"] for entry in result.leaderboard.entries for link in entry.hub))
        if repos:  # the sweep pushed its runs: its collection and cards link the Space
            from prunekit.hub.collection import publish_sweep_collection

            linked = publish_sweep_collection(result.name, repos, repos[0].split("/")[0], endpoint=endpoint,
                                              leaderboard=push)
            stdout.print(f"linked from the collection {linked.url} and the cards of {len(repos)} checkpoints "
                         f"({len(linked.cards_updated)} updated)", highlight=False)
    if open_page:
        import webbrowser

        if not webbrowser.open(page.resolve().as_uri()):
            stdout.print(f"[yellow]no web browser could be started here; open {page} yourself[/yellow]")
