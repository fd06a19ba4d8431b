"""Publish pruned checkpoints to the Hugging Face Hub and fetch them back.

- :func:`default_repo_id` names a run's repo deterministically from its ``prunekit.json``.
- :func:`render_model_card` turns ``prunekit.json`` (+ ``results.json``, + the dense model's results) into a
  README.md from ``hub_cards/model_card.md.j2``; :func:`validate_model_card` parses it back with
  huggingface_hub's card classes. :func:`render_collection_readme` renders a sweep's report README.
- :func:`push` stages the checkpoint with its card and uploads it (``create_repo`` + ``upload_folder``);
  an unchanged folder makes no commit, transient errors are retried, the token is never printed or written.
- :func:`pull` downloads a repo (``snapshot_download`` with :data:`prunekit.artifacts.CHECKPOINT_PATTERNS`).

The endpoint is ``endpoint=`` / ``--endpoint``, else ``$HF_ENDPOINT`` read at call time, else the public Hub.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import logging
import math
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, TypeVar

from prunekit.artifacts import CHECKPOINT_PATTERNS, RECORD_FILE, RESULTS_FILE, RESULTS_KIND, read_record
from prunekit.errors import ConfigError, ModelError, PrunekitError
from prunekit.io import atomic_directory, cache_dir, read_versioned, write_text_atomic

log = logging.getLogger("prunekit.hub")
T = TypeVar("T")

# The files of a checkpoint repo: what push sends and pull / resolve_model download (README.md is the card).
HUB_ALLOW_PATTERNS = CHECKPOINT_PATTERNS
REPO_NAME_MAX = 96  # the Hub's limit on the name part of a repo id
CARD_FILE = "README.md"
LOGIN_HINT = "log in with `hf auth login` or set HF_TOKEN (tokens: https://huggingface.co/settings/tokens; pushing needs write access)"
TRANSIENT_STATUS = {408, 429, 500, 502, 503, 504}
METHOD_NAMES = {"wanda": "Wanda", "sparsegpt": "SparseGPT", "magnitude": "magnitude pruning", "gptq": "GPTQ"}
STUDY_PROMPTS = {
    "ar": "عاصمة ألمانيا هي", "de": "Die Hauptstadt von Deutschland ist", "en": "The capital of Germany is",
    "es": "La capital de Alemania es", "ru": "Столица Германии —", "sw": "Mji mkuu wa Ujerumani ni",
    "zh": "德国的首都是",
}
# Public Hub datasets behind the study's tasks (eval-and-hub.md §1): (English dataset, other languages).
TASK_DATASETS = {
    "arc": ("allenai/ai2_arc", "alexandrainst/m_arc"),
    "hellaswag": ("Rowan/hellaswag", "alexandrainst/m_hellaswag"),
    "mmlu": ("cais/mmlu", "alexandrainst/m_mmlu"),
    "m_mmlu": ("alexandrainst/m_mmlu", "alexandrainst/m_mmlu"),
    "belebele": ("facebook/belebele", "facebook/belebele"),
    "mkqa": ("apple/mkqa", "apple/mkqa"),
    "xcopa": ("cambridgeltl/xcopa", "cambridgeltl/xcopa"),
    "mgsm": ("juletxara/mgsm", "juletxara/mgsm"),
}
QA_METRICS = {"f1", "exact_match", "em"}
# model-index groups results by task type and dataset, so perplexity and hidden-state metrics on the same
# evaluation text share one task entry (and one name, or the name would not round-trip).
TEXT_TASK = "Language modelling"


# ---------------------------------------------------------------------------------------------
# Names
# ---------------------------------------------------------------------------------------------

_NAMESPACE = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9])?$")


def _slug(text: str) -> str:
    """Lowercase, only [a-z0-9._-], no '--' or '..', starting and ending with a letter or digit."""
    text = re.sub(r"[^a-z0-9._-]+", "-", str(text).lower())
    text = re.sub(r"[-._]*-[-._]*", "-", text)  # any run of separators that contains '-' becomes one '-'
    text = re.sub(r"\.{2,}", ".", text)
    text = re.sub(r"_{2,}", "_", text)
    return text.strip("-._")


def base_model_name(record: dict[str, Any]) -> str:
    """The short name of the base model: 'gemma-3-270m' for google/gemma-3-270m or embedded:gemma-3-270m."""
    base = record.get("base_model") or {}
    spec = str(base.get("spec", "model"))
    kind = base.get("kind")
    if kind == "embedded" or spec.startswith("embedded:"):
        return spec.split(":", 1)[1]
    if kind == "gguf":
        return Path(base.get("gguf_file") or spec).stem
    hub_id = _hub_id_from_cache_path(base.get("path")) if kind == "local" else None
    if hub_id:
        return hub_id.split("/")[-1]
    return Path(spec.rstrip("/")).name or spec


def _recipe_slug(record: dict[str, Any]) -> str:
    recipe = record.get("recipe") or {}
    quant = recipe.get("quantization")
    if quant:
        group = quant.get("group_size")
        return f"w{quant.get('bits')}" + (f"g{group}" if group and group > 0 else "")
    pattern = recipe.get("pattern") or {}
    if pattern.get("m"):
        return f"{pattern['n']}of{pattern['m']}"
    return f"{round(float(pattern.get('sparsity', 0.5)) * 100):d}pct"


def _calib_slug(record: dict[str, Any]) -> str:
    calib = record.get("calibration")
    if not calib:
        return "nocalib"
    langs = "all" if calib.get("spec") == "all" else "-".join(calib.get("languages") or ["x"])
    return f"calib-{langs}-s{calib.get('seed', 0)}"


def default_repo_id(record: dict[str, Any], namespace: str) -> str:
    """``{namespace}/{base-name}-{method}-{pattern}-calib-{langs}-s{seed}``: lowercase, deterministic, valid.

    A name over the Hub's 96 characters keeps the recipe part whole and truncates the base name, adding six
    hex digits of the full name's hash so that different long names stay different.
    """
    namespace = validate_namespace(namespace)
    recipe = record.get("recipe") or {}
    suffix = _slug(f"{recipe.get('method', 'pruned')}-{_recipe_slug(record)}-{_calib_slug(record)}")
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
    namespace = (namespace or "").strip()
    if not _NAMESPACE.match(namespace) or "--" in namespace or ".." in namespace:
        raise ConfigError(
            f"invalid --namespace '{namespace}': use your Hub user or organization name "
            "(letters, digits, '-', '_', '.'; starting and ending with a letter or digit)"
        )
    return namespace


def validate_repo_id(repo_id: str) -> str:
    """Check ``namespace/name`` with huggingface_hub's own rules (96 characters, valid characters only)."""
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


