"""``prunekit.prune``: model + method + calibration -> pruned checkpoint with ``prunekit.json``."""

from __future__ import annotations

import contextlib
import shlex
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
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
    MODULE_NAMES, ModelSource, checkpoint_dtype, expected_checkpoint_bytes, find_decoder_layers, linear_sublayers, load_model, load_tokenizer, parse_dtype,
    resolve_device, resolve_dtype, resolve_model, text_config,
)
from prunekit.packed_writer import PackedWriter
from prunekit.packing import check_format, save_packed, summarize_quantization, take_grids
from prunekit.progress import progress_bar, stderr_console
from prunekit.recipe import (  # noqa: F401 - OutputSpec and run_identity live beside CalibrationSpec, re-exported here
    CalibrationSpec, EngineSpec, OutputSpec, Quantization, Recipe, default_symmetric, parse_pattern, run_identity,
    validate_quantization,
)
from prunekit.staging import Staging, discard_staging, file_fingerprint, staging_path
from prunekit.version import __version__
from prunekit.checkpoint_files import SafetensorsCheckpoint
from prunekit.streaming import (
    ActivationPlan, MirrorWriter, StreamedLayers, build_skeleton, device_available,
    host_available, layer_reserve, plan_activations,
)

METHOD_KINDS = ("prune", "quantize")


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


@dataclass
class Run:
    """One ``prune`` call as its steps fill it in: what was asked (:func:`plan_run`), the model
    (:func:`load_run`), the calibration set and where its activations live (:func:`calibrate`)."""

    method: Method
    recipe: Recipe
    calibration: CalibrationSpec
    output: OutputSpec
    engine: EngineSpec
    out: Path | None
    device: torch.device
    progress: bool
    timings: dict[str, float] = field(default_factory=dict)
    source: ModelSource | None = None
    dtype: str = ""  # the resolved dtype of the model and its weights
    tokenizer: Any = None
    model: torch.nn.Module | None = None
    streamed: StreamedLayers | None = None
    checkpoint: SafetensorsCheckpoint | None = None  # the base's safetensors, when the layers stream
    layers_prefix: str = ""
    layers: Any = ()
    skipped: set[int] = field(default_factory=set)
    calib_set: Any = None
    activations: torch.device | None = None
    resumed_at: int | None = None  # the layer a resumed streamed run continued at (``prunekit.staging``)

    @property
    def quantize(self) -> bool:
        return self.method.kind == "quantize"

    @property
    def packed(self) -> bool:
        return self.quantize and self.output.checkpoint_format == "packed"

    @property
    def calibrated(self) -> CalibrationSpec | None:
        """The calibration spec when the run uses text, else None (what names the run)."""
        return self.calibration if self.calibration.uses_text else None


@dataclass
class StreamedOutput:
    """A streamed run's output: its staging (resume point, finished layers), the directory the checkpoint is
    written in before it is renamed to ``out``, and the writer of its layers."""

    staging: Staging
    directory: Path
    writer: Any

    def layer_done(self, index: int, hidden: Any, results: Any) -> None:
        if hasattr(self.writer, "layer_done"):
            self.writer.layer_done(index)
        if getattr(self.writer, "resumable", False):
            self.staging.layer_done(index, hidden, results)


