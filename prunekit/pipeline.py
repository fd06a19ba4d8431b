"""``prunekit.prune``: model + method + calibration -> pruned checkpoint with ``prunekit.json``."""

from __future__ import annotations

import hashlib
import json
import shlex
import sys
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from prunekit.artifacts import CHECKPOINT_KIND, library_versions, write_record
from prunekit.calibration import build_calibration_set
from prunekit.conventions import describe as describe_conventions, parse_conventions
from prunekit.engine import Engine, LayerResult, check_solve_threads, parse_skip_layers
from prunekit.errors import ConfigError
from prunekit.languages import parse_languages
from prunekit.io import atomic_directory, check_output_location, versioned
from prunekit.methods import get_method
from prunekit.models import MODULE_NAMES, expected_checkpoint_bytes, find_decoder_layers, load_model, resolve_device, text_config
from prunekit.packing import check_format, save_packed, summarize_quantization, take_grids
from prunekit.progress import progress_bar
from prunekit.recipe import Quantization, Recipe, parse_pattern, validate_quantization

DEFAULT_CALIB = "en"  # the calibration language of a method that needs one when none is given


@dataclass
class PruneResult:
    model: torch.nn.Module
    tokenizer: Any
    record: dict[str, Any]
    out: Path | None


def run_identity(
    model: str, revision: str | None, recipe: Recipe, calib: str | None, calib_source: str | None,
    nsamples: int | None, seqlen: int | None, seed: int, dtype: str, skip_layers: str | None,
) -> tuple[dict[str, Any], str]:
    """The canonical description of a run and its hash (what names a run in sweeps and on the Hub)."""
    identity = {
        "model": model,
        "revision": revision,
        "recipe": recipe.to_json(),
        "calibration": None if calib is None else {"calib": calib, "source": calib_source, "nsamples": nsamples, "seqlen": seqlen, "seed": seed},
        "dtype": dtype,
        "skip_layers": skip_layers or None,
    }
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:12]
    return identity, digest


def reproduce_command(model: str, recipe: Recipe, calib, calib_source, nsamples, seqlen, seed, dtype, skip_layers, checkpoint_format="packed") -> str:
    verb = "quantize" if recipe.quantization is not None else "prune"
    parts = ["prunekit", verb, model] + (["--conventions", recipe.conventions] if recipe.conventions != "prunekit" else [])
    if recipe.quantization is not None:
        q = recipe.quantization
        parts += ["--bits", str(q.bits), "--group-size", str(q.group_size)] + (["--act-order"] if q.act_order else [])
        parts += (["--dynamic-groups"] if q.act_order and not q.static_groups else []) + (["--symmetric"] if q.symmetric else [])
        parts += ["--method", recipe.method] if recipe.method != "gptq" else []
        parts += ["--format", checkpoint_format] if checkpoint_format != "packed" else []
    else:
        parts += ["--method", recipe.method]
        parts += ["--pattern", recipe.pattern.name] if recipe.pattern.is_nm else ["--sparsity", f"{recipe.pattern.sparsity:g}"]
    if calib is not None:
        parts += ["--calib", calib, "--calib-source", calib_source, "--nsamples", str(nsamples), "--seqlen", str(seqlen), "--seed", str(seed)]
    parts += ["--dtype", dtype]
    if skip_layers:
        parts += ["--skip-layers", skip_layers]
    parts += ["--out", "OUT"]
    return shlex.join(parts)


def summarize_layers(layers: list[LayerResult]) -> dict[str, Any]:
    per_module: dict[str, list[float]] = {}
    zeros = total = 0
    for layer in layers:
        for module in layer.modules:
            numel = module.shape[0] * module.shape[1]
            zeros += module.sparsity * numel
            total += numel
            per_module.setdefault(MODULE_NAMES.get(module.name, module.name), []).append(module.sparsity)
    return {
        "overall": zeros / total if total else 0.0,
        "per_module": {name: sum(v) / len(v) for name, v in per_module.items()},
        "per_layer": [asdict(layer) for layer in layers],
    }


def check_output_dir(out: str | Path | None, overwrite: bool) -> Path | None:
    if out is None:
        return None
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise ConfigError(f"output directory '{out}' is not empty; pass --overwrite to replace it or choose another --out")
    return out


