"""A sweep's leaderboard as a static Hugging Face Space: ``report.html`` as ``index.html``, ``results.csv`` and the
heatmaps, with a Space README, in one ``create_commit`` (huggingface_hub skips what the Space already holds).
The page must work there as it does locally: :func:`external_requests` finds anything in it that would load from
the network, and a page with such a thing is not published."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from prunekit.errors import ConfigError
from prunekit.hub.names import validate_repo_id
from prunekit.remote import RetryPolicy, hub_api, hub_call, resolve_endpoint

PAGE, LEADERBOARD_CSV, FIGURES = "report.html", "results.csv", "heatmaps"
# What makes a browser fetch something by itself: resource attributes, CSS url()/@import, scripts' own requests.
_EXTERNAL = [
    re.compile(r"""\b(?:src|srcset|poster|data|action|background)\s*=\s*["']?\s*(?:https?:)?//[^\s"'>]+""", re.I),
    re.compile(r"""<link\b[^>]*\bhref\s*=\s*["']?\s*(?:https?:)?//[^\s"'>]+""", re.I),
    re.compile(r"""url\(\s*["']?\s*(?:https?:)?//[^)\s"']+""", re.I),
    re.compile(r"""@import\b[^;]*""", re.I),
    re.compile(r"""\b(?:fetch\s*\(|XMLHttpRequest|WebSocket\s*\(|EventSource\s*\(|navigator\.sendBeacon|import\s*\()""")]


@dataclass
class SpaceResult:
    repo_id: str
    url: str
    commit: str | None
    files: list[str] = field(default_factory=list)


def external_requests(html: str) -> list[str]:
    """What in a page would make the browser reach the network by itself (links a user clicks do not count).

    Args:
        html: the page.
    Returns:
        The offending snippets; empty for a self-contained page.
    """
    return [match.group(0)[:120] for pattern in _EXTERNAL for match in pattern.finditer(html)]


def space_readme(title: str) -> str:
    """The Space's README: its configuration (a static Space serving index.html) and a line about it."""
    safe = re.sub(r"[\"\\\n]", " ", title)[:60]
    return (f"---\ntitle: \"{safe}\"\nemoji: 📊\ncolorFrom: blue\ncolorTo: green\nsdk: static\napp_file: index.html\n"
            f"pinned: false\ntags:\n- prunekit\n- leaderboard\n---\n\n# {safe}\n\nThe leaderboard of a prunekit sweep: "
            "one row per published checkpoint, ranked per evaluation language. `results.csv` holds the same rows; "
            "`heatmaps/` the figures. Made with prunekit "
            "(`prunekit report RUNS --out DIR --push ORG/NAME`).\n")


def report_files(report_dir: Path, title: str) -> dict[str, bytes | Path]:
    """The Space's files from a report directory (path in the Space -> content).

    Raises:
        ConfigError: the directory has no report.html / results.csv.
        RuntimeError: the page would load something from the network (a prunekit bug).
    """
    page, table = report_dir / PAGE, report_dir / LEADERBOARD_CSV
    if not page.is_file() or not table.is_file():
        raise ConfigError(f"'{report_dir}' has no {PAGE} and {LEADERBOARD_CSV}; write the report first "
                          "(prunekit report RUNS --out DIR)")
    html = page.read_text(encoding="utf-8")
    found = external_requests(html)
    if found:
        raise RuntimeError(f"{page} would load from the network ({found[0]}); a hosted page must be self-contained "
                           "(a prunekit bug)")
    files: dict[str, bytes | Path] = {"README.md": space_readme(title).encode(), "index.html": html.encode(),
                                      LEADERBOARD_CSV: table}
    for figure in sorted((report_dir / FIGURES).glob("*")) if (report_dir / FIGURES).is_dir() else []:
        if figure.is_file() and figure.suffix.lower() in (".png", ".svg", ".jpg"):
            files[f"{FIGURES}/{figure.name}"] = figure
    return files


def push_report_space(report_dir: str | Path, repo_id: str, title: str | None = None, private: bool = False,
                      endpoint: str | None = None, token: str | None = None,
                      retry: RetryPolicy | None = None) -> SpaceResult:
    """Publish a written report as a static Space, in one commit.

    Args:
        report_dir: the ``prunekit report --out`` directory.
        repo_id: the Space, ``ORG/NAME`` (created when missing).
        title: the Space's title (default: its name).
        private: create the Space private (an existing one keeps its visibility).
        endpoint, token, retry: as for :func:`prunekit.hub.push`.
    Returns:
        The Space, its URL, the head commit and the files it holds from the report.
    Raises:
        ConfigError: an invalid id or a directory without a report.
        HubError: offline mode, no token, or a Hub that refused or kept failing.
    """
    from huggingface_hub import CommitOperationAdd

    repo_id, endpoint = validate_repo_id(repo_id), resolve_endpoint(endpoint)
    files = report_files(Path(report_dir), title or repo_id.split("/")[1])
    api, token = hub_api(f"publishing the Space {repo_id}", endpoint, token, offline_hint="unset HF_HUB_OFFLINE to publish",
                         requires_token=f"the Space {repo_id} cannot be published at {endpoint}")

    def call(what: str, fn):
        return hub_call(what, fn, repo_id=repo_id, endpoint=endpoint, token=token, retry=retry)

    call(f"creating the Space {repo_id}", lambda: api.create_repo(repo_id, repo_type="space", space_sdk="static",
                                                                  private=private, exist_ok=True))
    info = call(f"uploading the leaderboard to {repo_id}", lambda: api.create_commit(
        repo_id, [CommitOperationAdd(path, content) for path, content in files.items()], repo_type="space",
        commit_message="prunekit report: the sweep's leaderboard"))
    return SpaceResult(repo_id, f"{endpoint}/spaces/{repo_id}", info.oid, sorted(files))
