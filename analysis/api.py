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
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from prunekit.analysis import drift as drift_mod
from prunekit.analysis import lape as lape_mod
from prunekit.analysis import lsar as lsar_mod
from prunekit.analysis.activations import PassSettings, prepare_texts, reference_states, run_pass
from prunekit.analysis.checkpoints import open_checkpoint
from prunekit.analysis.masks import compare_masks
from prunekit.analysis.spec import CompareSpec
from prunekit.artifacts import COMPARE_FILE, COMPARE_KIND, overall_sparsity, read_record
from prunekit.errors import ConfigError, ModelError
from prunekit.io import atomic_directory, versioned, write_json_atomic, write_text_atomic
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
# compare.json's settings are the spec's choices (its ``to_settings``) but these: ``only`` is its ``analyses``
NOT_IN_SETTINGS = ("only", "trust_remote_code")


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
    a: str | Path | Sequence[str | Path],
    b: str | Path | Sequence[str | Path],
    spec: CompareSpec | None = None,
    *,
    dense: str | Path | None = None,
    out: str | Path | None = None,
    overwrite: bool = False,
    figures: bool = True,
    progress: bool = True,
) -> dict[str, Any]:
    """Compare checkpoints ``a`` and ``b``: mask overlap, LSAR, LAPE and hidden-state drift (``prunekit compare``).

    Args:
        a (`str`, `Path`, or a sequence of them): pruned checkpoint A, a local dir (e.g. from ``prunekit prune``)
            or a Hub id; or several checkpoints of A's calibration language (other seeds), A first: the mask
            analysis uses their intersection, the model analyses the first.
        b (`str`, `Path`, or a sequence of them): pruned checkpoint B, likewise.
        spec (`CompareSpec`, *optional*): what to compute and how (analyses, languages, text, LSAR / LAPE
            settings, dtype, device, ...); default ``CompareSpec()``: all four analyses over the study's seven
            languages of the embedded text.
        dense (`str` or `Path`, *optional*): the dense base model. Masks become ``A ∧ [W_dense ≠ 0]`` and
            LSAR / LAPE / drift compare A and B against it; without it, B is compared against A.
        out (`str` or `Path`, *optional*): a directory that receives ``compare.json``, ``summary.md``,
            ``figures/*.png`` and ``lape.npz``, written atomically; None: nothing is written.
        overwrite (`bool`, defaults to `False`): replace a non-empty ``out``.
        figures (`bool`, defaults to `True`): draw ``figures/*.png`` into ``out``.
        progress (`bool`, defaults to `True`): progress bars.

    Returns:
        `dict`: the content of ``compare.json`` (schema in ``analysis/SCHEMA.md``), its ``settings`` from the
        spec and its ``fingerprint`` the spec's.

    Raises:
        ConfigError: ``out`` is not empty and ``overwrite`` is off, or a side is an empty list (the spec's own
            checks ran when it was made).
        ModelError: checkpoints of different layouts, or (for LSAR / LAPE / drift) different tokenizers.

    Models are loaded one at a time and streamed a decoder layer at a time from their shards; the reference's
    hidden states wait in a memory-mapped temp file for the drift.

    Example:

    ```py
    >>> from prunekit.analysis import CompareSpec, compare
    >>> result = compare("gemma-de", "gemma-sw", CompareSpec(langs="de,en,sw"), dense="embedded:gemma-3-270m",
    ...                  out="cmp-de-sw")
    >>> result["masks"]["comparisons"]["between"]["global"]["iou"]
    >>> seeds = compare(["de-s0", "de-s1"], ["sw-s0", "sw-s1"], CompareSpec(only="masks"), out="iou")  # intersections
    ```
    """
    started = time.perf_counter()
    spec = spec or CompareSpec()
    out_path = None if out is None else Path(out)
    _check_out(out_path, overwrite)
    side_a, side_b = _side(a, "a"), _side(b, "b")
    roles = _resolve_roles(side_a, side_b, dense)
    result = _new_result(spec, roles, seeded=len(side_a) + len(side_b) > 2)
    if "masks" in spec.only:
        _mask_analysis(result, roles, spec, progress)
    lape_arrays: dict[str, np.ndarray] = {}
    if spec.runs_models:
        t0 = time.perf_counter()
        device = resolve_device(spec.device)
        result["settings"]["device"] = str(device)
        _run_analyses(result, roles, spec, PassSettings(spec.batch_size, device=device, progress=progress), lape_arrays)
        result["timings"]["model_passes_s"] = time.perf_counter() - t0
    result["timings"]["total_s"] = time.perf_counter() - started

    if out_path is not None:
        write_outputs(result, out_path, overwrite, lape_arrays, figures)
    return result