# ---------------------------------------------------------------------------------------------
# What the card says
# ---------------------------------------------------------------------------------------------

_CACHE_DIR = re.compile(r"^models--([^/]+?)--([^/]+)$")


def _hub_id_from_cache_path(path: str | None) -> str | None:
    """'.../models--google--gemma-3-270m/snapshots/<sha>' -> 'google/gemma-3-270m'."""
    if not path:
        return None
    for part in Path(path).parts:
        match = _CACHE_DIR.match(part)
        if match:
            return f"{match.group(1)}/{match.group(2)}"
    return None


def base_model_readme(record: dict[str, Any]) -> Path | None:
    """The base model's README.md when it is available locally (local dir, Hub snapshot, GGUF dir, embedded)."""
    base = record.get("base_model") or {}
    candidates = []
    spec = str(base.get("spec", ""))
    if base.get("kind") == "embedded" or spec.startswith("embedded:"):
        try:
            from importlib import resources

            from prunekit.embedded import EMBEDDED_MODELS

            package = EMBEDDED_MODELS.get(spec.split(":", 1)[-1])
            if package:
                candidates.append(Path(str(resources.files(package).joinpath("data", "README.upstream.md"))))
        except (ImportError, ModuleNotFoundError, TypeError):
            pass
    if base.get("gguf_file"):
        candidates.append(Path(base["gguf_file"]).parent / "README.md")
    if base.get("path"):
        candidates.append(Path(base["path"]) / "README.md")
    return next((path for path in candidates if path.is_file()), None)


def base_model_metadata(record: dict[str, Any]) -> dict[str, Any]:
    """The YAML front matter of the base model's README (empty when there is none)."""
    from huggingface_hub.repocard import metadata_load

    readme = base_model_readme(record)
    if readme is None:
        return {}
    try:
        return metadata_load(readme) or {}
    except Exception:  # a malformed upstream card must not block publishing; the card says what is missing
        log.warning("could not parse the front matter of %s; license and languages are not inherited", readme)
        return {}


def base_model_id(record: dict[str, Any], metadata: dict[str, Any] | None = None) -> str | None:
    """The Hub id of the base model, when it is known: a Hub spec, a Hub cache path, or a conversion's card."""
    base = record.get("base_model") or {}
    kind = base.get("kind")
    if kind == "hub":
        return base.get("spec")
    if kind == "local":
        return _hub_id_from_cache_path(base.get("path"))
    if kind in ("embedded", "gguf"):  # a conversion: its card names the model it was converted from
        upstream = (metadata or {}).get("base_model")
        if isinstance(upstream, list) and len(upstream) == 1:
            upstream = upstream[0]
        return upstream if isinstance(upstream, str) else None
    return None


_LOCAL_PATH = re.compile(r"^(?:~|[A-Za-z]:[\\/]|/)")
# An absolute path inside text: '/' or '~/' not preceded by what makes it part of a URL, a word or a tag.
_PATH_IN_TEXT = re.compile(r"(?<![\w:/.<~\-])~?/[^\s/`'\"|)<>\]]+(?:/[^\s/`'\"|)<>\]]*)+")


def public_location(value: Any) -> Any:
    """What a card may say of a location: keywords (embedded, mc4), Hub ids and URLs as they are; a local
    absolute path only as its last component (a card never publishes where files lie on a machine)."""
    if isinstance(value, str) and _LOCAL_PATH.match(value):
        return Path(value.rstrip("/\\")).name or value
    return value


def _public_json(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _public_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_public_json(v) for v in value]
    return public_location(value)


def _public_text(text: str) -> str:
    """Every absolute local path in ``text`` replaced by its last component."""
    return _PATH_IN_TEXT.sub(lambda m: Path(m.group(0).rstrip("/")).name, text)


def _public_command(command: str, base_kind: str | None, base_name: str) -> str:
    """The reproduce command without local paths: the model argument is the Hub id when known, else the
    local directory's name; any other absolute path is its last component."""
    import shlex

    try:
        parts = shlex.split(command)
    except ValueError:
        return _public_text(command)
    if len(parts) > 2 and parts[0] == "prunekit" and base_kind in ("local", "gguf"):
        parts[2] = base_name
    return shlex.join(public_location(p) for p in parts)


def _as_list(value: Any) -> list[str]:
    if value is None:
        return []
    return [str(v) for v in value] if isinstance(value, (list, tuple)) else [str(value)]


def _language_name(code: str) -> str:
    try:
        from prunekit.languages import get_language

        name = get_language(code).name
        return code if name == code else name
    except PrunekitError:
        return code


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _perplexity_dataset(source: str | None, lang: str) -> tuple[str, str, str]:
    """(dataset type, dataset name, split) for a perplexity text source."""
    source = str(source or "unknown")
    if source == "mc4":
        return "allenai/c4", f"mC4 ({lang})", "validation"
    if source == "embedded":
        return "prunekit-embedded-texts", f"prunekit embedded texts ({lang})", "evaluation"
    return "local", f"{Path(source).name or source} ({lang})", "evaluation"


def _task_dataset(task: str, group: str | None, language: str | None) -> str:
    key = (group or "").lower()
    if key not in TASK_DATASETS:
        key = next((k for k in sorted(TASK_DATASETS, key=len, reverse=True) if task.lower().startswith(k)), "")
    if key:
        english, other = TASK_DATASETS[key]
        return english if (language or "en") == "en" else other
    return task


def _check_results_belong(record: dict[str, Any], results: dict[str, Any], path: str) -> None:
    model_record = (results.get("model") or {}).get("record")
    run_id = model_record.get("run_id") if isinstance(model_record, dict) else model_record
    if run_id and record.get("run_id") and run_id != record["run_id"]:
        raise ConfigError(
            f"{path} was measured on run {run_id}, not on this checkpoint (run {record['run_id']}); "
            "pass the results.json of this checkpoint with --results"
        )


