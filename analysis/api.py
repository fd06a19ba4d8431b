"""``prunekit.analysis.compare``: what pruning changed between two checkpoints (study §5, App. D.2–D.4).

The model-running analyses (LSAR, LAPE, drift) compare a REFERENCE with TARGETS: with ``dense``
given, the reference is the dense model and the targets are A and B (each pruned model against the
dense one, as in the study); without it, A is the reference and B the only target. Seeds enter the
mask analysis only. Models are loaded one at a time (the reference's hidden states wait in a
memory-mapped temp file for the drift).
"""

from __future__ import annotations

import gc
import hashlib
import json
import math
import time
import warnings
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from prunekit.analysis import drift as drift_mod
from prunekit.analysis import lape as lape_mod
from prunekit.analysis import lsar as lsar_mod
from prunekit.analysis.activations import DEFAULT_MAX_LENGTH, prepare_texts, reference_states, run_pass
from prunekit.analysis.checkpoints import DEFAULT_CHUNK_ELEMENTS, open_checkpoint
from prunekit.analysis.masks import compare_masks
from prunekit.artifacts import COMPARE_FILE, COMPARE_KIND, overall_sparsity, read_record
from prunekit.errors import ConfigError, ModelError
from prunekit.io import atomic_directory, versioned, write_json_atomic, write_text_atomic
from prunekit.languages import parse_languages
from prunekit.evaluation.forward import open_weights
from prunekit.evaluation.hidden_states import model_dtype, torch_dtype
from prunekit.models import (
    ModelSource,
    load_tokenizer,
    resolve_device,
    resolve_model,
    tokenizer_fingerprint,
)

KIND = COMPARE_KIND
from prunekit.analysis import ANALYSES
RUN_ANALYSES = ("lsar", "lape", "drift")


def parse_only(only: str | Sequence[str] | None) -> list[str]:
    if only is None:
        return list(ANALYSES)
    items = [p.strip() for p in (only.split(",") if isinstance(only, str) else only) if p and p.strip()]
    unknown = [p for p in items if p not in ANALYSES]
    if unknown or not items:
        raise ConfigError(f"unknown analysis '{','.join(unknown) or only}' in --only; choose from {','.join(ANALYSES)}")
    return [a for a in ANALYSES if a in items]


def parse_langs(langs: str | Sequence[str] | None) -> list[str]:
    if langs is None:
        return [lang.code for lang in parse_languages("all")]
    spec = langs if isinstance(langs, str) else ",".join(langs)
    return [lang.code for lang in parse_languages(spec)]


def _check_out(out: Path | None, overwrite: bool) -> None:
    if out is not None and out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise ConfigError(f"output directory '{out}' is not empty; pass --overwrite to replace it or choose another --out")


def _describe(role: str, source: ModelSource) -> dict[str, Any]:
    info: dict[str, Any] = {"role": role, **source.to_json()}
    record = read_record(source.path)
    if record is not None:
        recipe = record.get("recipe", {})
        calib = record.get("calibration") or {}
        info["prunekit"] = {
            "run_id": record.get("run_id"),
            "method": recipe.get("method"),
            "pattern": (recipe.get("pattern") or {}).get("name"),
            "calibration": calib.get("spec"),
            "seed": calib.get("seed"),
            "sparsity": overall_sparsity(record),
            "conventions": (record.get("conventions") or {}).get("name", "prunekit"),
        }
    return info


def _check_conventions(models: dict[str, Any], wanted: str | None, notes: list[str]) -> str:
    """The conventions the pruned checkpoints were made with (``--conventions``, else their records'):
    a checkpoint made with other conventions than the rest gets a warning, as its masks are not comparable."""
    from prunekit.conventions import parse_conventions

    used = {role: info["prunekit"]["conventions"] for role, info in models.items() if info.get("prunekit")}
    name = parse_conventions(wanted) if wanted is not None else (sorted(set(used.values()))[0] if used else "prunekit")
    for role, other in used.items():
        if other != name:
            notes.append(f"{role} was pruned with --conventions {other}, not {name}: its calibration windows and "
                         "thresholds differ, so the comparison mixes conventions")
    return name


def display_name(role: str, info: dict[str, Any]) -> str:
    calib = (info.get("prunekit") or {}).get("calibration")
    return f"{role} ({calib})" if calib else role


