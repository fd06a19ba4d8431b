"""``prunekit.prune``: model + method + calibration -> pruned checkpoint with ``prunekit.json``."""

from __future__ import annotations

import contextlib
import hashlib
import json
import shlex
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from prunekit.artifacts import CHECKPOINT_KIND, library_versions, method_seconds_key, summary_key, write_record
from prunekit.backend import gemm_plan
from prunekit.calibration import sample_calibration_set
from prunekit.conventions import describe as describe_conventions
from prunekit.engine import CPU_BATCH_TOKENS, GPU_BATCH_TOKENS, Engine, LayerResult, check_solve_threads, parse_skip_layers
from prunekit.errors import ConfigError
from prunekit.io import atomic_directory, check_output_location, remove_leftovers, tree_bytes, versioned
from prunekit.methods import Method, available_methods, get_method
from prunekit.models import (
    MODULE_NAMES, checkpoint_dtype, expected_checkpoint_bytes, find_decoder_layers, linear_sublayers, load_model, load_tokenizer, parse_dtype,
    resolve_device, resolve_dtype, resolve_model, text_config,
)
from prunekit.packed_writer import PackedWriter
from prunekit.packing import check_format, save_packed, summarize_quantization, take_grids
from prunekit.progress import progress_bar, stderr_console
from prunekit.recipe import (  # noqa: F401 - OutputSpec lives beside CalibrationSpec, re-exported here
    CalibrationSpec, OutputSpec, Quantization, Recipe, default_symmetric, parse_pattern, validate_quantization,
)
from prunekit.staging import Staging, discard_staging, file_fingerprint, staging_path
from prunekit.version import __version__
from prunekit.streaming import (
    ActivationPlan, MirrorWriter, SafetensorsCheckpoint, StreamedLayers, build_skeleton, device_available,
    host_available, layer_reserve, plan_activations,
)

METHOD_KINDS = ("prune", "quantize")
# The keywords ``prune`` still takes for each spec's fields (its signature before the specs).
@dataclass
class PruneResult:
    tokenizer: Any
    record: dict[str, Any]
    out: Path | None
    loaded: torch.nn.Module | None = None  # the model in memory; None when it was streamed to ``out``

    @property
    def model(self) -> torch.nn.Module:
        """The pruned model; a streamed run loads it from the written checkpoint on first use."""
        if self.loaded is None:
            self.loaded, _, _ = load_model(self.out, self.record["base_model"]["dtype"], with_tokenizer=False)
        return self.loaded


def run_identity(
    model: str, revision: str | None, recipe: Recipe, calibration: CalibrationSpec | None, dtype: str, skip_layers: str | None,
) -> tuple[dict[str, Any], str]:
    """The canonical description of a run and its hash (what names a run in sweeps and on the Hub)."""
    identity = {
        "model": model,
        "revision": revision,
        "recipe": recipe.to_json(),
        "calibration": None if calibration is None else calibration.identity(),
        "dtype": dtype,
        "skip_layers": skip_layers or None,
    }
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:12]
    return identity, digest


def reproduce_command(model: str, recipe: Recipe, calibration: CalibrationSpec | None, dtype: str, skip_layers: str | None,
                      checkpoint_format: str = "packed") -> str:
    verb = "quantize" if recipe.quantization is not None else "prune"
    parts = ["prunekit", verb, model] + (["--conventions", recipe.conventions] if recipe.conventions != "prunekit" else [])
    if recipe.quantization is not None:
        q = recipe.quantization
        parts += ["--bits", str(q.bits), "--group-size", str(q.group_size)] + (["--act-order"] if q.act_order else [])
        parts += ["--dynamic-groups"] if q.act_order and not q.static_groups else []
        if q.symmetric != default_symmetric(recipe.conventions):
            parts += ["--symmetric"] if q.symmetric else ["--asymmetric"]
        parts += ["--method", recipe.method] if recipe.method != "gptq" else []
        parts += ["--format", checkpoint_format] if checkpoint_format != "packed" else []
    else:
        parts += ["--method", recipe.method]
        parts += ["--pattern", recipe.pattern.name] if recipe.pattern.is_nm else ["--sparsity", f"{recipe.pattern.sparsity:g}"]
    parts += [] if calibration is None else calibration.command_arguments()
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


