"""What ``prunekit eval`` does when it is not told: where its results go, and which dense model it compares
against (the base model the checkpoint's record names, when it is on this machine; never a download).

Both are decided before any work, each with a one-line reason the command prints.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from prunekit.artifacts import RESULTS_FILE
from prunekit.errors import PrunekitError
from prunekit.models import ModelSource



def default_results_path(source: ModelSource) -> tuple[Path | None, str]:
    """``CHECKPOINT/results.json`` for a local checkpoint dir this user can write to (where ``prunekit push``
    finds it), else None; with the line saying which, or why not and what to add."""
    if source.kind != "local":
        what = {"hub": "a Hub id", "gguf": "a .gguf file", "embedded": "an embedded model"}.get(source.kind, source.kind)
        return None, f"results: not saved ({source.spec} is {what}, not a checkpoint dir); add --out RESULTS.json to keep them"
    directory = Path(source.path)
    if not os.access(directory, os.W_OK | os.X_OK):
        return None, f"results: not saved ({directory} is not writable); add --out RESULTS.json to keep them"
    target = directory / RESULTS_FILE
    return target, f"results: {target} (the default, where `prunekit push` finds them; --out PATH writes elsewhere)"


def _hub_cached(repo_id: str, revision: str | None) -> Path | None:
    """The Hugging Face cache's snapshot dir of ``repo_id`` at ``revision`` (its config.json there), no network."""
    from huggingface_hub import try_to_load_from_cache

    try:
        found = try_to_load_from_cache(repo_id, "config.json", revision=revision)
    except Exception:  # a malformed id or cache: not available, which is all this asks
        return None
    return Path(found).parent if isinstance(found, str) else None


def _usable(path: Path) -> bool:
    from prunekit.models import check_model_files

    try:
        check_model_files(path)
    except PrunekitError:
        return False
    return True


def recorded_base(record: dict[str, Any] | None) -> tuple[ModelSource | None, str]:
    """The base model the checkpoint's record (prunekit.json) names, as a source to use as the dense reference
    when it is available offline: a local dir that still exists, an ``embedded:`` model, a GGUF file (or its
    conversion in the cache), or a Hub id already in the Hugging Face cache. Else None. With the line to print."""
    base = (record or {}).get("base_model") or {}
    spec, kind = base.get("spec"), base.get("kind")
    if not spec:
        return None, "dense reference: none (no prunekit.json naming a base model); add --dense MODEL for SNR / pruning error"
    why = "the base model recorded in prunekit.json"
    missing = f"dense reference: none (the recorded base model {spec} is not on this machine{{}}); add --dense MODEL for SNR / pruning error"
    if kind == "embedded":
        return _resolved(spec, f"dense reference: {spec} ({why})", missing)
    if kind == "gguf":
        gguf = Path(base.get("gguf_file") or spec)
        if gguf.is_file():  # converted once, in the cache (already, when the checkpoint was pruned here)
            return _resolved(str(gguf), f"dense reference: {gguf} ({why})", missing)
        converted = Path(base.get("path") or "")
        if base.get("path") and _usable(converted):
            return _resolved(str(converted), f"dense reference: {spec}, as converted in the cache {converted} ({why})", missing)
        return None, missing.format("")
    if kind == "hub":
        snapshot = _hub_cached(spec, base.get("revision"))
        if snapshot is not None and _usable(snapshot):
            return ModelSource(spec, snapshot, "hub", revision=base.get("revision")), \
                f"dense reference: {spec}{'@' + base['revision'][:12] if base.get('revision') else ''} ({why}, from the Hugging Face cache; nothing downloaded)"
        return None, missing.format(", not in the Hugging Face cache, and eval downloads nothing unasked; "
                                    f"--dense {spec} downloads it")
    path = Path(base.get("path") or spec)
    if path.is_dir():
        return _resolved(str(path), f"dense reference: {path} ({why})", missing)
    return None, missing.format(f": {path} no longer exists")


def _resolved(spec: str, line: str, missing: str) -> tuple[ModelSource | None, str]:
    from prunekit.models import resolve_model

    try:
        return resolve_model(spec), line
    except PrunekitError as err:
        return None, missing.format(f": {err}")