def _check_dense_results(results: dict[str, Any], dense: dict[str, Any]) -> None:
    model = dense.get("model") or {}
    if model.get("record"):
        raise ConfigError(
            "--dense-results holds the results of a pruned checkpoint (it has a prunekit record); "
            "pass the results.json measured on the dense base model"
        )
    expected = results.get("dense") or {}
    if expected.get("revision") and model.get("revision") and expected["revision"] != model["revision"]:
        raise ConfigError(
            f"--dense-results were measured on revision {model['revision']}, but these results compare against "
            f"revision {expected['revision']} of the dense model; pass the matching dense results"
        )
    for lang, row in (results.get("perplexity") or {}).items():
        other = (dense.get("perplexity") or {}).get(lang)
        if not other:
            continue
        for key in ("seqlen", "source"):
            if row.get(key) is not None and other.get(key) is not None and row[key] != other[key]:
                raise ConfigError(
                    f"--dense-results measured {lang} perplexity with {key}={other[key]!r}, the pruned model with "
                    f"{key}={row[key]!r}; deltas would be meaningless: evaluate both with the same settings"
                )


@dataclass
class CardContent:
    """Everything the model card shows, before templating: front matter and the body's tables."""

    card_data: Any  # huggingface_hub.ModelCardData
    eval_results: list[Any]  # huggingface_hub.EvalResult
    context: dict[str, Any]