def prune(
    model: str,
    method: str = "wanda",
    *,
    sparsity: float | None = None,
    pattern: str | None = None,
    quantization: Quantization | None = None,
    calibration: CalibrationSpec | None = None,
    output: OutputSpec | None = None,
    engine: EngineSpec | None = None,
    revision: str | None = None,
    progress: bool = True,
) -> PruneResult:
    """Prune (or quantize) a model layer by layer and, with ``output.out``, write the checkpoint.

    What ``prunekit prune`` and ``prunekit quantize`` run. Every argument is checked before the model loads.

    Args:
        model (`str`):
            A local model directory, a ``.gguf`` file, a Hub id (``org/name``) or ``embedded:NAME``.
        method (`str`, *optional*, defaults to `"wanda"`):
            A registered method: ``magnitude``, ``wanda``, ``sparsegpt`` (pruning) or ``gptq``, ``rtn``
            (quantization; :func:`method_of_kind` insists on one kind).
        sparsity (`float`, *optional*):
            A pruning method's fraction of weights to prune, in (0, 1); None: 0.5, or what ``pattern`` implies.
        pattern (`str`, *optional*):
            ``unstructured`` (None) or ``N:M`` such as ``2:4``: N of every M consecutive input columns pruned.
        quantization (:class:`~prunekit.recipe.Quantization`, *optional*):
            A quantization method's grid; None: 4 bits, groups of 128, the conventions' symmetry.
        calibration (:class:`~prunekit.recipe.CalibrationSpec`, *optional*):
            The calibration text; None, or its ``languages`` None: English for a method that calibrates,
            no text for one that does not.
        output (:class:`~prunekit.recipe.OutputSpec`, *optional*):
            Where and how the checkpoint is written; None (or its ``out`` None) keeps the model in memory.
        engine (:class:`~prunekit.recipe.EngineSpec`, *optional*):
            The device, the layers left as they are, the batch size, SparseGPT's solve threads and
            ``trust_remote_code``; None: ``EngineSpec()``.
        revision (`str`, *optional*):
            A Hub model's branch, tag or commit; None: its default branch.
        progress (`bool`, *optional*, defaults to `True`):
            Progress bars and the calibration and memory plans on stderr.

    Returns:
        :class:`PruneResult`: the tokenizer, the record (written as ``prunekit.json``), the output directory
        and ``.model``, the pruned model (a streamed run loads it from ``out`` on first use).

    Raises:
        ConfigError: an unknown method, a wrong target, an output directory that is not empty (without
            ``overwrite``) or has no room, or a run that cannot stream when ``stream=True``.
        ModelError: a model that cannot be found or read.
        DataError: calibration text that cannot be read.

    Example:
        ```python
        >>> import prunekit
        >>> result = prunekit.prune("embedded:gemma-3-270m", "wanda", sparsity=0.5,
        ...                         calibration=prunekit.CalibrationSpec("sw", nsamples=32, seqlen=256),
        ...                         output=prunekit.OutputSpec("gemma-sw"))
        >>> result.record["run_id"]
        ```
    """
    started = time.perf_counter()
    run = plan_run(model, method, sparsity, pattern, quantization, calibration or CalibrationSpec(),
                   output or OutputSpec(), engine or EngineSpec(), progress)
    load_run(run, model, revision)
    calibrate(run)
    identity, run_id = run_identity(run.source.spec, run.source.revision, run.recipe, run.calibrated, run.output.dtype,
                                    run.engine.skip_layers)
    with contextlib.ExitStack() as stack:
        streamed = open_streamed_output(run, identity, stack)
        layer_results = run_layers(run, streamed)
        grids = take_grids(layer_results, run.layers_prefix)  # the quantizers' grids, for the packed checkpoint
        record = build_record(run, layer_results, grids, identity, run_id)
        if streamed is not None:
            t0 = time.perf_counter()
            streamed.writer.close()
            finish_streamed_checkpoint(run.source.path, streamed.directory, run.tokenizer, record)
            streamed.staging.finish()
            run.timings["save_s"] = time.perf_counter() - t0
    if run.out is not None and run.streamed is None:
        t0 = time.perf_counter()
        save_checkpoint(run.model, run.tokenizer, record, run.out, run.output.overwrite,
                        (grids, run.recipe.quantization) if run.packed else None)
        run.timings["save_s"] = time.perf_counter() - t0
    run.timings["total_s"] = time.perf_counter() - started  # the record holds this dict: written below
    if run.out is not None:
        write_record(run.out, record)
    return PruneResult(run.tokenizer, record, run.out, None if run.streamed is not None else run.model)


def plan_run(model: str, method: str, sparsity: float | None, pattern: str | None, quantization: Quantization | None,
             calibration: CalibrationSpec, output: OutputSpec, engine: EngineSpec, progress: bool) -> Run:
    """Step 1, before the model loads: the method and its recipe, the calibration with the method's default,
    the engine settings checked, the output directory cleared of what killed runs left and its free space
    checked (before hours of work)."""
    method_obj = method_of_kind(method)
    if method_obj.kind == "quantize":
        grid = quantization or Quantization(symmetric=default_symmetric(calibration.conventions))
        recipe = Recipe(method, quantization=validate_quantization(grid), conventions=calibration.conventions)
        check_format(output.checkpoint_format, recipe.quantization)
    else:
        recipe = Recipe(method, pattern=parse_pattern(sparsity, pattern), conventions=calibration.conventions)
    calibration = calibration.for_method(method, method_obj.needs_calibration)
    check_solve_threads(engine.solve_threads)
    out_path = check_output_dir(output.out, output.overwrite)
    if out_path is not None:  # what killed runs left beside it, before the free-space check counts it as used
        remove_leftovers(out_path, say, staging=False)
    expected = expected_checkpoint_bytes(model, output.dtype) - tree_bytes(staging_path(out_path)) if out_path else 0
    check_output_location(out_path, expected)
    return Run(method_obj, recipe, calibration, output, engine, out_path, resolve_device(engine.device), progress)


def load_run(run: Run, model: str, revision: str | None) -> None:
    """Step 2: the model resolved and loaded (a skeleton whose layers stream when the run can stream), its
    tokenizer, its decoder layers and those the run leaves as they are."""
    t0 = time.perf_counter()
    run.source = resolve_model(model, revision)
    run.dtype = resolve_dtype(run.output.dtype, run.source.path)
    run.tokenizer = load_tokenizer(run.source, run.engine.trust_remote_code)
    run.model, run.streamed, run.checkpoint = load_for_run(run.source, run.dtype, run.out, run.output.stream,
                                                           run.engine.trust_remote_code)
    run.layers_prefix, run.layers = find_decoder_layers(run.model)
    run.skipped = parse_skip_layers(run.engine.skip_layers, len(run.layers))
    run.timings["load_s"] = time.perf_counter() - t0