def method_of_kind(name: str, kind: str | None = None) -> Method:
    """The registered method ``name``; with ``kind`` ("prune" or "quantize") it must be of that kind.

    Raises ConfigError for an unknown method (with the closest name) or one of the other kind (naming
    the command that runs it), e.g. ``method_of_kind("gptq", "prune")``."""
    if kind is not None and kind not in METHOD_KINDS:
        raise ValueError(f"kind must be one of {METHOD_KINDS} or None, got {kind!r}")
    method = get_method(name)
    if kind == "prune" and method.kind != "prune":
        raise ConfigError(f"'{name}' is a quantization method: use `prunekit quantize` "
                          f"(pruning methods: {', '.join(available_methods('prune'))})")
    if kind == "quantize" and method.kind != "quantize":
        raise ConfigError(f"'{name}' is a pruning method: use `prunekit prune --method {name}`")
    return method


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
    *,
    sparsity: float | None = None,
    pattern: str | None = None,
    quantization: Quantization | None = None,
    calibration: CalibrationSpec | None = None,
    output: OutputSpec | None = None,
    device: str = "auto",
    skip_layers: str | None = None,
    batch_size: int | None = None,
    solve_threads: int | None = None,
    revision: str | None = None,
    trust_remote_code: bool = False,
    progress: bool = True,
    kind: str | None = None,
) -> PruneResult:
    """Prune (or quantize) ``model`` and optionally write the checkpoint.

    Mirrors ``prunekit prune`` / ``prunekit quantize``; returns the pruned model, its tokenizer and the
    record that is written as ``prunekit.json``.

    Args:
        model: a local model dir, a ``.gguf`` file, a Hub id (``revision``: its branch, tag or commit) or
            ``embedded:NAME``.
        method: a registered method; ``kind`` "prune" or "quantize" insists on one of that kind.
        sparsity / pattern: a pruning method's target (``recipe.parse_pattern``); ``quantization``: a
            quantization method's grid (default 4 bits, groups of 128).
        calibration: the text (:class:`~prunekit.recipe.CalibrationSpec`); its languages None mean
            English for a method that calibrates.
        output: where and how the checkpoint is written (:class:`OutputSpec`); none keeps it in memory.
        device: where each decoder layer is computed; ``skip_layers``: layers left as they are;
            ``batch_size``: calibration sequences per forward; ``solve_threads``: SparseGPT on the CPU.
    Raises:
        ConfigError: a wrong argument, before the model loads; ModelError / DataError: a model or text
        that cannot be read.

    Example: ``prune("embedded:gemma-3-270m", "wanda", calibration=CalibrationSpec("sw"), output=OutputSpec("gemma-sw"))``.
    """
    started = time.perf_counter()
    calibration, output = calibration or CalibrationSpec(), output or OutputSpec()
    method_obj = method_of_kind(method, kind)
    quantize = method_obj.kind == "quantize"
    if quantize:
        recipe = Recipe(method, quantization=validate_quantization(quantization or Quantization(symmetric=default_symmetric(calibration.conventions))), conventions=calibration.conventions)
        check_format(output.checkpoint_format, recipe.quantization)
    else:
        recipe = Recipe(method, pattern=parse_pattern(sparsity, pattern), conventions=calibration.conventions)
    calibration = calibration.for_method(method, method_obj.needs_calibration)
    check_solve_threads(solve_threads)  # before the model loads
    out_path = check_output_dir(output.out, output.overwrite)
    if out_path is not None:  # what killed runs left beside it, before the free-space check counts it as used
        remove_leftovers(out_path, say, staging=False)
    expected = expected_checkpoint_bytes(model, output.dtype) - tree_bytes(staging_path(out_path)) if out_path else 0
    check_output_location(out_path, expected)  # before hours of work
    compute_device = resolve_device(device)

    t0 = time.perf_counter()
    source = resolve_model(model, revision)
    dtype_name = resolve_dtype(output.dtype, source.path)
    tokenizer = load_tokenizer(source, trust_remote_code)
    packed = quantize and output.checkpoint_format == "packed"
    loaded, streamed, checkpoint = load_for_run(source, dtype_name, out_path, output.stream, trust_remote_code)
    layers_prefix, layers = find_decoder_layers(loaded)
    skipped = parse_skip_layers(skip_layers, len(layers))
    timings = {"load_s": time.perf_counter() - t0}

    t0 = time.perf_counter()
    calib_set = None
    if calibration.uses_text:
        context = getattr(text_config(loaded.config), "max_position_embeddings", None)
        calib_set = sample_calibration_set(tokenizer, calibration, max_seqlen=context)
        calibration = calibration.sized(calib_set.nsamples, calib_set.seqlen)  # what was used, for the record
        if calib_set.sizing is not None and progress:
            print(calib_set.sizing["message"], file=sys.stderr)
    timings["calibration_s"] = time.perf_counter() - t0

    activations = None
    if calib_set is not None:
        plan = activation_plan(loaded, calib_set.input_ids.shape, compute_device, method_obj.needs_calibration)
        if progress:
            stderr_console.print(plan.describe())
        activations = compute_device if plan.where == "device" else torch.device("cpu")

    config = loaded.config
    calibrated = calibration if calibration.uses_text else None
    identity, run_id = run_identity(source.spec, source.revision, recipe, calibrated, output.dtype, skip_layers)
    with contextlib.ExitStack() as stack:
        run = resume_point = layer_done = gemms = None
        if streamed is None and out_path is not None:
            discard_staging(out_path, say)  # an interrupted streamed run's staging: this run cannot resume it
        if streamed is not None:
            stack.callback(streamed.close)
            streamed.writer = writer = (PackedWriter(checkpoint, staging_path(out_path), loaded, recipe.quantization) if packed
                                        else MirrorWriter(checkpoint, staging_path(out_path)))
            resumable = getattr(writer, "resumable", False)
            run = stack.enter_context(Staging(out_path, staging_run(identity, checkpoint, compute_device, batch_size,
                                                                    solve_threads, activations),
                                              say, resume=output.resume, resumable=resumable))
            staging = stack.enter_context(atomic_directory(out_path, overwrite=may_replace(out_path, output.overwrite),
                                                           staging=run.path, kept=run.kept))
            writer.resume() if run.point is not None else writer.start()
            run.started(len(layers), gemm_plan(next(loaded.parameters()).dtype, compute_device))
            resume_point, gemms = run.point, run.gemms

            def layer_done(index, hidden, results):
                if hasattr(writer, "layer_done"):
                    writer.layer_done(index)
                if resumable:
                    run.layer_done(index, hidden, results)
        t0 = time.perf_counter()
        verb = "quantizing" if quantize else "pruning"
        with progress_bar(f"{verb} {method} layers", len(layers), progress) as update:
            engine = Engine(method_obj, recipe, compute_device, skipped, batch_size, update, solve_threads=solve_threads,
                            activation_device=activations, gemms=gemms)
            layer_results = engine.run(loaded, None if calib_set is None else calib_set.input_ids, streamed,
                                       resume=resume_point, layer_done=layer_done)
        timings[method_seconds_key(method_obj.kind)] = time.perf_counter() - t0
        grids = take_grids(layer_results, layers_prefix)  # the quantizers' grids, for the packed checkpoint

        summary = (summarize_quantization(layer_results, loaded, grids, recipe.quantization, packed, MODULE_NAMES) if quantize
                   else summarize_layers(layer_results))
        record = versioned(
            CHECKPOINT_KIND,
            {
                "run_id": run_id,
                "identity": identity,
                "recipe": recipe.to_json() | {"kind": method_obj.kind},
                "base_model": source.to_json()
                | {"model_type": config.model_type, "architectures": config.architectures, "dtype": dtype_name,
                   "num_layers": len(layers), "name_or_path": getattr(config, "_name_or_path", "")},
                "calibration": None if calib_set is None else calib_set.provenance() | {"spec": calibration.languages},
                "conventions": describe_conventions(calibration.conventions),
                "skip_layers": sorted(skipped),
                "device": str(compute_device),
                "activations": None if activations is None else str(activations),
                "streamed": streamed is not None,
                summary_key(method_obj.kind): summary,
                "timings": timings,
                "versions": library_versions(),
                "command": reproduce_command(source.spec, recipe, calibrated, output.dtype, skip_layers, output.checkpoint_format),
                "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            },
        )
        if streamed is not None:
            t0 = time.perf_counter()
            writer.close()
            finish_streamed_checkpoint(source.path, staging, tokenizer, record)
            run.finish()
            timings["save_s"] = time.perf_counter() - t0
    if out_path is not None and streamed is None:
        t0 = time.perf_counter()
        save_checkpoint(loaded, tokenizer, record, out_path, output.overwrite, (grids, recipe.quantization) if packed else None)
        timings["save_s"] = time.perf_counter() - t0
    timings["total_s"] = time.perf_counter() - started
    if out_path is not None:
        write_record(out_path, record)
    return PruneResult(tokenizer, record, out_path, None if streamed is not None else loaded)


def say(message: str) -> None:
    """One line to the user (what was resumed or removed), whatever ``progress`` is."""
    print(message, file=sys.stderr)


def staging_run(identity: dict[str, Any], checkpoint: SafetensorsCheckpoint, device: torch.device,
                batch_size: int | None, solve_threads: int | None, activations: torch.device | None) -> dict[str, Any]:
    """What a streamed run's staging must match to be resumed (``prunekit.staging``): the run identity, the
    base's weight files by size and time, the engine settings that change its numbers, and the versions."""
    import transformers

    files = list(checkpoint.files) + ([checkpoint.index_file.name] if checkpoint.index_file is not None else [])
    return {
        "identity": identity,
        "base": file_fingerprint(checkpoint.directory, files),
        "engine": {"device": str(device), "batch_size": batch_size, "solve_threads": solve_threads,
                   "activations": None if activations is None else str(activations), "threads": torch.get_num_threads()},
        "versions": {"prunekit": __version__, "torch": torch.__version__, "transformers": transformers.__version__},
    }


def load_for_run(source, dtype: str, out: Path | None, stream: bool | None, trust_remote_code: bool):
    """(model, streamed layers or None, their safetensors or None): a skeleton whose layers stream from
    the base's shards when the run can stream (:func:`streamable_checkpoint`), else the whole model."""
    checkpoint = streamable_checkpoint(source, dtype, out, stream)
    if checkpoint is not None:
        loaded = build_skeleton(source.path, parse_dtype(dtype), trust_remote_code)
        streamed = StreamedLayers(loaded, checkpoint, None)
        missing = streamed.missing()
        if not missing:
            return loaded, streamed, checkpoint
        streamed.close()  # names or shapes that transformers converts on loading: the in-memory path does that
        if stream:
            raise ConfigError(f"cannot stream '{source.spec}': its checkpoint does not hold {missing[0]} as the model "
                              f"needs it ({len(missing)} such tensors); leave out stream=True to load it whole")
    loaded, _, _ = load_model(source, dtype, trust_remote_code=trust_remote_code, with_tokenizer=False)
    return loaded, None, None


def streamable_checkpoint(source, dtype: str, out: Path | None, stream: bool | None) -> SafetensorsCheckpoint | None:
    """The base's safetensors when the run can stream (an output directory, weights kept in the base's own
    dtype; a packed quantize writes its layout layer by layer, ``prunekit.packed_writer``), else None. ``stream=True`` insists (a clear error when it cannot), False turns
    streaming off."""
    if stream is False:
        return None
    reasons = []
    if out is None:
        reasons.append("no output directory (--out) to stream the layers into")
    if dtype != checkpoint_dtype(source.path):
        reasons.append(f"--dtype {dtype} differs from the checkpoint's own {checkpoint_dtype(source.path)}")
    checkpoint = SafetensorsCheckpoint.find(source.path)
    if checkpoint is None:
        reasons.append("the checkpoint has no safetensors weights")
    if reasons:
        if stream:
            raise ConfigError(f"cannot stream '{source.spec}': {'; '.join(reasons)}")
        return None
    return checkpoint


def activation_plan(model, shape, device: torch.device, statistics: bool) -> ActivationPlan:
    """Where the calibration activations live for this model, calibration set and device (prints nothing)."""
    _, layers = find_decoder_layers(model)
    dtype = next(model.parameters()).dtype
    linears = linear_sublayers(layers[0]).values()
    batch_tokens = max(shape[1], GPU_BATCH_TOKENS if device.type == "cuda" else CPU_BATCH_TOKENS)
    reserve = layer_reserve(sum(p.numel() for p in layers[0].parameters()), max(m.in_features for m in linears),
                            max(m.out_features for m in linears), batch_tokens, dtype.itemsize, statistics)
    hidden = text_config(model.config).hidden_size
    return plan_activations(shape[0], shape[1], hidden, dtype.itemsize, device.type, device_available(device),
                            host_available(), reserve)


def finish_streamed_checkpoint(base: Path, staging: Path, tokenizer, record: dict[str, Any]) -> None:
    """Config and generation config as the base has them (unless the writer wrote its own: a packed
    checkpoint's), the tokenizer and the record, beside the shards."""
    for name in ("config.json", "generation_config.json"):
        if (Path(base) / name).exists() and not (staging / name).exists():
            shutil.copyfile(Path(base) / name, staging / name)
    tokenizer.save_pretrained(staging)
    write_record(staging, record)


def may_replace(out: Path, overwrite: bool) -> bool:
    """Whether writing ``out`` may replace what is there (asked for, or an empty directory)."""
    return overwrite or (out.is_dir() and not any(out.iterdir()))


def save_checkpoint(model, tokenizer, record: dict[str, Any], out: Path, overwrite: bool, packed=None) -> Path:
    """Write safetensors weights, config, tokenizer and prunekit.json into ``out`` atomically;
    ``packed = (grids, quantization)`` writes the quantized Linears pack-quantized (``prunekit.packing``)."""
    with atomic_directory(out, overwrite=may_replace(out, overwrite)) as staging:
        if packed is not None:
            save_packed(model, *packed, staging)
        else:
            model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        write_record(staging, record)
    return out

