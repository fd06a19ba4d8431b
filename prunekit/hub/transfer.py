"""Push a checkpoint with its card as one ``HfApi.create_commit``; pull it back with the one download path,
:func:`prunekit.remote.download_snapshot`. huggingface_hub skips the files the repo already holds and makes no
empty commit. The repo mirrors the checkpoint: files it no longer has are deleted in the same commit."""

from __future__ import annotations

import contextlib
import fnmatch
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prunekit.artifacts import CHECKPOINT_PATTERNS, RECORD_FILE, RESULTS_FILE, RESULTS_KIND, read_record
from prunekit.errors import ConfigError
from prunekit.hub.card import check_results_belong, render_model_card
from prunekit.hub.locate import locate
from prunekit.hub.names import default_repo_id, validate_namespace, validate_repo_id
from prunekit.hub.public import public_json, public_text
from prunekit.io import atomic_directory, read_versioned
from prunekit.remote import RetryPolicy, download_snapshot, hub_api, hub_call, resolve_endpoint

CARD_FILE = "README.md"
LINK_MIN_BYTES = 1 << 20  # staged files at least this big are linked, not copied


@dataclass
class FileStatus:
    path: str
    size: int
    status: str  # "new", "changed", "unchanged", "deleted", or "staged" (dry run)


@dataclass
class PushResult:
    repo_id: str
    endpoint: str
    revision: str
    url: str
    files: list[FileStatus]
    card: str
    dry_run: bool = False
    staging: Path | None = None
    commit: str | None = None  # the head commit after the push
    commit_url: str | None = None
    committed: bool = False  # False: nothing changed (or a dry run), no commit was made
    notes: list[str] = field(default_factory=list)  # which results push found and used, or which flag to add


@dataclass
class PullResult:
    repo_id: str
    endpoint: str
    revision: str  # the commit sha that was downloaded
    requested: str | None
    path: Path
    files: list[str] = field(default_factory=list)


def _managed(path: str) -> bool:
    return any(fnmatch.fnmatch(path, pattern) for pattern in CHECKPOINT_PATTERNS)


def _checkpoint_files(checkpoint: Path) -> dict[str, Path]:
    """The files of a checkpoint dir that go to the Hub (README.md is rendered, not copied; hidden files stay)."""
    files = {}
    for path in sorted(checkpoint.rglob("*")):
        rel = path.relative_to(checkpoint).as_posix()
        if path.is_file() and not any(part.startswith(".") for part in rel.split("/")) and rel != CARD_FILE and _managed(rel):
            files[rel] = path
    return files


def _published(rel: str, source: Path) -> Path | bytes:
    """A small JSON file as published (its local absolute paths replaced: :func:`public_json`), else the file."""
    if not rel.endswith(".json") or _size(source) >= LINK_MIN_BYTES:
        return source
    data = source.read_bytes()
    public = public_json(rel, data)
    return source if public == data else public


def _contents(files: dict[str, Path], card: str, results_bytes: bytes | None) -> dict[str, Path | bytes]:
    """What the repo holds after a push: path in the repo -> local file or bytes, sorted. No local absolute path
    is published: the JSON files and the card are sanitised (the checkpoint's own files stay as they are)."""
    contents: dict[str, Path | bytes] = {rel: _published(rel, source) for rel, source in files.items()}
    contents[CARD_FILE] = public_text(card, any_absolute=False).encode()
    if results_bytes is not None:
        contents[RESULTS_FILE] = public_json(RESULTS_FILE, results_bytes)
    return dict(sorted(contents.items()))


def _size(source: Path | bytes) -> int:
    return len(source) if isinstance(source, bytes) else source.stat().st_size


def _place(source: Path, target: Path) -> None:
    """Copy a small file (an edit of the copy must not reach the checkpoint); hard-link a big one (no second copy
    of multi-GB weights), else symlink it, else copy it."""
    if _size(source) >= LINK_MIN_BYTES:
        for link in (os.link, lambda s, t: t.symlink_to(s.resolve())):
            with contextlib.suppress(OSError):
                return link(source, target)
    shutil.copy2(source, target)