def calibrate(run: Run) -> None:
    """Step 3: the calibration set (sized to the text and the model's context; the spec records the size
    used) and where its activations live (the device, or pinned CPU memory)."""
    t0 = time.perf_counter()
    if run.calibration.uses_text:
        context = getattr(text_config(run.model.config), "max_position_embeddings", None)
        run.calib_set = sample_calibration_set(run.tokenizer, run.calibration, max_seqlen=context)
        run.calibration = run.calibration.sized(run.calib_set.nsamples, run.calib_set.seqlen)
        if run.calib_set.sizing is not None and run.progress:
            print(run.calib_set.sizing["message"], file=sys.stderr)
    run.timings["calibration_s"] = time.perf_counter() - t0
    if run.calib_set is not None:
        plan = activation_plan(run.model, run.calib_set.input_ids.shape, run.device, run.method.needs_calibration)
        if run.progress:
            stderr_console.print(plan.describe())
        run.activations = run.device if plan.where == "device" else torch.device("cpu")


def open_streamed_output(run: Run, identity: dict[str, Any], stack: contextlib.ExitStack) -> StreamedOutput | None:
    """Step 4, for a streamed run: the staging (resumed when an interrupted run of the same identity left
    it) and the writer of its layers, entered on ``stack``. None for a run in memory, whose output directory
    loses an interrupted streamed run's staging (this run cannot resume it)."""
    if run.streamed is None:
        if run.out is not None:
            discard_staging(run.out, say)
        return None
    stack.callback(run.streamed.close)
    writer = (PackedWriter(run.checkpoint, staging_path(run.out), run.model, run.recipe.quantization) if run.packed
              else MirrorWriter(run.checkpoint, staging_path(run.out)))
    run.streamed.writer = writer
    settings = staging_run(identity, run.checkpoint, run.device, run.engine.batch_size, run.engine.solve_threads,
                           run.activations)
    staging = stack.enter_context(Staging(run.out, settings, say, resume=run.output.resume,
                                          resumable=getattr(writer, "resumable", False)))
    directory = stack.enter_context(atomic_directory(run.out, overwrite=may_replace(run.out, run.output.overwrite),
                                                     staging=staging.path, kept=staging.kept))
    writer.resume() if staging.point is not None else writer.start()
    run.resumed_at = None if staging.point is None else staging.point.next_layer
    staging.started(len(run.layers), gemm_plan(next(run.model.parameters()).dtype, run.device))
    return StreamedOutput(staging, directory, writer)


def run_layers(run: Run, streamed: StreamedOutput | None) -> list[LayerResult]:
    """Step 5: the method on every decoder layer (from the resume point of a resumed streamed run)."""
    t0 = time.perf_counter()
    verb = "quantizing" if run.quantize else "pruning"
    with progress_bar(f"{verb} {run.recipe.method} layers", len(run.layers), run.progress) as update:
        engine = Engine(run.method, run.recipe, run.device, run.skipped, run.engine.batch_size, update,
                        solve_threads=run.engine.solve_threads, activation_device=run.activations,
                        gemms=None if streamed is None else streamed.staging.gemms)
        results = engine.run(run.model, None if run.calib_set is None else run.calib_set.input_ids, run.streamed,
                             resume=None if streamed is None else streamed.staging.point,
                             layer_done=None if streamed is None else streamed.layer_done)
    run.timings[method_seconds_key(run.method.kind)] = time.perf_counter() - t0
    return results


def build_record(run: Run, layer_results: list[LayerResult], grids: dict[str, Any], identity: dict[str, Any],
                 run_id: str) -> dict[str, Any]:
    """Step 6: the run's record, written as ``prunekit.json`` (its ``timings`` is the run's, still filled in)."""
    config, kind = run.model.config, run.method.kind
    summary = (summarize_quantization(layer_results, run.model, grids, run.recipe.quantization, run.packed, MODULE_NAMES)
               if run.quantize else summarize_layers(layer_results))
    return versioned(
        CHECKPOINT_KIND,
        {
            "run_id": run_id,
            "identity": identity,
            "recipe": run.recipe.to_json() | {"kind": kind},
            "base_model": run.source.to_json()
            | {"model_type": config.model_type, "architectures": config.architectures, "dtype": run.dtype,
               "num_layers": len(run.layers), "name_or_path": getattr(config, "_name_or_path", "")},
            "calibration": None if run.calib_set is None else run.calib_set.provenance() | {"spec": run.calibration.languages},
            "conventions": describe_conventions(run.calibration.conventions),
            "skip_layers": sorted(run.skipped),
            "device": str(run.device),
            "activations": None if run.activations is None else str(run.activations),
            "streamed": run.streamed is not None,
            # a run resumed from an interrupted one's staging: the weights are the same bytes; its timings count
            # the layers from ``at_layer`` on only
            "resumed": None if run.resumed_at is None else {"at_layer": run.resumed_at, "of": len(run.layers)},
            summary_key(kind): summary,
            "timings": run.timings,
            "versions": library_versions(),
            "command": reproduce_command(run.source.spec, run.recipe, run.calibrated, run.output.dtype,
                                         run.engine.skip_layers, run.output.checkpoint_format),
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        },
    )


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