def _side(checkpoints: str | Path | Sequence[str | Path], name: str) -> list[str]:
    """One side of the comparison as a list: its checkpoint, then the other seeds of its calibration language."""
    side = [str(checkpoints)] if isinstance(checkpoints, (str, Path)) else [str(c) for c in checkpoints]
    if not side:
        raise ConfigError(f"compare: side {name.upper()} names no checkpoint; give one, or a list of seeds")
    return side


def _resolve_roles(side_a: list[str], side_b: list[str], dense) -> dict[str, ModelSource]:
    """Every checkpoint by its role: a, b, a#2.. (seeds of a), b#2.., dense."""
    roles: dict[str, ModelSource] = {"a": resolve_model(side_a[0]), "b": resolve_model(side_b[0])}
    roles.update({f"a#{i + 2}": resolve_model(s) for i, s in enumerate(side_a[1:])})
    roles.update({f"b#{i + 2}": resolve_model(s) for i, s in enumerate(side_b[1:])})
    if dense is not None:
        roles["dense"] = resolve_model(str(dense))
    return roles


def _new_result(spec: CompareSpec, roles: dict[str, ModelSource], seeded: bool) -> dict[str, Any]:
    """compare.json before any analysis: the models, the reference and targets, the settings."""
    models = {role: _describe(role, source) for role, source in roles.items()}
    notes = []
    if seeded and "masks" not in spec.only:
        notes.append("--seeds-a/--seeds-b are used by the mask analysis only, which is not among --only; they were ignored")
    settings = {k: v for k, v in spec.to_settings().items() if k not in NOT_IN_SETTINGS} | {
        "device": None, "conventions": _check_conventions(models, spec.conventions, notes)}  # device: once resolved
    has_dense = "dense" in roles
    return versioned(KIND, {
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "analyses": list(spec.only),
        "models": models,
        "reference": "dense" if has_dense else "a",
        "targets": ["a", "b"] if has_dense else ["b"],
        "names": {role: display_name(role, info) for role, info in models.items()},
        "settings": settings,
        "fingerprint": spec.fingerprint(),
        "texts": None, "perplexity": None, "masks": None, "lsar": None, "lape": None, "drift": None,
        "warnings": notes, "timings": {},
    })


def _mask_analysis(result: dict[str, Any], roles: dict[str, ModelSource], spec: CompareSpec, progress: bool) -> None:
    t0 = time.perf_counter()
    seeds = {side: [role for role in roles if role.startswith(f"{side}#")] for side in ("a", "b")}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result["masks"] = compare_masks(
            open_checkpoint(roles["a"], "a"), open_checkpoint(roles["b"], "b"),
            dense=open_checkpoint(roles["dense"], "dense") if "dense" in roles else None,
            seeds_a=[open_checkpoint(roles[r], r) for r in seeds["a"]],
            seeds_b=[open_checkpoint(roles[r], r) for r in seeds["b"]],
            chunk_elements=spec.chunk_elements, progress=progress,
        )
    for item in caught:  # re-emit to the caller, once
        warnings.warn_explicit(item.message, item.category, item.filename, item.lineno)
    result["warnings"].extend(result["masks"]["warnings"])
    result["timings"]["masks_s"] = time.perf_counter() - t0


def _run_analyses(result: dict[str, Any], roles: dict[str, ModelSource], spec: CompareSpec, run: PassSettings,
                  lape_arrays: dict[str, np.ndarray]) -> None:
    """LSAR, LAPE and drift: one pass of the reference, then one of each target, into ``result``."""
    reference, targets = result["reference"], result["targets"]
    passes, selected, deactivation = _model_passes(result, roles, spec, run)
    if "lsar" in spec.only:
        result["lsar"] = _lsar_section(passes, reference, targets, spec)
    if "lape" in spec.only:
        result["lape"] = _lape_section(passes, reference, targets, spec, selected, deactivation, lape_arrays)
    if "drift" in spec.only:
        result["drift"] = {
            "definition": drift_mod.__doc__.strip().splitlines()[0],
            "per_target": {role: drift_mod.summarize(passes[role]) for role in targets},
        }