def build_card_content(
    record: dict[str, Any],
    results: dict[str, Any] | None = None,
    dense_results: dict[str, Any] | None = None,
    repo_id: str = "namespace/model",
    base_model: str | None = None,
) -> CardContent:
    """Front matter (ModelCardData with a model-index of every measured result) and the body's context."""
    from huggingface_hub import EvalResult, ModelCardData

    if results is not None:
        _check_results_belong(record, results, RESULTS_FILE)
    if results is not None and dense_results is not None:
        _check_dense_results(results, dense_results)
    repo_name = repo_id.split("/")[-1]
    recipe = record.get("recipe") or {}
    method = recipe.get("method", "unknown")
    kind = recipe.get("kind") or ("quantize" if recipe.get("quantization") else "prune")
    pattern = recipe.get("pattern") or {}
    calib = record.get("calibration")
    base = record.get("base_model") or {}
    metadata = base_model_metadata(record)
    hub_base = base_model or base_model_id(record, metadata)
    if hub_base is not None:
        hub_base = validate_repo_id(hub_base)

    calib_langs = list((calib or {}).get("languages") or [])
    languages: list[str] = []
    for code in _as_list(metadata.get("language")) + calib_langs:
        code = code.split("-")[0].lower()
        if code and code not in languages:
            languages.append(code)

    license_id = metadata.get("license")
    license_note = None
    if not license_id:
        license_note = (
            "License: the base model's card was not available when this repo was published, so no license is "
            "declared here; the base model's license applies — check its card."
        )

    tags = ["pruned", "sparse"] if kind != "quantize" else ["quantized", f"{(recipe.get('quantization') or {}).get('bits')}-bit"]
    tags.append(method)
    checkpoint_format = (record.get("quantization") or {}).get("format") if kind == "quantize" else "dense"
    if checkpoint_format == "pack-quantized":
        tags.append("compressed-tensors")
    if kind != "quantize":
        tags.append(f"{pattern['n']}of{pattern['m']}-sparsity" if pattern.get("m") else "unstructured-sparsity")
    tags += [f"calibration-{code}" for code in calib_langs]
    tags.append("prunekit")
    datasets = ["allenai/c4"] if (calib or {}).get("source") == "mc4" else None

    # --- results -> tables and model-index entries
    eval_results = []
    perplexity_rows, hidden_rows, task_rows, per_layer = [], [], [], []
    has_dense_numbers = dense_results is not None
    has_stderr = False
    res = results or {}
    dres = dense_results or {}
    for lang, row in (res.get("perplexity") or {}).items():
        dtype_, dname, split = _perplexity_dataset(row.get("source"), lang)
        dense_ppl = ((dres.get("perplexity") or {}).get(lang) or {}).get("ppl")
        ppl = row.get("ppl")
        delta = ppl - dense_ppl if _finite(ppl) and _finite(dense_ppl) else None
        perplexity_rows.append({
            "lang": lang, "name": _language_name(lang), "ppl": ppl, "nll": row.get("nll"),
            "tokens": row.get("tokens"), "windows": row.get("windows"), "seqlen": row.get("seqlen"),
            "source": public_location(row.get("source")), "location": public_location(row.get("location")),
            "dense_ppl": dense_ppl, "delta": delta,
            "delta_pct": 100.0 * delta / dense_ppl if delta is not None and dense_ppl else None,
        })
        if _finite(ppl):
            eval_results.append(EvalResult(
                task_type="text-generation", task_name=TEXT_TASK, dataset_type=dtype_,
                dataset_name=dname, dataset_config=lang, dataset_split=split, metric_type="perplexity",
                metric_name=f"Perplexity ({lang})", metric_value=float(ppl),
            ))
    for lang, row in (res.get("hidden_states") or {}).items():
        source = ((res.get("perplexity") or {}).get(lang) or {}).get("source")
        dtype_, dname, split = _perplexity_dataset(source, lang)
        layers = row.get("per_layer") or {}
        hidden_rows.append({
            "lang": lang, "name": _language_name(lang), "snr_db": row.get("snr_db"),
            "pruning_error": row.get("pruning_error"), "tokens": row.get("tokens"),
            "snr_layers": list(layers.get("snr_db") or []), "error_layers": list(layers.get("pruning_error") or []),
        })
        for metric, key, label in (("snr", "snr_db", "Hidden-state SNR, dB"), ("pruning_error", "pruning_error", "Pruning error")):
            if _finite(row.get(key)):
                eval_results.append(EvalResult(
                    task_type="text-generation", task_name=TEXT_TASK,
                    dataset_type=dtype_, dataset_name=dname, dataset_config=lang, dataset_split=split,
                    metric_type=metric, metric_name=f"{label} ({lang})", metric_value=float(row[key]),
                ))
    n_layers = max((max(len(r["snr_layers"]), len(r["error_layers"])) for r in hidden_rows), default=0)
    for index in range(n_layers):
        per_layer.append({"index": index, "cells": [
            {"snr": r["snr_layers"][index] if index < len(r["snr_layers"]) else None,
             "error": r["error_layers"][index] if index < len(r["error_layers"]) else None}
            for r in hidden_rows
        ]})
    for task, row in (res.get("tasks") or {}).items():
        dense_row = (dres.get("tasks") or {}).get(task) or {}
        metrics = []
        for name, value in (row.get("metrics") or {}).items():
            stderr = (row.get("stderr") or {}).get(name)
            stderr = stderr if _finite(stderr) else None
            has_stderr = has_stderr or stderr is not None
            dense_value = (dense_row.get("metrics") or {}).get(name)
            scale = _metric_scale(name)
            metrics.append({
                "name": name, "value": value, "stderr": stderr, "dense": dense_value, "scale": scale,
                "delta": scale * (value - dense_value) if _finite(value) and _finite(dense_value) else None,
            })
            if row.get("status", "ok") == "ok" and _finite(value):
                language = row.get("language")
                eval_results.append(EvalResult(
                    task_type="question-answering" if name.split(",")[0] in QA_METRICS else "multiple-choice",
                    task_name=row.get("group") or task,
                    dataset_type=_task_dataset(task, row.get("group"), language), dataset_name=task,
                    dataset_config=language, dataset_split="test", metric_type=name,
                    metric_name=f"{name} ({task})", metric_value=float(value),
                ))
        task_rows.append({
            "task": task, "group": row.get("group"), "language": row.get("language"),
            "status": row.get("status", "ok"), "note": row.get("note") or "", "samples": row.get("samples"),
            "metrics": metrics,
        })

    card_data = ModelCardData(
        base_model=hub_base,
        language=languages or None,
        license=license_id,
        license_name=metadata.get("license_name") if license_id == "other" else None,
        license_link=metadata.get("license_link") if license_id == "other" else None,
        library_name="transformers",
        pipeline_tag="text-generation",
        tags=tags,
        datasets=datasets,
        model_name=repo_name if eval_results else None,  # model-index needs a name; otherwise leave it out
        eval_results=eval_results or None,
    )

    spec = str(base.get("spec", ""))
    local_base = base.get("kind") in ("local", "gguf") or bool(_LOCAL_PATH.match(spec))
    public_spec = base_model_name(record) if local_base else spec
    calibration = None
    if calib:
        names = [f"{_language_name(c)} (`{c}`)" if _language_name(c) != c else f"`{c}`" for c in calib_langs]
        calibration = {
            "display": ("all seven study languages (" + ", ".join(calib_langs) + ")") if calib.get("spec") == "all"
            else " + ".join(names),
            "nsamples": calib.get("nsamples"), "seqlen": calib.get("seqlen"),
            "source": public_location(calib.get("source")),
            "seed": calib.get("seed"), "languages": calib_langs,
        }
    sparsity = float(pattern.get("sparsity") or 0.0)
    if pattern.get("m"):
        description = (f"{pattern['n']}:{pattern['m']} semi-structured: {pattern['n']} of every {pattern['m']} "
                       f"consecutive weights in each row of every decoder linear layer are zero ({sparsity:.0%})")
        pattern_display = f"{pattern['n']}:{pattern['m']} semi-structured ({sparsity:.0%})"
    else:
        description = f"unstructured, {sparsity:.0%} of the weights of every decoder linear layer"
        pattern_display = f"{sparsity:.0%} unstructured"
    dense = res.get("dense") or ((dres.get("model") or {}) and {"spec": dres["model"].get("spec"), "revision": dres["model"].get("revision")})
    if dense:
        dense = {**dense, "spec": public_location(dense.get("spec"))}
    prompt_lang = calib_langs[0] if calib_langs else "en"
    context = {
        "repo_id": repo_id, "repo_name": repo_name, "kind": kind,
        "base": {"id": hub_base, "spec": public_spec, "revision": base.get("revision"), "kind": base.get("kind"),
                 "local": local_base, "display": hub_base or base_model_name(record)},
        "method": {"name": method, "display": METHOD_NAMES.get(method, method)},
        "pattern": {**pattern, "display": pattern_display, "description": description},
        "quantization": recipe.get("quantization"),
        "checkpoint": {"format": checkpoint_format,
                       "kept_dense": [entry["name"] for entry in (record.get("quantization") or {}).get("kept_dense") or []
                                      if entry["name"] != "lm_head"]},
        "calibration": calibration,
        "sparsity": {"overall": (record.get("sparsity") or {}).get("overall"),
                     "per_module": (record.get("sparsity") or {}).get("per_module") or {}},
        "skip_layers": record.get("skip_layers") or [],
        "dtype": base.get("dtype") or (record.get("identity") or {}).get("dtype"),
        "versions": record.get("versions") or {"prunekit": record.get("prunekit_version", "?")},
        "conventions": (record.get("conventions") or {}).get("name", "prunekit"),
        "run_id": record.get("run_id"), "created": record.get("created"),
        "command": _public_command(record.get("command") or "(the record has no command)", base.get("kind"),
                                   hub_base or base_model_name(record)),
        "license": {"id": license_id, "note": license_note},
        "has_results": results is not None,
        "results_version": res.get("prunekit_version", ""),
        "dense": dense or None,
        "has_dense_numbers": has_dense_numbers,
        "perplexity": perplexity_rows, "hidden": hidden_rows, "per_layer": per_layer, "tasks": task_rows,
        "has_stderr": has_stderr,
        "settings_json": json.dumps(_public_json({"settings": res.get("settings"), "versions": res.get("versions"),
                                                  "created": res.get("created")}), indent=2, ensure_ascii=False, default=str),
        "prompt": STUDY_PROMPTS.get(prompt_lang, STUDY_PROMPTS["en"]),
    }
    return CardContent(card_data, eval_results, context)


def _num(value: Any, spec: str = ".2f") -> str:
    if value is None:
        return "n/a"
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return format(value, spec)
    return str(value)


def _signed(value: Any, spec: str = "+.2f") -> str:
    return _num(value, spec)


def _pct(value: Any) -> str:
    return "n/a" if value is None else _num(100.0 * value, ".2f") + "%"