def stage_folder(files: dict[str, Path], card: str, results_bytes: bytes | None, staging: Path) -> None:
    """Write what a push would send into a folder (a dry run's staging).

    Args:
        files: the checkpoint's files to publish (path in the repo -> local file).
        card: the model card (README.md).
        results_bytes: a results.json to publish in place of the checkpoint's own, if any.
        staging: the folder to fill.
    """
    for rel, source in _contents(files, card, results_bytes).items():
        target = staging / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(source, bytes):
            target.write_bytes(source)
        else:
            _place(source, target)


def _read_json(path: Path, option: str) -> tuple[dict[str, Any], bytes]:
    if not path.is_file():
        raise ConfigError(f"{option} '{path}' does not exist")
    try:
        return read_versioned(path, RESULTS_KIND), path.read_bytes()
    except json.JSONDecodeError as err:
        raise ConfigError(f"{option} '{path}' is not valid JSON ({err})") from None


@dataclass
class PushPlan:
    """What a push sends, decided locally (no network): repo id, files, rendered card."""

    repo_id: str
    checkpoint: Path
    record: dict[str, Any]
    files: dict[str, Path]
    card: str
    results_bytes: bytes | None
    notes: list[str] = field(default_factory=list)  # which results were found and used, or which flag to add

    def contents(self) -> dict[str, Path | bytes]:
        return _contents(self.files, self.card, self.results_bytes)


@dataclass(frozen=True)
class PushTarget:
    """Where :func:`push` publishes: the repo, its visibility and its branch; checked once, when made.

    Args:
        repo_id (`str`, *optional*):
            The repo, ``namespace/name``. Defaults to the name :func:`~prunekit.hub.names.default_repo_id` gives the
            checkpoint in ``namespace``.
        namespace (`str`, *optional*):
            A Hub user or organization; the repo is then named ``{base}-{method}-{pattern}-calib-{langs}-s{seed}``.
            Ignored when ``repo_id`` is given.
        private (`bool`, *optional*, defaults to `False`):
            Create the repo private. An existing repo keeps its visibility.
        revision (`str`, *optional*):
            The branch to push to, created when missing. Defaults to ``"main"``.

    Raises:
        [`~prunekit.errors.ConfigError`]: neither ``repo_id`` nor ``namespace``, or one the Hub refuses.
    """

    repo_id: str | None = None
    namespace: str | None = None
    private: bool = False
    revision: str | None = None

    def __post_init__(self) -> None:
        if not (self.repo_id or self.namespace):
            raise ConfigError("say where to push: --repo-id NAMESPACE/NAME, or --namespace ORG for the default name")
        if self.repo_id:
            object.__setattr__(self, "repo_id", validate_repo_id(self.repo_id))
        elif self.namespace:
            object.__setattr__(self, "namespace", validate_namespace(self.namespace))

    def repo_for(self, record: dict[str, Any]) -> str:
        """The repo id for a checkpoint with this record: ``repo_id``, else its default name in ``namespace``."""
        return self.repo_id or default_repo_id(record, self.namespace)


@dataclass(frozen=True)
class CardInputs:
    """What the model card is made from besides the checkpoint's record.

    Args:
        results (`str` or `Path`, *optional*):
            The checkpoint's ``results.json``. Defaults to one found by :func:`prunekit.hub.locate.locate`:
            ``CHECKPOINT/results.json``, else a sweep's or the demo's run results beside the checkpoint.
        dense_results (`str` or `Path`, *optional*):
            The dense base model's ``results.json``; the card then shows deltas against it. Defaults to the sweep's
            dense evaluation of the base model, when the checkpoint is a sweep run's.
        base_model (`str`, *optional*):
            The base model's Hub id, when the checkpoint was pruned from a local copy. Defaults to what the record
            (or the base model's own card) says.
    """

    results: Path | None = None
    dense_results: Path | None = None
    base_model: str | None = None

    def __post_init__(self) -> None:
        for name in ("results", "dense_results"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, Path):
                object.__setattr__(self, name, Path(str(value)).expanduser())