def _model_passes(result: dict[str, Any], roles: dict[str, ModelSource], spec: CompareSpec, run: PassSettings):
    """Each model's pass over the texts, the reference's first (its states recorded for the drift); fills in
    ``texts`` and ``perplexity``. Returns the passes, the reference's selected LAPE neurons, the deactivations."""
    reference, targets, names = result["reference"], result["targets"], result["names"]
    want_lsar, want_lape, want_drift = ("lsar" in spec.only), ("lape" in spec.only), ("drift" in spec.only)
    tokenizer = load_tokenizer(roles[reference], spec.trust_remote_code)
    # Each model is streamed from its checkpoint a decoder layer at a time (the whole model only when
    # its weights are not safetensors the model reads as they are).
    model = open_weights(roles[reference], torch_dtype(spec.dtype), spec.trust_remote_code)
    fingerprint = tokenizer_fingerprint(tokenizer)
    texts = prepare_texts(tokenizer, list(spec.langs), spec.text_source, "evaluation", spec.max_tokens, spec.max_length)
    result["texts"] = texts.provenance
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    run = replace(run, pad_id=pad_id)
    passes, perplexity, deactivation, selected = {}, {}, {}, None

    with reference_states(model.model, texts, model_dtype(model)) if want_drift else _null() as store:
        passes[reference] = run_pass(model, texts, label=f"{names[reference]}: forward", embeddings=want_lsar,
                                     lape=want_lape, nll=True, record=store, settings=run)
        perplexity[reference] = _perplexity(passes[reference])
        if want_lape:
            selected = lape_mod.select_language_neurons(_lape_stats(passes[reference]), spec.lape_thresholds)
            if spec.deactivate:
                deactivation[reference] = _deactivation(model, texts, selected, passes[reference], names[reference], run)
        model = None  # the last reference: the next model never shares memory with this one
        _collect()

        for role in targets:
            _check_tokenizer(roles[role], role, roles[reference], reference, fingerprint, spec.trust_remote_code)
            model = open_weights(roles[role], torch_dtype(spec.dtype), spec.trust_remote_code)
            passes[role] = run_pass(model, texts, label=f"{names[role]}: forward", embeddings=want_lsar,
                                    lape=want_lape, nll=True, compare_to=store, settings=run)
            perplexity[role] = _perplexity(passes[role])
            if want_lape and spec.deactivate:
                deactivation[role] = _deactivation(model, texts, selected, passes[role], names[role], run)
            model = None
            _collect()
    result["perplexity"] = perplexity
    return passes, selected, deactivation


def _lsar_section(passes, reference: str, targets: list[str], spec: CompareSpec) -> dict[str, Any]:
    langs = list(spec.langs)
    per_target = {}
    for role in targets:
        layers = []
        for layer in range(passes[reference].num_layers):
            ref = {lang: passes[reference].embeddings[lang][layer] for lang in langs}
            tgt = {lang: passes[role].embeddings[lang][layer] for lang in langs}
            layers.append({"layer": layer, **lsar_mod.layer_drift(ref, tgt, langs, spec.lsar_rank, spec.subspace)})
        per_target[role] = {"per_layer": layers}
    return {"rank": spec.lsar_rank or lsar_mod.default_rank(len(langs)), "subspace": spec.subspace,
            "embedding": "mean of the layer output over the valid tokens of each sample",
            "per_target": per_target}


def _lape_section(passes, reference: str, targets: list[str], spec: CompareSpec, selected, deactivation,
                  lape_arrays: dict[str, np.ndarray]) -> dict[str, Any]:
    """compare.json's ``lape``; the per-neuron arrays go into ``lape_arrays`` (lape.npz)."""
    thresholds = spec.lape_thresholds
    stats = {role: _lape_stats(passes[role]) for role in [reference, *targets]}
    own = {role: lape_mod.select_language_neurons(stats[role], thresholds) for role in stats}
    specific: dict[str, Any] = {}
    for role, sel in own.items():
        entry: dict[str, Any] = {"counts": {lang: len(v) for lang, v in sel.items()}}
        if role != reference:
            entry["iou_with_reference"] = {
                lang: _pair_iou(set(sel[lang]), set(own[reference][lang])) for lang in spec.langs
            }
        specific[role] = entry
    for role, s in stats.items():
        key = role.replace("#", "_")
        lape_arrays[f"{key}_lape"] = s.scores.astype(np.float32)
        lape_arrays[f"{key}_activation_probability"] = s.probs.astype(np.float32)
        lape_arrays[f"{key}_mean_abs_output"] = s.mean_abs_output.astype(np.float32)
    lape_arrays["langs"] = np.array(list(spec.langs))
    return {
        "thresholds": thresholds,
        "activation": "act_fn(gate_proj(x)) > 0 over valid tokens; |output| = |act_fn(gate_proj(x)) ⊙ up_proj(x)|",
        "summary": {role: lape_mod.summary(s) for role, s in stats.items()},
        "bins": lape_mod.binned(stats[reference], {r: stats[r] for r in targets}),
        "specific_neurons": specific,
        "deactivation": None if not spec.deactivate else {
            "neurons": {lang: len(v) for lang, v in selected.items()},
            "selected_in": reference,
            "per_model": deactivation,
        },
        "arrays": "lape.npz",
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
        p = run_pass(model, texts, label=f"{name}: {lang} neurons off", nll=True, deactivate=by_layer, settings=run)
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
