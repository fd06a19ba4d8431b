"""Repo ids: a run's default name, and the Hub's rules for namespaces and ids."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Any

from prunekit.errors import ConfigError

REPO_NAME_MAX = 96  # the Hub's limit on the name part of a repo id
_NAMESPACE = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9])?$")
_CACHE_DIR = re.compile(r"^models--([^/]+?)--([^/]+)$")


def _slug(text: str) -> str:
    """Lowercase, only [a-z0-9._-], no '--' or '..', starting and ending with a letter or digit."""
    text = re.sub(r"[^a-z0-9._-]+", "-", str(text).lower())
    text = re.sub(r"[-._]*-[-._]*", "-", text)  # any run of separators that contains '-' becomes one '-'
    text = re.sub(r"_{2,}", "_", re.sub(r"\.{2,}", ".", text))
    return text.strip("-._")


def hub_id_from_cache_path(path: str | None) -> str | None:
    """The Hub id of a huggingface_hub cache path.

    Args:
        path: a local path, e.g. '.../models--google--gemma-3-270m/snapshots/<sha>'.
    Returns:
        'google/gemma-3-270m' for that example; None for a path outside a Hub cache.
    """
    for part in Path(path).parts if path else ():
        match = _CACHE_DIR.match(part)
        if match:
            return f"{match.group(1)}/{match.group(2)}"
    return None


def base_model_name(record: dict[str, Any]) -> str:
    """The short name of a checkpoint's base model.

    Args:
        record: the checkpoint's ``prunekit.json``.
    Returns:
        'gemma-3-270m' for google/gemma-3-270m, embedded:gemma-3-270m or its Hub cache path; else the local
        directory's or GGUF file's own name.
    """
    base = record.get("base_model") or {}
    spec, kind = str(base.get("spec", "model")), base.get("kind")
    if kind == "embedded" or spec.startswith("embedded:"):
        return spec.split(":", 1)[1]
    if kind == "gguf":
        return Path(base.get("gguf_file") or spec).stem
    hub_id = hub_id_from_cache_path(base.get("path")) if kind == "local" else None
    return hub_id.split("/")[-1] if hub_id else (Path(spec.rstrip("/")).name or spec)


def recipe_slug(record: dict[str, Any]) -> str:
    """The recipe part of a repo name.

    Args:
        record: the checkpoint's ``prunekit.json``.
    Returns:
        '50pct' (unstructured), '2of4' (N:M) or 'w4g128' (a quantization).
    """
    recipe = record.get("recipe") or {}
    quant, pattern = recipe.get("quantization"), recipe.get("pattern") or {}
    if quant:
        group = quant.get("group_size")
        return f"w{quant.get('bits')}" + (f"g{group}" if group and group > 0 else "")
    if pattern.get("m"):
        return f"{pattern['n']}of{pattern['m']}"
    return f"{round(float(pattern.get('sparsity', 0.5)) * 100):d}pct"


def default_repo_id(record: dict[str, Any], namespace: str) -> str:
    """A run's repo id, ``{namespace}/{base}-{method}-{pattern}-calib-{langs}-s{seed}``: lowercase, deterministic,
    valid. Over the Hub's 96 characters, the base name is cut and six hex digits of the full name's hash added.

    Args:
        record: the checkpoint's ``prunekit.json``.
        namespace: the Hub user or organization.
    Returns:
        ``namespace/name``.
    Raises:
        ConfigError: the namespace is not valid on the Hub.
    """
    namespace = validate_namespace(namespace)
    calib = record.get("calibration")
    langs = "all" if (calib or {}).get("spec") == "all" else "-".join((calib or {}).get("languages") or ["x"])
    calib_part = f"calib-{langs}-s{calib.get('seed', 0)}" if calib else "nocalib"
    suffix = _slug(f"{(record.get('recipe') or {}).get('method', 'pruned')}-{recipe_slug(record)}-{calib_part}")
    base = _slug(base_model_name(record)) or "model"
    name = f"{base}-{suffix}"
    if len(name) > REPO_NAME_MAX:
        digest = hashlib.sha256(name.encode()).hexdigest()[:6]
        budget = REPO_NAME_MAX - len(suffix) - len(digest) - 2
        if budget >= 1:
            name = f"{_slug(base[:budget]) or 'm'}-{digest}-{suffix}"
        else:  # an absurdly long recipe part: keep what fits, still unique through the hash
            name = f"{_slug(name[: REPO_NAME_MAX - len(digest) - 1])}-{digest}"
    return validate_repo_id(f"{namespace}/{name}")


def validate_namespace(namespace: str) -> str:
    """Check a Hub user or organization name; return it stripped.

    Raises:
        ConfigError: it has characters the Hub refuses, or '--' / '..'.
    """
    namespace = (namespace or "").strip()
    if not _NAMESPACE.match(namespace) or "--" in namespace or ".." in namespace:
        raise ConfigError(
            f"invalid --namespace '{namespace}': use your Hub user or organization name "
            "(letters, digits, '-', '_', '.'; starting and ending with a letter or digit)"
        )
    return namespace


def validate_repo_id(repo_id: str) -> str:
    """Check ``namespace/name`` with huggingface_hub's own rules; return it stripped.

    Raises:
        ConfigError: it is not a valid ``namespace/name``.
    """
    from huggingface_hub.utils import HFValidationError
    from huggingface_hub.utils import validate_repo_id as hf_validate

    repo_id = (repo_id or "").strip()
    try:
        hf_validate(repo_id)
    except HFValidationError as err:
        raise ConfigError(f"invalid repo id '{repo_id}': {str(err).splitlines()[0]}") from None
    if repo_id.count("/") != 1:
        raise ConfigError(f"invalid repo id '{repo_id}': give it as NAMESPACE/NAME, e.g. my-org/{repo_id or 'model'}")
    return repo_id