def prepare_push(checkpoint: str | Path, target: PushTarget, card: CardInputs | None = None) -> PushPlan:
    """Read the checkpoint's record and results, name the repo and render the card, without the network.

    Args:
        checkpoint (`str` or `Path`):
            As for :func:`push`.
        target ([`PushTarget`]):
            Where the push goes (only its repo id is used here).
        card ([`CardInputs`], *optional*):
            Results, dense results and base model for the card. Defaults to those found beside the checkpoint.

    Returns:
        [`PushPlan`]: the repo id, the files, the rendered card and which results were used.

    Raises:
        [`~prunekit.errors.ConfigError`]: not a prunekit checkpoint, or results that are missing, invalid or
            another run's.
    """
    card = card or CardInputs()
    folder = Path(str(checkpoint)).expanduser()
    if folder.exists() and not folder.is_dir():
        raise ConfigError(f"'{checkpoint}' is a file; push takes a checkpoint directory written by prunekit prune")
    if not folder.exists():
        from prunekit.models import resolve_model  # a Hub id or embedded: spec

        folder = resolve_model(str(checkpoint)).path
    record = read_record(folder)
    if record is None:
        raise ConfigError(f"'{checkpoint}' has no {RECORD_FILE}: push publishes checkpoints written by `prunekit prune` "
                          "(their record is what the model card is made from)")
    repo_id = target.repo_for(record)
    found = locate(folder, record, card.results, card.dense_results)
    results_data, results_bytes, dense_data = None, None, None
    if found.results is not None:
        results_data, results_bytes = _read_json(found.results, "--results")
        check_results_belong(record, results_data, str(found.results))
    if found.dense_results is not None:
        if results_data is None:
            raise ConfigError("--dense-results needs the pruned model's results too (--results or CHECKPOINT/results.json)")
        dense_data, _ = _read_json(found.dense_results, "--dense-results")
    text = public_text(render_model_card(record, results_data, dense_data, repo_id, card.base_model), any_absolute=False)
    return PushPlan(repo_id, folder, record, _checkpoint_files(folder), text, results_bytes, found.notes)


def _staging_target(staging: str | Path | None, plan: PushPlan) -> Path:
    """Where a dry run writes; never over a directory that is not an earlier staging."""
    target = Path(staging) if staging else Path.cwd() / "hub-staging" / plan.repo_id.split("/")[-1]
    if target.exists():
        if not target.is_dir():
            raise ConfigError(f"--staging '{target}' is a file; give a directory")
        if target.resolve() == plan.checkpoint.resolve():
            raise ConfigError("--staging must not be the checkpoint directory itself; give another directory")
        entries = {p.name for p in target.iterdir()}
        if entries and not {CARD_FILE, RECORD_FILE} <= entries:
            raise ConfigError(f"--staging '{target}' is a non-empty directory that is not an earlier push staging; "
                              "give a new or empty directory")
    return target


def _remote_files(api, repo_id: str, revision: str) -> dict[str, Any]:
    from huggingface_hub.errors import RevisionNotFoundError
    from huggingface_hub.hf_api import RepoFile

    try:
        return {e.path: e for e in api.list_repo_tree(repo_id, revision=revision, recursive=True) if isinstance(e, RepoFile)}
    except RevisionNotFoundError:  # an empty repo
        return {}


def file_status(before: Any | None, after: Any | None) -> str:
    """A file's status in a push, from the repo's entries (``RepoFile``) before and after the commit.

    Args:
        before, after: the file's entry at the previous head and at the new one (None: absent).
    Returns:
        "new", "unchanged" (the same git blob: for LFS files, the pointer, which carries the content's sha256)
        or "changed".
    """
    if before is None:
        return "new"
    return "unchanged" if after is not None and after.blob_id == before.blob_id else "changed"


def _mirror_commit(api, plan: PushPlan, contents: dict[str, Path | bytes], revision: str) -> tuple[dict, list[str], Any]:
    """One commit making the repo mirror ``contents``: every file added (huggingface_hub skips unchanged ones) and
    the managed files the checkpoint no longer has deleted. A retry calls it again: it looks at the repo anew (the
    failed attempt may have landed) and builds new operations. Returns (files before, deleted, ``CommitInfo``)."""
    from huggingface_hub import CommitOperationAdd, CommitOperationDelete

    repo_id = plan.repo_id
    before = _remote_files(api, repo_id, revision)
    stale = [rel for rel in before if rel not in contents and _managed(rel)]
    operations = [CommitOperationAdd(rel, source) for rel, source in contents.items()]
    operations += [CommitOperationDelete(rel) for rel in stale]
    return before, stale, api.create_commit(
        repo_id, operations, revision=revision, commit_message=f"prunekit push: {repo_id.split('/')[-1]}",
        commit_description=f"run {plan.record.get('run_id')}; the model card says how to reproduce it")


