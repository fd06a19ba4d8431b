"""What ``prunekit eval`` uses when it is not told: where the results go, and the dense reference.

Both are chosen from the checkpoint itself, here in the library (the CLI prints the line each returns):

- **results**: a local checkpoint dir keeps its evaluation beside its weights, ``CHECKPOINT/results.json``,
  where ``prunekit push`` finds it. A Hub id, a ``.gguf`` file, an ``embedded:`` model or a dir that cannot be
  written to gets ``./<name>.results.json`` in the current directory.
- **dense reference**: the base model the checkpoint's record (``prunekit.json``) names, when it is there
  without a download: a local dir or ``.gguf`` file that still exists, an ``embedded:`` model whose package is
  installed, or a Hub id already in the Hugging Face cache. Nothing is downloaded unless ``--dense`` asks.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from prunekit.artifacts import RESULTS_FILE, read_record
from prunekit.models import EMBEDDED_PREFIX, ModelSource

__all__ = ["default_results_path", "recorded_dense"]


def _slug(spec: str) -> str:
    name = Path(spec.rstrip("/")).name if not spec.startswith(EMBEDDED_PREFIX) else spec[len(EMBEDDED_PREFIX):]
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-.") or "model"


def default_results_path(checkpoint: str | Path) -> tuple[Path, str]:
    """Where ``eval`` writes its results when ``--out`` is not given, and the line saying so."""
    path = Path(str(checkpoint)).expanduser()
    if path.is_dir() and os.access(path, os.W_OK):
        return path / RESULTS_FILE, f"results: {path / RESULTS_FILE} (beside the checkpoint, where push finds them; --out to choose)"
    target = Path.cwd() / f"{_slug(str(checkpoint))}.results.json"
    why = "the checkpoint dir is not writable" if path.is_dir() else "the checkpoint is not a local dir"
    return target, f"results: {target} ({why}; --out to choose)"


def _hub_snapshot(repo_id: str, revision: str | None) -> Path | None:
    """The Hugging Face cache's snapshot dir of ``repo_id`` at ``revision``, when its config is there; no network."""
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(repo_id, "config.json", revision=revision)
    return Path(found).parent if isinstance(found, str) else None


def recorded_dense(checkpoint: str | Path) -> tuple[str | ModelSource | None, str | None]:
    """The dense model to compare ``checkpoint`` with when ``--dense`` is not given: the base its record names,
    if that is available offline (see the module's docstring), and the line saying what was chosen and why. A Hub
    base comes as the ``ModelSource`` of its cached snapshot, so that using it asks the Hub nothing.
    (None, None) for a checkpoint with no record (a dense model itself, or one from elsewhere)."""
    path = Path(str(checkpoint)).expanduser()
    record: dict[str, Any] | None = read_record(path) if path.is_dir() else None
    base = (record or {}).get("base_model") or {}
    spec, kind = base.get("spec"), base.get("kind")
    if not spec:
        return None, None
    chosen = "the base the checkpoint's record names (--dense to choose, --no-dense for none)"
    if kind == "embedded":
        from prunekit.embedded import EMBEDDED_MODELS

        name = spec[len(EMBEDDED_PREFIX):]
        try:
            __import__(EMBEDDED_MODELS[name])
        except (KeyError, ImportError):
            return None, f"no SNR / pruning error: the recorded base {spec} is not installed (pip install 'prunekit[demo]'), or give --dense"
        return spec, f"dense reference: {spec}, {chosen}"
    if kind in ("local", "gguf"):
        local = base.get("gguf_file") if kind == "gguf" else base.get("path")
        if local and Path(local).exists():
            return local, f"dense reference: {local}, {chosen}"
        return None, f"no SNR / pruning error: the recorded base {spec} is no longer at {local}; give --dense PATH"
    if kind == "hub":
        revision = base.get("revision")
        snapshot = _hub_snapshot(spec, revision)
        if snapshot is not None:
            return ModelSource(spec, snapshot, "hub", revision=revision), f"dense reference: {spec} (in the Hugging Face cache), {chosen}"
        return None, f"no SNR / pruning error: the recorded base {spec} is not in the Hugging Face cache; give --dense {spec} to download it"
    return None, None