def _points(value: Any) -> str:
    return "n/a" if value is None else _num(100.0 * value, ".2f")


def _scaled(value: Any, scale: float) -> str:
    return "n/a" if value is None else _num(scale * value, ".2f")


def _metric_scale(name: str) -> float:
    """Fractions (accuracy, F1, exact match) are shown in points; perplexity-like task metrics as they are."""
    base = name.split(",")[0]
    return 1.0 if ("perplexity" in base or "bits_per_byte" in base or base.startswith(("bleu", "chrf", "ter"))) else 100.0


def template_environment():
    """The Jinja2 environment of the card templates (trimmed blocks, strict variables, number filters)."""
    import jinja2

    env = jinja2.Environment(
        loader=jinja2.FunctionLoader(_load_template), undefined=jinja2.StrictUndefined,
        trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True, autoescape=False,
    )
    env.filters.update(num=_num, signed=_signed, pct=_pct, points=_points, scaled=_scaled)
    return env


def _load_template(name: str) -> str:
    from prunekit.hub_cards import template_text

    return template_text(name)


def _tidy(text: str) -> str:
    return re.sub(r"\n{3,}", "\n\n", text).rstrip() + "\n"


def render_model_card(
    record: dict[str, Any],
    results: dict[str, Any] | None = None,
    dense_results: dict[str, Any] | None = None,
    repo_id: str = "namespace/model",
    base_model: str | None = None,
) -> str:
    """The README.md of a pruned checkpoint's repo, validated with huggingface_hub before it is returned."""
    from prunekit.hub_cards import MODEL_CARD

    content = build_card_content(record, results, dense_results, repo_id, base_model)
    text = template_environment().get_template(MODEL_CARD).render(
        card_data=content.card_data.to_yaml(), **content.context
    )
    text = _tidy(_public_text(text))  # the net under the fields above: no local absolute path on a card
    validate_model_card(text, content.eval_results)
    return text


def _eval_key(result) -> tuple:
    return (result.task_type, str(result.task_name), result.dataset_type, result.dataset_name,
            str(result.dataset_config), result.metric_type, str(result.metric_name))


def validate_model_card(text: str, expected_eval_results: list[Any] | None = None):
    """Parse the card with huggingface_hub's ModelCard; check its model-index round-trips every result."""
    from huggingface_hub import ModelCard
    from huggingface_hub.repocard_data import model_index_to_eval_results

    card = ModelCard(text, ignore_metadata_errors=False)
    data = card.data.to_dict()
    for key in ("library_name", "pipeline_tag", "tags"):
        if not data.get(key):
            raise RuntimeError(f"model card lacks '{key}' (a prunekit bug)")
    if expected_eval_results:
        model_index = data.get("model-index")
        if not model_index:
            raise RuntimeError("model card lost its model-index (a prunekit bug)")
        _, parsed = model_index_to_eval_results(model_index)
        got = sorted(parsed, key=_eval_key)
        want = sorted(expected_eval_results, key=_eval_key)
        if got != want:
            raise RuntimeError("the model card's model-index does not round-trip its results (a prunekit bug)")
    return card


def _run_row(entry: dict[str, Any]) -> dict[str, Any]:
    record = entry.get("record")
    results = entry.get("results") or {}
    repo_id = entry.get("repo_id")
    if record is None:  # the dense baseline
        model = results.get("model") or {}
        name = entry.get("name") or f"{Path(str(model.get('spec', 'dense'))).name} (dense)"
        row = {"name": name, "repo_id": repo_id, "base": model.get("spec", ""), "method": "dense", "pattern": "-",
               "calibration": "-", "seed": "-", "sparsity": 0.0}
    else:
        recipe = record.get("recipe") or {}
        calib = record.get("calibration") or {}
        pattern = recipe.get("pattern") or {}
        name = entry.get("name") or (repo_id.split("/")[-1] if repo_id else record.get("run_id", "run"))
        row = {
            "name": name, "repo_id": repo_id, "base": base_model_name(record), "method": recipe.get("method", ""),
            "pattern": (f"{pattern.get('n')}:{pattern.get('m')}" if pattern.get("m")
                        else (f"unstructured {float(pattern.get('sparsity', 0)):.0%}" if pattern else _recipe_slug(record))),
            "calibration": "+".join(calib.get("languages") or []) or "none",
            "seed": calib.get("seed", "-"), "sparsity": (record.get("sparsity") or {}).get("overall"),
        }
    row["ppl"] = {lang: r.get("ppl") for lang, r in (results.get("perplexity") or {}).items()}
    row["snr"] = {lang: r.get("snr_db") for lang, r in (results.get("hidden_states") or {}).items()}
    row["tasks"] = {}
    for task, r in (results.get("tasks") or {}).items():
        for metric, value in (r.get("metrics") or {}).items():
            row["tasks"][f"{task}/{metric}"] = value if r.get("status", "ok") == "ok" else None
    return row


def render_collection_readme(
    runs: Iterable[dict[str, Any]],
    title: str = "prunekit sweep",
    description: str = "Pruned models from one prunekit sweep, with every run's measured results.",
    tags: Iterable[str] = (),
) -> str:
    """README.md for a sweep's collection / report repo.

    ``runs``: one dict per run with ``record`` (its prunekit.json; None for the dense baseline), ``results``
    (its results.json or None) and optionally ``repo_id`` and ``name``.
    """
    from huggingface_hub import CardData, RepoCard

    from prunekit.hub_cards import COLLECTION_README

    runs = list(runs)
    rows = [_run_row(entry) for entry in runs]
    ppl_langs, snr_langs, task_cols = [], [], []
    languages, bases, methods, calibrations = [], [], [], []
    for entry, row in zip(runs, rows):
        for lang in row["ppl"]:
            ppl_langs.append(lang) if lang not in ppl_langs else None
        for lang in row["snr"]:
            snr_langs.append(lang) if lang not in snr_langs else None
        for key in row["tasks"]:
            if key not in [c["key"] for c in task_cols]:
                task, metric = key.rsplit("/", 1)
                task_cols.append({"key": key, "task": task, "metric": metric})
        record = entry.get("record") or {}
        for code in (record.get("calibration") or {}).get("languages") or []:
            languages.append(code) if code not in languages else None
        for value, seen in ((row["base"], bases), (row["method"], methods), (row["calibration"], calibrations)):
            if value and value not in seen and value != "-":
                seen.append(value)
    card_data = CardData(tags=["prunekit", "pruning", *tags], language=languages or None)
    text = template_environment().get_template(COLLECTION_README).render(
        card_data=card_data.to_yaml(), title=title, description=description, runs=rows,
        ppl_languages=ppl_langs, snr_languages=snr_langs, task_columns=task_cols,
        bases=bases or ["-"], methods=methods or ["-"], calibrations=calibrations or ["-"],
    )
    text = _tidy(text)
    RepoCard(text, ignore_metadata_errors=False)  # parses, or raises: a prunekit bug
    return text