def push(checkpoint: str | Path, target: PushTarget, card: CardInputs | None = None, *, dry_run: bool = False,
         staging: str | Path | None = None, endpoint: str | None = None, token: str | None = None,
         retry: RetryPolicy | None = None) -> PushResult:
    """Publish a pruned or quantized checkpoint with its model card, in one commit; what ``prunekit push`` does.

    The repo mirrors the checkpoint: its weight, config and tokenizer files, ``prunekit.json``, ``results.json`` (when
    there are results) and the card (``README.md``); files the checkpoint no longer has are deleted in the same
    commit. huggingface_hub skips files the repo already holds, so pushing an unchanged checkpoint makes no commit.
    What is published carries no local absolute path (the checkpoint on disk is untouched).

    Args:
        checkpoint (`str` or `Path`):
            A checkpoint directory written by ``prunekit prune`` or ``prunekit quantize`` (a sweep's or the demo's
            named link to one works too), or a Hub id / ``embedded:`` spec of one.
        target ([`PushTarget`]):
            The repo (``repo_id``, or the default name in ``namespace``), whether to create it ``private`` and the
            branch (``revision``, default ``"main"``).
        card ([`CardInputs`], *optional*):
            The ``results.json`` of the checkpoint and of the dense model, and the base model's Hub id, for the card.
            Defaults to the results found by :func:`prunekit.hub.locate.locate` (``CHECKPOINT/results.json``, else a
            sweep run's beside the checkpoint, and the sweep's dense evaluation); the result's ``notes`` say which
            were used, or which flag to add.
        dry_run (`bool`, *optional*, defaults to `False`):
            Write the files into ``staging`` and contact nothing.
        staging (`str` or `Path`, *optional*):
            Where a dry run writes. Defaults to ``./hub-staging/NAME``; never the checkpoint itself, nor a non-empty
            directory that is not an earlier staging.
        endpoint (`str`, *optional*):
            The Hub URL. Defaults to ``$HF_ENDPOINT``, else the public Hub.
        token (`str`, *optional*):
            The Hub token. Defaults to huggingface_hub's own (``HF_TOKEN`` or ``hf auth login``); never printed or
            written.
        retry ([`~prunekit.remote.RetryPolicy`], *optional*):
            How transient Hub failures are retried. Defaults to ``PRUNEKIT_HUB_RETRIES`` attempts, first delay
            ``PRUNEKIT_HUB_BACKOFF`` seconds.

    Returns:
        [`PushResult`]: the repo id, endpoint, branch and URL; each file's status (``new``, ``changed``,
        ``unchanged``, ``deleted``, or ``staged`` in a dry run); the card; the head commit (``committed`` is False
        when nothing changed); the staging folder of a dry run; and ``notes`` on the results used.

    Raises:
        [`~prunekit.errors.ConfigError`]:
            Not a prunekit checkpoint, results that are missing, invalid or another run's, dense results measured
            differently, or a bad ``staging``.
        [`~prunekit.errors.HubError`]:
            Offline mode, no or a rejected token, no permission, or a Hub that kept failing.

    Example:

    ```python
    >>> from prunekit.hub import PushTarget, push
    >>> result = push("prunekit-demo/checkpoints/wanda-sw", PushTarget(namespace="my-org"), dry_run=True)
    >>> result.repo_id, result.staging.name
    ('my-org/gemma-3-270m-wanda-50pct-calib-sw-s0', 'gemma-3-270m-wanda-50pct-calib-sw-s0')
    ```
    """
    endpoint, revision, private = resolve_endpoint(endpoint), target.revision or "main", target.private
    plan = prepare_push(checkpoint, target, card)
    repo_id, contents = plan.repo_id, plan.contents()
    url = f"{endpoint}/{repo_id}" + (f"/tree/{revision}" if revision != "main" else "")
    if dry_run:
        folder = _staging_target(staging, plan)
        with atomic_directory(folder, overwrite=True) as tmp:
            stage_folder(plan.files, plan.card, plan.results_bytes, tmp)
        files = [FileStatus(rel, _size(source), "staged") for rel, source in contents.items()]
        return PushResult(repo_id, endpoint, revision, url, files, plan.card, dry_run=True, staging=folder,
                          notes=plan.notes)

    api, token = hub_api(f"pushing {repo_id}", endpoint, token,
                         offline_hint="unset HF_HUB_OFFLINE to publish, or use --dry-run to stage the files",
                         requires_token=f"nothing can be pushed to {endpoint}")

    def call(what: str, fn):
        return hub_call(what, fn, repo_id=repo_id, endpoint=endpoint, token=token, retry=retry, revision=revision)

    call(f"creating {repo_id}", lambda: api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model"))
    if revision != "main":
        call(f"creating branch {revision}", lambda: api.create_branch(repo_id, branch=revision, exist_ok=True))

    before, stale, info = call(f"uploading to {repo_id}", lambda: _mirror_commit(api, plan, contents, revision))
    after = call(f"listing {repo_id}", lambda: _remote_files(api, repo_id, info.oid))
    files = [FileStatus(rel, _size(source), file_status(before.get(rel), after.get(rel))) for rel, source in contents.items()]
    files += [FileStatus(rel, before[rel].size, "deleted") for rel in stale]
    committed = any(f.status != "unchanged" for f in files)
    return PushResult(repo_id, endpoint, revision, url, files, plan.card, commit=info.oid,
                      commit_url=info.commit_url if committed else None, committed=committed, notes=plan.notes)


def pull(repo_id: str, revision: str | None = None, out: str | Path | None = None, endpoint: str | None = None,
         cache_dir: str | Path | None = None, token: str | None = None, retry: RetryPolicy | None = None) -> PullResult:
    """Download a checkpoint repo; what ``prunekit pull`` does.

    Every prunekit command also takes the Hub id in place of a checkpoint directory; pull is for a copy you keep.
    The download goes through :func:`prunekit.remote.download_snapshot`, the path every Hub id takes.

    Args:
        repo_id (`str`):
            The repo, ``namespace/name``.
        revision (`str`, *optional*):
            A branch, tag or commit. Defaults to ``"main"``.
        out (`str` or `Path`, *optional*):
            Download into this directory. Defaults to the Hub cache (``cache_dir``).
        endpoint (`str`, *optional*):
            The Hub URL. Defaults to ``$HF_ENDPOINT``, else the public Hub.
        cache_dir (`str` or `Path`, *optional*):
            The Hub cache to use when ``out`` is not given. Defaults to huggingface_hub's (``$HF_HUB_CACHE``).
        token (`str`, *optional*):
            The Hub token, for a private repo. Defaults to huggingface_hub's own; never printed or written.
        retry ([`~prunekit.remote.RetryPolicy`], *optional*):
            How transient Hub failures are retried. Defaults to ``PRUNEKIT_HUB_RETRIES`` /
            ``PRUNEKIT_HUB_BACKOFF``.

    Returns:
        [`PullResult`]: the repo id, endpoint, the commit downloaded (``revision``) and the one asked for
        (``requested``), the local directory and its files.

    Raises:
        [`~prunekit.errors.ConfigError`]:
            An invalid repo id or endpoint.
        [`~prunekit.errors.ModelError`]:
            The repo or revision does not exist, or is private.
        [`~prunekit.errors.HubError`]:
            Offline mode, a rejected token, or a Hub that kept failing.

    Example:

    ```python
    >>> from prunekit.hub import pull
    >>> result = pull("my-org/gemma-3-270m-wanda-50pct-calib-sw-s0", out="gemma-sw")
    >>> result.path, result.revision[:7]
    (PosixPath('gemma-sw'), '3f2c1ab')
    ```
    """
    repo_id, endpoint = validate_repo_id(repo_id), resolve_endpoint(endpoint)
    path, sha = download_snapshot(repo_id, revision, local_dir=out, cache_dir=cache_dir, endpoint=endpoint,
                                  token=token, retry=retry)
    files = sorted(rel for rel in (p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file())
                   if not rel.startswith("."))
    return PullResult(repo_id, endpoint, sha, revision, path, files)