def prune(
    model: str,
    method: str = "wanda",
    sparsity: float | None = None,
    pattern: str | None = None,
    calib: str | None = None,
    calib_source: str = "embedded",
    nsamples: int | None = None,
    seqlen: int | None = None,
    seed: int = 0,
    out: str | Path | None = None,
    dtype: str = "float32",
    device: str = "auto",
    skip_layers: str | None = None,
    overwrite: bool = False,
    quantization: Quantization | None = None,
    batch_size: int | None = None,
    revision: str | None = None,
    trust_remote_code: bool = False,
    progress: bool = True,
    solve_threads: int | None = None,
    checkpoint_format: str = "packed",
    conventions: str = "prunekit",
) -> PruneResult:
    """Prune (or quantize) ``model`` and optionally write the checkpoint to ``out``.

    Mirrors ``prunekit prune``; returns the pruned model, its tokenizer and the record that
    is written as ``prunekit.json``. A quantized checkpoint is compressed-tensors pack-quantized
    unless ``checkpoint_format="dense"`` (fake-quantized weights); a pruned one is always dense.
    ``calib`` None means English for a method that needs
    calibration; ``nsamples`` / ``seqlen`` None are sized to the text (``calibration.choose_size``).
    """
    started = time.perf_counter()
    method_obj = get_method(method)
    conventions = parse_conventions(conventions)
    if method_obj.kind == "quantize":
        recipe = Recipe(method, quantization=validate_quantization(quantization or Quantization()), conventions=conventions)
        check_format(checkpoint_format, recipe.quantization)
    else:
        recipe = Recipe(method, pattern=parse_pattern(sparsity, pattern), conventions=conventions)
    if not method_obj.needs_calibration and calib is not None:
        raise ConfigError(f"method '{method}' uses no calibration text: drop --calib {calib}")
    if method_obj.needs_calibration:
        calib = calib or DEFAULT_CALIB
        parse_languages(calib)  # fail on an unknown language before loading anything
    check_solve_threads(solve_threads)  # before the model loads
    if calib is not None and ((nsamples is not None and nsamples < 1) or (seqlen is not None and seqlen < 2)):
        raise ConfigError(f"--nsamples must be >= 1 and --seqlen >= 2 (got {nsamples} and {seqlen})")
    out_path = check_output_dir(out, overwrite)
    check_output_location(out_path, expected_checkpoint_bytes(model, dtype) if out_path else 0)  # before hours of work
    compute_device = resolve_device(device)

    t0 = time.perf_counter()
    loaded, tokenizer, source = load_model(model, dtype, trust_remote_code=trust_remote_code, revision=revision)
    layers_prefix, layers = find_decoder_layers(loaded)
    skipped = parse_skip_layers(skip_layers, len(layers))
    timings = {"load_s": time.perf_counter() - t0}

    t0 = time.perf_counter()
    calib_set = None
    if calib is not None:
        context = getattr(text_config(loaded.config), "max_position_embeddings", None)
        calib_set = build_calibration_set(tokenizer, calib, calib_source, nsamples, seqlen, seed,
                                          conventions=conventions, max_seqlen=context)
        nsamples, seqlen = calib_set.nsamples, calib_set.seqlen  # what was used, for the record
        if calib_set.sizing is not None and progress:
            print(calib_set.sizing["message"], file=sys.stderr)
    timings["calibration_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    verb = "quantizing" if method_obj.kind == "quantize" else "pruning"
    with progress_bar(f"{verb} {method} layers", len(layers), progress) as update:
        engine = Engine(method_obj, recipe, compute_device, skipped, batch_size, update, solve_threads=solve_threads)
        layer_results = engine.run(loaded, None if calib_set is None else calib_set.input_ids)
    quantize = method_obj.kind == "quantize"
    timings["quantize_s" if quantize else "prune_s"] = time.perf_counter() - t0
    grids = take_grids(layer_results, layers_prefix)  # the quantizers' grids, for the packed checkpoint
    packed = quantize and checkpoint_format == "packed"

    identity, run_id = run_identity(
        source.spec, source.revision, recipe, calib, calib_source if calib else None, nsamples, seqlen, seed, dtype, skip_layers
    )
    config = loaded.config
    record = versioned(
        CHECKPOINT_KIND,
        {
            "run_id": run_id,
            "identity": identity,
            "recipe": recipe.to_json() | {"kind": method_obj.kind},
            "base_model": source.to_json()
            | {"model_type": config.model_type, "architectures": config.architectures, "dtype": dtype,
               "num_layers": len(layers), "name_or_path": getattr(config, "_name_or_path", "")},
            "calibration": None if calib_set is None else calib_set.provenance() | {"spec": calib},
            "conventions": describe_conventions(conventions),
            "skip_layers": sorted(skipped),
            "device": str(compute_device),
            **({"quantization": summarize_quantization(layer_results, loaded, grids, recipe.quantization, packed, MODULE_NAMES)}
               if quantize else {"sparsity": summarize_layers(layer_results)}),
            "timings": timings,
            "versions": library_versions(),
            "command": reproduce_command(source.spec, recipe, calib, calib_source, nsamples, seqlen, seed, dtype, skip_layers, checkpoint_format),
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        },
    )
    if out_path is not None:
        t0 = time.perf_counter()
        save_checkpoint(loaded, tokenizer, record, out_path, overwrite, (grids, recipe.quantization) if packed else None)
        timings["save_s"] = time.perf_counter() - t0
    timings["total_s"] = time.perf_counter() - started
    if out_path is not None:
        write_record(out_path, record)
    return PruneResult(loaded, tokenizer, record, out_path)


def save_checkpoint(model, tokenizer, record: dict[str, Any], out: Path, overwrite: bool, packed=None) -> Path:
    """Write safetensors weights, config, tokenizer and prunekit.json into ``out`` atomically;
    ``packed = (grids, quantization)`` writes the quantized Linears pack-quantized (``prunekit.packing``)."""
    replace = overwrite or (out.is_dir() and not any(out.iterdir()))
    with atomic_directory(out, overwrite=replace) as staging:
        if packed is not None:
            save_packed(model, *packed, staging)
        else:
            model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        write_record(staging, record)
    return out

