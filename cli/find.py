"""``prunekit find``: published pruned checkpoints of a base model, ranked for a language."""

from __future__ import annotations

import json
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from prunekit.cli.app import app, user_errors

stdout = Console()


def _num(value: float | None, spec: str = ".2f") -> str:
    return "n/a" if value is None else format(value, spec)


@app.command()
@user_errors
def find(
    base: str = typer.Option(..., "--base", help="Hub id of the base model, e.g. meta-llama/Meta-Llama-3-8B."),
    lang: Optional[str] = typer.Option(None, "--lang", help="Rank for this language (ISO code: sw, de, ...) by its perplexity; default: the geometric mean over each card's languages."),
    method: Optional[str] = typer.Option(None, "--method", help="Only this method: wanda, sparsegpt, magnitude or gptq."),
    author: Optional[str] = typer.Option(None, "--author", help="Only repos of this user or organization."),
    endpoint: Optional[str] = typer.Option(None, "--endpoint", help="Hub URL (default: $HF_ENDPOINT or https://huggingface.co)."),
    as_json: bool = typer.Option(False, "--json", help="Print the rows as JSON (the same fields as the table) instead of a table."),
) -> None:
    """Find the pruned and quantized checkpoints prunekit published for a base model, best first for a language.

    Lists the Hub repos whose card carries prunekit's tag and names BASE as base_model, reads the metrics in each
    card's model-index and ranks them by perplexity in --lang (lower is better). Each row shows the method,
    sparsity or bits, calibration set, perplexity and its ratio to the dense model, task scores in that language,
    downloads and last change. Cards without metrics come last, with the reason. `hub_cards/README.md` lists
    what prunekit writes into a card and what find reads.

    Example: prunekit find --base meta-llama/Meta-Llama-3-8B --lang sw   (then: prunekit pull --best-for sw --base …)
    """
    from prunekit.hub.find import find_checkpoints

    result = find_checkpoints(base, lang, method=method, author=author, endpoint=endpoint)
    if as_json:
        typer.echo(json.dumps(result.to_json(), indent=2))
        return
    label = result.lang or "mean"
    table = Table(title=f"prunekit checkpoints of {result.base}, ranked by {result.ranked_by}")
    for name, justify in (("#", "right"), ("repo", "left"), ("method", "left"), ("sparsity / bits", "left"),
                          ("calibration", "left"), (f"PPL {label}", "right"), ("× dense", "right"),
                          ("tasks" + (f" ({result.lang})" if result.lang else ""), "left"),
                          ("downloads", "right"), ("modified", "left")):
        table.add_column(name, justify=justify, overflow="fold")
    for row in result.rows:
        tasks = ", ".join(f"{k} {v:.1f}" for k, v in row.tasks.items()) or "-"
        table.add_row(str(row.rank) if row.rank else "-", row.repo_id, row.method or "?", row.recipe or "?",
                      row.calibration or "?", _num(row.perplexity) if row.rank else Text(row.reason or "", style="dim", justify="left"),
                      _num(row.ratio_to_dense, ".3f"), tasks, str(row.downloads if row.downloads is not None else "?"),
                      (row.last_modified or "?")[:10])
    stdout.print(table)
    if result.ranked:
        stdout.print(f"best: [bold]{result.ranked[0].repo_id}[/bold] — "
                     + (f"`prunekit pull --best-for {result.lang} --base {result.base}` downloads it"
                        if result.lang else f"`prunekit pull {result.ranked[0].repo_id}` downloads it"), highlight=False)