# ---------------------------------------------------------------------------------------------
# Staging
# ---------------------------------------------------------------------------------------------

def hub_patterns() -> list[str]:
    return list(HUB_ALLOW_PATTERNS)


def _managed(path: str, patterns: list[str]) -> bool:
    return any(fnmatch.fnmatch(path, pattern) for pattern in patterns)


def checkpoint_files(checkpoint: Path) -> dict[str, Path]:
    """Files of a checkpoint dir that go to the Hub (HUB_ALLOW_PATTERNS; README.md is rendered, not copied)."""
    patterns = hub_patterns()
    files = {}
    for path in sorted(checkpoint.rglob("*")):
        rel = path.relative_to(checkpoint).as_posix()
        if any(part.startswith(".") for part in rel.split("/")) or not path.is_file():
            continue
        if rel != CARD_FILE and _managed(rel, patterns):
            files[rel] = path
    return files


LINK_MIN_BYTES = 1 << 20  # staged files at least this big are linked, not copied


def _place(source: Path, target: Path) -> None:
    """Copy small files (an edit in the staging folder must not reach the checkpoint); hard-link big ones
    (no second copy of multi-GB weights), else symlink, else copy."""
    target.parent.mkdir(parents=True, exist_ok=True)
    if source.stat().st_size < LINK_MIN_BYTES:
        shutil.copy2(source, target)
        return
    try:
        os.link(source, target)
        return
    except OSError:
        pass
    try:
        target.symlink_to(source.resolve())
        return
    except OSError:
        pass
    shutil.copy2(source, target)


def stage_folder(files: dict[str, Path], card: str, results_bytes: bytes | None, staging: Path) -> None:
    for rel, source in files.items():
        if rel == RESULTS_FILE and results_bytes is not None:
            continue
        _place(source, staging / rel)
    if results_bytes is not None:
        (staging / RESULTS_FILE).write_bytes(results_bytes)
    write_text_atomic(staging / CARD_FILE, card)


