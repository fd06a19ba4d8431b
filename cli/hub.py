"""``prunekit push`` and ``prunekit pull``."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from prunekit.cli.app import app, user_errors

stdout = Console()

STATUS_STYLE = {"new": "green", "changed": "yellow", "deleted": "red", "unchanged": "dim", "staged": "cyan"}


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


@app.command()
@user_errors
def push(
    checkpoint: str = typer.Argument(..., help="Checkpoint directory written by `prunekit prune` (or a Hub id)."),
    repo_id: Optional[str] = typer.Option(None, "--repo-id", help="Target repo NAMESPACE/NAME (overrides the default name)."),
    namespace: Optional[str] = typer.Option(None, "--namespace", help="User or org: the repo is named {base}-{method}-{pattern}-calib-{langs}-s{seed}."),
    private: bool = typer.Option(False, "--private", help="Create the repo private (an existing repo keeps its visibility)."),
    revision: Optional[str] = typer.Option(None, "--revision", help="Branch to push to (created if missing); default main."),
    endpoint: Optional[str] = typer.Option(None, "--endpoint", help="Hub URL (default: $HF_ENDPOINT or https://huggingface.co)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Write the staging folder and list what would be sent; contact nothing."),
    results: Optional[Path] = typer.Option(None, "--results", help="results.json of this checkpoint (default: CHECKPOINT/results.json, else a sweep's or the demo's run results beside the checkpoint; push says which it used)."),
    dense_results: Optional[Path] = typer.Option(None, "--dense-results", help="results.json of the dense base model: the card shows deltas against it (default: a sweep's dense evaluation of the base model, when the checkpoint is a sweep run's)."),
    base_model: Optional[str] = typer.Option(None, "--base-model", help="Hub id of the base model, when the checkpoint was pruned from a local copy."),
    staging: Optional[Path] = typer.Option(None, "--staging", help="Where --dry-run writes the staging folder (default ./hub-staging/NAME)."),
) -> None:
    """Publish a pruned checkpoint to the Hugging Face Hub with a model card made from its record and results.

    The card (README.md) carries the recipe, every measured result (also as model-index metadata), the exact
    command that reproduces the checkpoint, and how to load it. Pushing an unchanged folder makes no commit.
    The token comes from HF_TOKEN or `hf auth login` and is never printed or stored. The repo mirrors the
    checkpoint: weight, config and tokenizer files it no longer has are deleted in the same commit. Transient
    Hub errors are retried (PRUNEKIT_HUB_RETRIES attempts, first delay PRUNEKIT_HUB_BACKOFF seconds).

    A sweep's or the demo's checkpoint (RUNS/runs/<hash>/checkpoint) is published with the results beside it and
    the sweep's dense results, found without flags; push says which files it used, or which flag to add.

    Example: prunekit push gemma-sw --namespace my-org --results gemma-sw/results.json --dense-results dense.json
    """
    from prunekit.hub import CardInputs, PushTarget
    from prunekit.hub import push as run_push

    target = PushTarget(repo_id=repo_id, namespace=namespace, private=private, revision=revision)
    card = CardInputs(results=results, dense_results=dense_results, base_model=base_model)
    result = run_push(checkpoint, target, card, dry_run=dry_run, staging=staging, endpoint=endpoint)
    for note in result.notes:
        stdout.print(note, markup=False, highlight=False)
    table = Table(title=f"{result.repo_id} @ {result.revision}")
    table.add_column("file")
    table.add_column("size", justify="right")
    table.add_column("status")
    for item in result.files:
        style = STATUS_STYLE.get(item.status, "")
        table.add_row(item.path, _size(item.size), f"[{style}]{item.status}[/{style}]" if style else item.status)
    stdout.print(table)
    if result.dry_run:
        total = sum(item.size for item in result.files)
        stdout.print(
            f"dry run: {len(result.files)} files ({_size(total)}) staged in [bold]{result.staging}[/bold]; "
            f"nothing was sent. Push for real to create {result.url}"
        )
    elif result.committed:
        stdout.print(f"pushed commit [bold]{result.commit}[/bold]: {result.commit_url or result.url}")
    else:
        stdout.print(f"unchanged: {result.url} already holds these files (head {result.commit}); no commit made")


@app.command()
@user_errors
def pull(
    repo_id: Optional[str] = typer.Argument(None, help="Hub repo id, e.g. my-org/gemma-3-270m-wanda-50pct-calib-sw-s0 (or use --best-for)."),
    revision: Optional[str] = typer.Option(None, "--revision", help="Branch, tag or commit (default main)."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Download into this directory (default: the Hub cache)."),
    endpoint: Optional[str] = typer.Option(None, "--endpoint", help="Hub URL (default: $HF_ENDPOINT or https://huggingface.co)."),
    best_for: Optional[str] = typer.Option(None, "--best-for", help="Instead of a repo id: the checkpoint of --base with the lowest perplexity in this language (as `prunekit find --lang` ranks them), pinned to its commit."),
    base: Optional[str] = typer.Option(None, "--base", help="With --best-for: Hub id of the base model."),
) -> None:
    """Download a pruned checkpoint (weights, config, tokenizer, prunekit.json, results.json, card).

    Any command that takes a checkpoint also takes the Hub id directly; pull is for a copy you keep.
    With --best-for LANG --base MODEL it chooses for you: the top of `prunekit find --base MODEL --lang LANG`,
    downloaded at the commit the listing saw, and says which one it chose and why.

    Examples: prunekit pull my-org/gemma-3-270m-wanda-50pct-calib-sw-s0 --out gemma-sw
              prunekit pull --best-for sw --base meta-llama/Meta-Llama-3-8B --out llama-sw
    """
    from prunekit.errors import ConfigError

    if best_for is not None or base is not None:
        if repo_id is not None or revision is not None or best_for is None or base is None:
            raise ConfigError("--best-for LANG needs --base MODEL and replaces the repo id and --revision: "
                              "prunekit pull --best-for sw --base meta-llama/Meta-Llama-3-8B")
        from prunekit.hub.find import pull_best

        best = pull_best(best_for, base, out=out, endpoint=endpoint)
        stdout.print(f"chose [bold]{best.chosen.repo_id}[/bold] @ {best.revision}: {best.why}", highlight=False)
        stdout.print(f"pulled into [bold]{best.path}[/bold] ({len(best.files)} files: {', '.join(best.files)})")
        return
    if repo_id is None:
        raise ConfigError("say what to pull: a repo id (prunekit pull ORG/NAME), or --best-for LANG --base MODEL")
    from prunekit.hub import pull as run_pull

    result = run_pull(repo_id, revision=revision, out=out, endpoint=endpoint)
    stdout.print(
        f"pulled {result.repo_id} @ [bold]{result.revision}[/bold] into [bold]{result.path}[/bold] "
        f"({len(result.files)} files: {', '.join(result.files)})"
    )