def _collect() -> None:
    """Give the memory of a model whose last reference the caller just dropped back (host and GPU)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _perplexity(result) -> dict[str, Any]:
    out = {}
    for lang in result.langs:
        nll = result.nll(lang)
        out[lang] = {"nll": nll, "ppl": math.exp(nll) if math.isfinite(nll) else None,
                     "tokens": result.nll_tokens.get(lang, 0)}
    return out


def compare(
    a: str | Path,
    b: str | Path,
    dense: str | Path | None = None,
    seeds_a: Sequence[str | Path] = (),
    seeds_b: Sequence[str | Path] = (),
    langs: str | Sequence[str] | None = None,
    text_source: str = "embedded",
    only: str | Sequence[str] | None = None,
    out: str | Path | None = None,
    overwrite: bool = False,
    max_tokens: int | None = None,
    max_length: int = DEFAULT_MAX_LENGTH,
    lsar_rank: int | None = None,
    subspace: str = "per_model",
    lape_thresholds: str | dict | None = None,
    deactivate: bool = False,
    dtype: str = "auto",
    device: str = "auto",
    batch_size: int = 1,
    chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
    trust_remote_code: bool = False,
    figures: bool = True,
    progress: bool = True,
    conventions: str | None = None,
) -> dict[str, Any]:
    """Compare checkpoints ``a`` and ``b`` (local dirs or Hub ids); returns the compare.json dict.

    Mirrors ``prunekit compare``. ``only`` selects analyses among masks, lsar, lape, drift (default all);
    ``out`` (optional) receives compare.json, figures/, summary.md and lape.npz, written atomically.
    """
    started = time.perf_counter()
    analyses = parse_only(only)
    lang_codes = parse_langs(langs)
    out_path = None if out is None else Path(out)
    _check_out(out_path, overwrite)
    if subspace not in lsar_mod.SUBSPACE_MODES:
        raise ConfigError(f"unknown --subspace '{subspace}'; use one of {', '.join(lsar_mod.SUBSPACE_MODES)}")
    thresholds = lape_mod.normalize_thresholds(lape_thresholds)
    if max_tokens is not None and max_tokens < 1:
        raise ConfigError("--max-tokens must be a positive number of tokens per language")
    if batch_size < 1:
        raise ConfigError("--batch-size must be at least 1")
    needs_langs = [x for x in analyses if x in ("lsar", "lape")]
    if needs_langs and len(lang_codes) < 2:
        raise ConfigError(f"{' and '.join(needs_langs)} compare languages: pass two or more with --langs (e.g. de,en,sw)")
    if lsar_rank is not None and "lsar" in analyses and not 1 <= lsar_rank <= len(lang_codes) - 1:
        raise ConfigError(f"--lsar-rank must be between 1 and K−1 = {len(lang_codes) - 1}")

    roles: dict[str, ModelSource] = {"a": resolve_model(str(a)), "b": resolve_model(str(b))}
    roles.update({f"a#{i + 2}": resolve_model(str(s)) for i, s in enumerate(seeds_a)})
    roles.update({f"b#{i + 2}": resolve_model(str(s)) for i, s in enumerate(seeds_b)})
    if dense is not None:
        roles["dense"] = resolve_model(str(dense))
    models = {role: _describe(role, source) for role, source in roles.items()}
    notes = []
    if (seeds_a or seeds_b) and "masks" not in analyses:
        notes.append("--seeds-a/--seeds-b are used by the mask analysis only, which is not among --only; they were ignored")
    conventions = _check_conventions(models, conventions, notes)
    reference = "dense" if dense is not None else "a"
    targets = ["a", "b"] if dense is not None else ["b"]

    result: dict[str, Any] = versioned(KIND, {
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "analyses": analyses,
        "models": models,
        "reference": reference,
        "targets": targets,
        "names": {role: display_name(role, info) for role, info in models.items()},
        "settings": {
            "langs": lang_codes, "text_source": text_source, "max_tokens": max_tokens, "max_length": max_length,
            "dtype": dtype, "device": None, "batch_size": batch_size, "lsar_rank": lsar_rank, "subspace": subspace,
            "lape_thresholds": thresholds, "deactivate": deactivate, "chunk_elements": chunk_elements,
            "conventions": conventions,
        },
        "texts": None, "perplexity": None, "masks": None, "lsar": None, "lape": None, "drift": None,
        "warnings": notes, "timings": {},
    })

    if "masks" in analyses:
        t0 = time.perf_counter()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            result["masks"] = compare_masks(
                open_checkpoint(roles["a"], "a"), open_checkpoint(roles["b"], "b"),
                dense=None if dense is None else open_checkpoint(roles["dense"], "dense"),
                seeds_a=[open_checkpoint(roles[f"a#{i + 2}"], f"a#{i + 2}") for i in range(len(seeds_a))],
                seeds_b=[open_checkpoint(roles[f"b#{i + 2}"], f"b#{i + 2}") for i in range(len(seeds_b))],
                chunk_elements=chunk_elements, progress=progress,
            )
        for item in caught:  # re-emit to the caller, once
            warnings.warn_explicit(item.message, item.category, item.filename, item.lineno)
        result["warnings"].extend(result["masks"]["warnings"])
        result["timings"]["masks_s"] = time.perf_counter() - t0

    lape_arrays: dict[str, np.ndarray] = {}
    if any(x in analyses for x in RUN_ANALYSES):
        t0 = time.perf_counter()
        compute = resolve_device(device)
        result["settings"]["device"] = str(compute)
        _run_analyses(result, roles, reference, targets, analyses, lang_codes, text_source, max_tokens, max_length,
                      lsar_rank, subspace, thresholds, deactivate, dtype, compute, batch_size, trust_remote_code,
                      progress, lape_arrays)
        result["timings"]["model_passes_s"] = time.perf_counter() - t0
    result["timings"]["total_s"] = time.perf_counter() - started

    if out_path is not None:
        write_outputs(result, out_path, overwrite, lape_arrays, figures)
    return result


def _run_analyses(result, roles, reference, targets, analyses, langs, text_source, max_tokens, max_length,
                  lsar_rank, subspace, thresholds, deactivate, dtype, device, batch_size, trust_remote_code,
                  progress, lape_arrays) -> None:
    want_lsar, want_lape, want_drift = ("lsar" in analyses), ("lape" in analyses), ("drift" in analyses)
    names = result["names"]

    tokenizer = load_tokenizer(roles[reference], trust_remote_code)
    # Each model is streamed from its checkpoint a decoder layer at a time (the whole model only when
    # its weights are not safetensors the model reads as they are).
    model = open_weights(roles[reference], torch_dtype(dtype), trust_remote_code)
    fingerprint = tokenizer_fingerprint(tokenizer)
    texts = prepare_texts(tokenizer, langs, text_source, "evaluation", max_tokens, max_length)
    result["texts"] = texts.provenance
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    run = dict(batch_size=batch_size, pad_id=pad_id, device=device, progress=progress)
    passes = {}
    perplexity = {}
    deactivation: dict[str, Any] = {}
    selected = None

    with reference_states(model.model, texts, model_dtype(model)) if want_drift else _null() as store:
        passes[reference] = run_pass(model, texts, label=f"{names[reference]}: forward", embeddings=want_lsar,
                                     lape=want_lape, nll=True, record=store, **run)
        perplexity[reference] = _perplexity(passes[reference])
        if want_lape:
            ref_stats = _lape_stats(passes[reference])
            selected = lape_mod.select_language_neurons(ref_stats, thresholds)
            if deactivate:
                deactivation[reference] = _deactivation(model, texts, selected, passes[reference], names[reference], run)
        model = None  # the last reference: the next model never shares memory with this one
        _collect()

        for role in targets:
            _check_tokenizer(roles[role], role, roles[reference], reference, fingerprint, trust_remote_code)
            model = open_weights(roles[role], torch_dtype(dtype), trust_remote_code)
            passes[role] = run_pass(model, texts, label=f"{names[role]}: forward", embeddings=want_lsar,
                                    lape=want_lape, nll=True, compare_to=store, **run)
            perplexity[role] = _perplexity(passes[role])
            if want_lape and deactivate:
                deactivation[role] = _deactivation(model, texts, selected, passes[role], names[role], run)
            model = None
            _collect()
    result["perplexity"] = perplexity

    if want_lsar:
        per_target = {}
        for role in targets:
            layers = []
            for layer in range(passes[reference].num_layers):
                ref = {lang: passes[reference].embeddings[lang][layer] for lang in langs}
                tgt = {lang: passes[role].embeddings[lang][layer] for lang in langs}
                layers.append({"layer": layer, **lsar_mod.layer_drift(ref, tgt, langs, lsar_rank, subspace)})
            per_target[role] = {"per_layer": layers}
        result["lsar"] = {"rank": lsar_rank or lsar_mod.default_rank(len(langs)), "subspace": subspace,
                          "embedding": "mean of the layer output over the valid tokens of each sample",
                          "per_target": per_target}

    if want_lape:
        stats = {role: _lape_stats(passes[role]) for role in [reference, *targets]}
        own = {role: lape_mod.select_language_neurons(stats[role], thresholds) for role in stats}
        specific: dict[str, Any] = {}
        for role, sel in own.items():
            entry: dict[str, Any] = {"counts": {lang: len(v) for lang, v in sel.items()}}
            if role != reference:
                entry["iou_with_reference"] = {
                    lang: _pair_iou(set(sel[lang]), set(own[reference][lang])) for lang in langs
                }
            specific[role] = entry
        result["lape"] = {
            "thresholds": thresholds,
            "activation": "act_fn(gate_proj(x)) > 0 over valid tokens; |output| = |act_fn(gate_proj(x)) ⊙ up_proj(x)|",
            "summary": {role: lape_mod.summary(s) for role, s in stats.items()},
            "bins": lape_mod.binned(stats[reference], {r: stats[r] for r in targets}),
            "specific_neurons": specific,
            "deactivation": None if not deactivate else {
                "neurons": {lang: len(v) for lang, v in selected.items()},
                "selected_in": reference,
                "per_model": deactivation,
            },
            "arrays": "lape.npz",
        }
        for role, s in stats.items():
            key = role.replace("#", "_")
            lape_arrays[f"{key}_lape"] = s.scores.astype(np.float32)
            lape_arrays[f"{key}_activation_probability"] = s.probs.astype(np.float32)
            lape_arrays[f"{key}_mean_abs_output"] = s.mean_abs_output.astype(np.float32)
        lape_arrays["langs"] = np.array(langs)

    if want_drift:
        result["drift"] = {
            "definition": drift_mod.__doc__.strip().splitlines()[0],
            "per_target": {role: drift_mod.summarize(passes[role]) for role in targets},
        }


TOKENIZER_CONFIG_KEYS = ("bos_token", "eos_token", "pad_token", "unk_token", "add_bos_token", "add_eos_token",
                         "tokenizer_class")


def _tokenizer_digest(path: Path) -> str | None:
    """A cheap identity of a saved tokenizer: tokenizer.json (or tokenizer.model) and the special-token
    settings of tokenizer_config.json; None when there is neither file."""
    digest = hashlib.sha256()
    for name in ("tokenizer.json", "tokenizer.model"):
        if (path / name).exists():
            digest.update(name.encode() + b"\0" + (path / name).read_bytes())
            break
    else:
        return None
    config_file = path / "tokenizer_config.json"
    config = json.loads(config_file.read_text(encoding="utf-8")) if config_file.exists() else {}
    digest.update(json.dumps({k: config.get(k) for k in TOKENIZER_CONFIG_KEYS}, sort_keys=True, default=str).encode())
    return digest.hexdigest()


def _check_tokenizer(source: ModelSource, role: str, ref: ModelSource, ref_role: str, fingerprint: str,
                     trust_remote_code: bool) -> None:
    """Targets must tokenize like the reference: identical tokenizer files, or else an equal fingerprint."""
    digest = _tokenizer_digest(source.path)
    if digest is not None and digest == _tokenizer_digest(ref.path):
        return
    if tokenizer_fingerprint(load_tokenizer(source, trust_remote_code)) != fingerprint:
        raise ModelError(
            f"'{source.spec}' ({role}) has a different tokenizer than '{ref.spec}' ({ref_role}); "
            "LSAR/LAPE/drift compare models of one base model on the same tokens"
        )


class _null:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def _pair_iou(x: set, y: set) -> float:
    union = x | y
    return 1.0 if not union else len(x & y) / len(union)


def _lape_stats(p) -> lape_mod.LapeStats:
    tokens = [p.valid_tokens[lang] for lang in p.langs]
    return lape_mod.LapeStats.from_counts(p.langs, p.active_counts, p.abs_output_sum, tokens)


def _deactivation(model, texts, selected, baseline, name, run) -> dict[str, Any]:
    """Zero the act_fn output of each language's selected neurons; per-language NLL change."""
    _, layers = _layers(model.model)
    out: dict[str, Any] = {}
    for lang, pairs in selected.items():
        by_layer = {layer: torch.tensor(neurons, dtype=torch.long)
                    for layer, neurons in lape_mod.neurons_by_layer(pairs, len(layers)).items()}
        if not by_layer:
            out[lang] = None
            continue
        p = run_pass(model, texts, label=f"{name}: {lang} neurons off", nll=True, deactivate=by_layer, **run)
        out[lang] = {}
        for eval_lang in texts.langs:
            base, new = baseline.nll(eval_lang), p.nll(eval_lang)
            out[lang][eval_lang] = {"nll": new, "delta_nll": new - base,
                                    "ppl": math.exp(new), "delta_ppl": math.exp(new) - math.exp(base)}
    return out


def _layers(model):
    from prunekit.models import find_decoder_layers

    return find_decoder_layers(model)


def write_outputs(result: dict[str, Any], out: Path, overwrite: bool, lape_arrays: dict[str, np.ndarray],
                  figures: bool = True) -> Path:
    """compare.json, summary.md, figures/*.png and lape.npz into ``out``, atomically."""
    from prunekit.analysis.figures import make_figures, summary_markdown

    with atomic_directory(out, overwrite=True if overwrite else not (out.exists() and any(out.iterdir()))) as staging:
        files = [COMPARE_FILE, "summary.md"]
        if lape_arrays:
            with open(staging / "lape.npz", "wb") as handle:
                np.savez_compressed(handle, **lape_arrays)
            files.append("lape.npz")
        if figures:
            files += [f"figures/{p.name}" for p in make_figures(result, staging / "figures")]
        result["files"] = files
        write_text_atomic(staging / "summary.md", summary_markdown(result))
        write_json_atomic(staging / COMPARE_FILE, result)
    return out