def _staged_sizes(staging: Path) -> dict[str, int]:
    return {p.relative_to(staging).as_posix(): p.stat().st_size for p in sorted(staging.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------------------------------------
# Transport: endpoint, token, retries
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class RetryPolicy:
    """Retries of transient Hub errors (5xx, 408, 429, timeouts, dropped connections) with exponential backoff."""

    attempts: int = 5
    backoff_s: float = 1.0
    max_backoff_s: float = 30.0

    @classmethod
    def from_env(cls) -> "RetryPolicy":
        """``PRUNEKIT_HUB_RETRIES`` (attempts) and ``PRUNEKIT_HUB_BACKOFF`` (first delay, seconds)."""
        try:
            return cls(int(os.environ.get("PRUNEKIT_HUB_RETRIES", 5)), float(os.environ.get("PRUNEKIT_HUB_BACKOFF", 1.0)))
        except ValueError as err:
            raise ConfigError(f"PRUNEKIT_HUB_RETRIES / PRUNEKIT_HUB_BACKOFF must be numbers ({err})") from None

    def delay(self, attempt: int) -> float:
        return min(self.backoff_s * 2 ** (attempt - 1), self.max_backoff_s)


def resolve_endpoint(endpoint: str | None = None) -> str:
    """``endpoint``, else ``$HF_ENDPOINT`` (read now, not at import), else https://huggingface.co."""
    value = endpoint or os.environ.get("HF_ENDPOINT") or "https://huggingface.co"
    if not re.match(r"^https?://[^\s/]+", value):
        raise ConfigError(f"invalid --endpoint '{value}': give a URL such as https://huggingface.co")
    return value.rstrip("/")


def _chain(err: BaseException) -> Iterable[BaseException]:
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        yield err
        err = err.__cause__ or err.__context__


def _status(err: BaseException) -> int | None:
    for e in _chain(err):
        response = getattr(e, "response", None)
        status = getattr(response, "status_code", None)
        if isinstance(status, int):
            return status
    return None


def _transient_types() -> tuple[type, ...]:
    try:
        import httpx2 as httpx
    except ImportError:  # older huggingface_hub uses httpx
        import httpx
    return (httpx.TimeoutException, httpx.NetworkError, httpx.RemoteProtocolError, TimeoutError, ConnectionError)


def _is_transient(err: BaseException) -> bool:
    status = _status(err)
    if status is not None:
        return status in TRANSIENT_STATUS
    kinds = _transient_types()
    return any(isinstance(e, kinds) for e in _chain(err))


def _redact(text: str, token: str | None) -> str:
    return text.replace(token, "hf_***") if token else text


def _describe(err: BaseException, token: str | None) -> str:
    status = _status(err)
    server = getattr(err, "server_message", None)
    head = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    text = f"{status} {server}".strip() if status and server else head
    return _redact(text, token)


def _offline_error(what: str, endpoint: str, hint: str) -> PrunekitError:
    return PrunekitError(f"offline mode (HF_HUB_OFFLINE=1) is on, so {what} cannot reach the Hub at {endpoint}; {hint}")


def check_online(what: str, endpoint: str, hint: str) -> None:
    """Fail at once in offline mode: no request is made, so there is nothing to retry."""
    from huggingface_hub import constants

    if constants.is_offline_mode() if hasattr(constants, "is_offline_mode") else constants.HF_HUB_OFFLINE:
        raise _offline_error(what, endpoint, hint)


def _with_retries(what: str, call: Callable[[], T], retry: RetryPolicy, endpoint: str, token: str | None) -> T:
    """Run one Hub call; retry transient failures; turn auth and other HTTP failures into PrunekitError."""
    from huggingface_hub.errors import LocalTokenNotFoundError, OfflineModeIsEnabled

    attempt = 1
    while True:
        try:
            return call()
        except PrunekitError:
            raise
        except OfflineModeIsEnabled:  # a ConnectionError, but nothing a retry can fix
            raise _offline_error(what, endpoint, "unset HF_HUB_OFFLINE to reach the Hub") from None
        except LocalTokenNotFoundError:
            raise PrunekitError(f"not logged in to the Hub at {endpoint} while {what}; {LOGIN_HINT}") from None
        except Exception as err:  # noqa: BLE001 - classified below; anything unexpected is re-raised
            status = _status(err)
            if status == 401:
                raise PrunekitError(
                    f"the Hub at {endpoint} rejected the token while {what} (401 Unauthorized); {LOGIN_HINT}"
                ) from None
            if status == 403:
                raise PrunekitError(
                    f"the token may not do this at {endpoint} while {what} (403 Forbidden): use a token with write "
                    "access to that namespace (https://huggingface.co/settings/tokens), or choose a --namespace you own"
                ) from None
            if not _is_transient(err):
                raise
            if attempt >= retry.attempts:
                raise PrunekitError(
                    f"the Hub at {endpoint} kept failing while {what} ({_describe(err, token)}; {attempt} attempts); "
                    "try again later"
                ) from None
            delay = retry.delay(attempt)
            log.warning("transient Hub error while %s (%s); retrying in %.2g s (attempt %d of %d)",
                        what, _describe(err, token), delay, attempt + 1, retry.attempts)
            time.sleep(delay)
            attempt += 1


def _http_error(what: str, err: BaseException, endpoint: str, token: str | None) -> PrunekitError:
    return PrunekitError(f"the Hub at {endpoint} refused {what}: {_describe(err, token)}")


# ---------------------------------------------------------------------------------------------
# push / pull
# ---------------------------------------------------------------------------------------------

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


def _git_blob_sha1(path: Path) -> str:
    digest = hashlib.sha1(b"blob %d\0" % path.stat().st_size)
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _same_as_remote(local: Path, remote) -> bool:
    """Size first (free), then the content hash the Hub stores: sha256 for LFS/Xet files, git blob sha1 else."""
    if remote is None or local.stat().st_size != remote.size:
        return False
    if remote.lfs is not None:
        return _sha256(local) == remote.lfs.sha256
    return _git_blob_sha1(local) == remote.blob_id


def _compare(staging: Path, remote: dict[str, Any], patterns: list[str]) -> list[FileStatus]:
    statuses = []
    for rel, size in _staged_sizes(staging).items():
        entry = remote.get(rel)
        status = "new" if entry is None else ("unchanged" if _same_as_remote(staging / rel, entry) else "changed")
        statuses.append(FileStatus(rel, size, status))
    staged = {s.path for s in statuses}
    for rel, entry in sorted(remote.items()):
        if rel not in staged and (rel == CARD_FILE or _managed(rel, patterns)):
            statuses.append(FileStatus(rel, entry.size, "deleted"))
    return statuses


def _load_checkpoint(checkpoint: str | Path) -> Path:
    path = Path(str(checkpoint)).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise ConfigError(f"'{checkpoint}' is a file; push takes a checkpoint directory written by prunekit prune")
    from prunekit.models import resolve_model  # a Hub id or embedded: spec

    return resolve_model(str(checkpoint)).path


def _read_json(path: Path, kind: str, option: str) -> tuple[dict[str, Any], bytes]:
    if not path.is_file():
        raise ConfigError(f"{option} '{path}' does not exist")
    raw = path.read_bytes()
    try:
        return read_versioned(path, kind), raw
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


def prepare_push(
    checkpoint: str | Path,
    repo_id: str | None = None,
    namespace: str | None = None,
    results: str | Path | None = None,
    dense_results: str | Path | None = None,
    base_model: str | None = None,
) -> PushPlan:
    """Read the checkpoint's record and results, name the repo and render the card (no network)."""
    folder = _load_checkpoint(checkpoint)
    record = read_record(folder)
    if record is None:
        raise ConfigError(
            f"'{checkpoint}' has no {RECORD_FILE}: push publishes checkpoints written by `prunekit prune` "
            "(their record is what the model card is made from)"
        )
    if repo_id:
        repo_id = validate_repo_id(repo_id)
    elif namespace:
        repo_id = default_repo_id(record, namespace)
    else:
        raise ConfigError("say where to push: --repo-id NAMESPACE/NAME, or --namespace ORG for the default name")
    results_path = Path(results) if results else (folder / RESULTS_FILE)
    results_data, results_bytes = None, None
    if results or results_path.is_file():
        results_data, results_bytes = _read_json(results_path, RESULTS_KIND, "--results")
        _check_results_belong(record, results_data, str(results_path))
    dense_data = None
    if dense_results:
        if results_data is None:
            raise ConfigError("--dense-results needs the pruned model's results too (--results or CHECKPOINT/results.json)")
        dense_data, _ = _read_json(Path(dense_results), RESULTS_KIND, "--dense-results")
    card = render_model_card(record, results_data, dense_data, repo_id, base_model)
    return PushPlan(repo_id, folder, record, checkpoint_files(folder), card, results_bytes)


def _staging_target(staging: str | Path | None, plan: PushPlan) -> Path:
    """Where a dry run writes its staging folder; never over a directory that is not an earlier staging."""
    target = Path(staging) if staging else Path.cwd() / "hub-staging" / plan.repo_id.split("/")[-1]
    if target.exists():
        if not target.is_dir():
            raise ConfigError(f"--staging '{target}' is a file; give a directory")
        if target.resolve() == plan.checkpoint.resolve():
            raise ConfigError("--staging must not be the checkpoint directory itself; give another directory")
        entries = {p.name for p in target.iterdir()}
        if entries and not {CARD_FILE, RECORD_FILE} <= entries:
            raise ConfigError(
                f"--staging '{target}' is a non-empty directory that is not an earlier push staging; "
                "give a new or empty directory"
            )
    return target


def _get_token(token: str | None) -> str | None:
    if token:
        return token
    from huggingface_hub import get_token

    return get_token()


def push(
    checkpoint: str | Path,
    repo_id: str | None = None,
    namespace: str | None = None,
    private: bool = False,
    revision: str | None = None,
    endpoint: str | None = None,
    dry_run: bool = False,
    results: str | Path | None = None,
    dense_results: str | Path | None = None,
    base_model: str | None = None,
    staging: str | Path | None = None,
    token: str | None = None,
    retry: RetryPolicy | None = None,
) -> PushResult:
    """Publish a pruned checkpoint with its model card; mirrors ``prunekit push``.

    The repo mirrors the checkpoint: weight, config and tokenizer files (HUB_ALLOW_PATTERNS) that the remote has
    but the checkpoint lacks are deleted in the same commit. When every file is already on the Hub with the same
    content, no commit is made (``committed`` is False and ``commit`` is the current head).
    """
    retry = retry or RetryPolicy.from_env()
    endpoint = resolve_endpoint(endpoint)
    revision = revision or "main"
    plan = prepare_push(checkpoint, repo_id, namespace, results, dense_results, base_model)
    repo_id, card = plan.repo_id, plan.card
    url = f"{endpoint}/{repo_id}" + (f"/tree/{revision}" if revision != "main" else "")

    if dry_run:
        target = _staging_target(staging, plan)
        with atomic_directory(target, overwrite=True) as tmp:
            stage_folder(plan.files, card, plan.results_bytes, tmp)
        statuses = [FileStatus(rel, size, "staged") for rel, size in _staged_sizes(target).items()]
        return PushResult(repo_id, endpoint, revision, url, statuses, card, dry_run=True, staging=target)

    check_online(f"pushing {repo_id}", endpoint, "unset HF_HUB_OFFLINE to publish, or use --dry-run to stage the files")
    token = _get_token(token)
    if not token:
        raise PrunekitError(f"no Hub token found, so nothing can be pushed to {endpoint}; {LOGIN_HINT}")
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError, RevisionNotFoundError

    from prunekit import __version__

    api = HfApi(endpoint=endpoint, token=token, library_name="prunekit", library_version=__version__)
    patterns = hub_patterns()

    def call(what: str, fn: Callable[[], T]) -> T:
        try:
            return _with_retries(what, fn, retry, endpoint, token)
        except (HfHubHTTPError, ValueError) as err:
            raise _http_error(what, err, endpoint, token) from None

    def remote_tree() -> dict[str, Any]:
        try:
            return {e.path: e for e in api.list_repo_tree(repo_id, revision=revision, recursive=True)
                    if hasattr(e, "blob_id")}
        except RevisionNotFoundError:
            return {}

    with tempfile.TemporaryDirectory(prefix="push-", dir=cache_dir("hub-staging")) as tmp:
        stage = Path(tmp) / "repo"
        stage.mkdir()
        stage_folder(plan.files, card, plan.results_bytes, stage)
        call(f"creating {repo_id}", lambda: api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model"))
        if revision != "main":
            call(f"creating branch {revision}", lambda: api.create_branch(repo_id, branch=revision, exist_ok=True))
        statuses = _compare(stage, call(f"listing {repo_id}", remote_tree), patterns)
        if all(s.status == "unchanged" for s in statuses):
            head = call(f"reading {repo_id}", lambda: api.model_info(repo_id, revision=revision).sha)
            log.info("%s@%s already holds these files: no commit", repo_id, revision)
            return PushResult(repo_id, endpoint, revision, url, statuses, card, commit=head)
        summary = f"prunekit push: {repo_id.split('/')[-1]}"
        description = f"run {plan.record.get('run_id')}; reproduce with: {plan.record.get('command')}"
        info = call(f"uploading to {repo_id}", lambda: api.upload_folder(
            repo_id=repo_id, folder_path=stage, revision=revision, commit_message=summary,
            commit_description=description, delete_patterns=patterns,
        ))
    return PushResult(repo_id, endpoint, revision, url, statuses, card, commit=info.oid,
                      commit_url=info.commit_url, committed=True)


@dataclass
class PullResult:
    repo_id: str
    endpoint: str
    revision: str  # the commit sha that was downloaded
    requested: str | None
    path: Path
    files: list[str] = field(default_factory=list)


def pull(
    repo_id: str,
    revision: str | None = None,
    out: str | Path | None = None,
    endpoint: str | None = None,
    cache_dir: str | Path | None = None,
    token: str | None = None,
    retry: RetryPolicy | None = None,
) -> PullResult:
    """Download a checkpoint repo (HUB_ALLOW_PATTERNS) into ``out`` or the Hub cache; mirrors ``prunekit pull``."""
    from huggingface_hub import HfApi, snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError, RevisionNotFoundError

    retry = retry or RetryPolicy.from_env()
    repo_id = validate_repo_id(repo_id)
    endpoint = resolve_endpoint(endpoint)
    check_online(f"pulling {repo_id}", endpoint,
                 "unset HF_HUB_OFFLINE to download, or give commands the copy you already have (a local directory)")
    token = _get_token(token)
    api = HfApi(endpoint=endpoint, token=token or None)

    def call(what: str, fn: Callable[[], T]) -> T:
        try:
            return _with_retries(what, fn, retry, endpoint, token)
        except RepositoryNotFoundError:
            raise ModelError(
                f"Hub repository '{repo_id}' was not found at {endpoint} (or it is private: {LOGIN_HINT})"
            ) from None
        except RevisionNotFoundError:
            raise ModelError(f"revision '{revision}' of '{repo_id}' was not found at {endpoint}") from None
        except HfHubHTTPError as err:
            raise _http_error(what, err, endpoint, token) from None

    sha = call(f"reading {repo_id}", lambda: api.model_info(repo_id, revision=revision).sha)
    if out is not None:
        Path(out).mkdir(parents=True, exist_ok=True)
    path = call(f"downloading {repo_id}", lambda: snapshot_download(
        repo_id, revision=sha, allow_patterns=hub_patterns(), local_dir=out, cache_dir=cache_dir,
        endpoint=endpoint, token=token or None,
    ))
    path = Path(path)
    files = sorted(p.relative_to(path).as_posix() for p in path.rglob("*")
                   if p.is_file() and not p.relative_to(path).as_posix().startswith("."))
    return PullResult(repo_id, endpoint, sha, revision, path, files)
