"""The evaluation suite of one model: ``evaluate`` / ``evaluate_loaded`` run perplexity, hidden-state
SNR / pruning error and lm-eval tasks and assemble them into results.json."""

from __future__ import annotations

import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Sequence

import torch

from prunekit.artifacts import RESULTS_KIND, library_versions, read_record, write_results
from prunekit.conventions import DESCRIPTIONS, describe as describe_conventions, parse_conventions
from prunekit.errors import ConfigError
from prunekit.evaluation.forward import ModelWeights, Weights, open_weights
from prunekit.evaluation.harness import BackendPlan, check_backend, partial_results_path, plan_backend, plan_tasks, resolve_chat_template, run_tasks
from prunekit.evaluation.hidden_states import (
    DenseReference,
    check_compatible,
    model_fingerprint,
    perplexity_and_hidden_state_errors,
    torch_dtype,
)
from prunekit.evaluation.perplexity import make_windows, perplexity
from prunekit.io import versioned
from prunekit.languages import parse_language_list
from prunekit.models import ModelSource, load_model, load_tokenizer, resolve_device, resolve_model

DEFAULT_SNR_TOKENS = 4096
MC4_DEFAULT_WINDOWS = 256  # the Wanda / SparseGPT C4 convention: 256 windows of the validation split
CHARS_PER_TOKEN_BUDGET = 8  # how much mC4 text to stream per token needed


def _languages(langs: str | Sequence[str]) -> list[str]:
    spec = langs if isinstance(langs, str) else ",".join(langs)
    return [lang.code for lang in parse_language_list(spec)]


def _check_positive(name: str, value: int | None, minimum: int = 1) -> None:
    if value is not None and value < minimum:
        raise ConfigError(f"{name} must be at least {minimum}, got {value}")


def evaluate_loaded(
    model: torch.nn.Module,
    tokenizer,
    *,
    source: ModelSource | None = None,
    record: dict[str, Any] | None = None,
    dense: DenseReference | None = None,
    **options: Any,
) -> dict[str, Any]:
    """Evaluate an already-loaded model (the sweep reuses loaded models through this).

    ``dense`` is a :class:`DenseReference` (``DenseReference.from_spec(...)`` or ``.from_loaded(...)``);
    it is only run when its hidden states are not cached yet. The model stays where it is for the
    perplexity / SNR forward (each layer visits the compute device in turn) and moves to the device
    only for the lm-eval tasks. ``options``: the keyword options of :func:`evaluate`."""
    model.eval()

    def task_model() -> Any:
        return model

    return _evaluate(ModelWeights(model), tokenizer, task_model, source=source, record=record, dense=dense, **options)


def _evaluate(
    weights: Weights,
    tokenizer,
    task_model,
    *,
    source: ModelSource | None = None,
    record: dict[str, Any] | None = None,
    dense: DenseReference | None = None,
    langs: str | Sequence[str] = ("en",),
    ppl_source: str | None = "embedded",
    tasks: str | Sequence[str] | None = None,
    limit: int | float | None = None,
    seqlen: int = 2048,
    device: str = "auto",
    batch_size: int = 4,
    task_batch_size: int | str | None = None,
    backend: str = "hf",
    parallelize: bool | None = None,
    gpu_memory_utilization: float | None = None,
    max_model_len: int | None = None,
    model_args: str | dict[str, Any] | None = None,
    snr_tokens: int = DEFAULT_SNR_TOKENS,
    exclude_bos: bool = True,
    snr_store_dtype: str | None = None,
    max_windows: int | None = None,
    task_data: str | Path | None = None,
    trust_remote_code: bool = False,
    chat_template: bool | None = None,
    num_fewshot: int = 0,
    bootstrap_iters: int = 100,
    seed: int = 0,
    out: str | Path | None = None,
    progress: bool = True,
    conventions: str = "prunekit",
) -> dict[str, Any]:
    started = time.perf_counter()
    model = weights.model  # in memory, or the meta-device skeleton of a streamed checkpoint
    conventions = parse_conventions(conventions)
    languages = _languages(langs)
    cells = plan_tasks(tasks, languages)  # unknown task names fail before any work
    _check_positive("--seqlen", seqlen, 2)
    _check_positive("--batch-size", batch_size)
    _check_positive("--snr-tokens", snr_tokens, 2)
    _check_positive("--max-windows", max_windows)
    if num_fewshot < 0:
        raise ConfigError(f"--num-fewshot must be >= 0, got {num_fewshot}")
    if limit is not None and limit <= 0:
        raise ConfigError(f"--limit must be positive, got {limit}")
    name = source.spec if source is not None else getattr(model.config, "_name_or_path", "") or "the model"
    if any(cell.kind != "n/a" for cell in cells):
        resolve_chat_template(tokenizer, chat_template, f"'{name}'")  # fail before the slow parts
    if dense is not None:
        check_compatible(model.config, tokenizer, dense, name=f"'{name}'")
    compute_device = resolve_device(device)
    dtype = next(model.parameters()).dtype
    backend_plan = plan_backend(backend, parallelize, compute_device, task_batch_size, batch_size,
                                path=None if source is None else source.path, dtype=dtype,
                                trust_remote_code=trust_remote_code, gpu_memory_utilization=gpu_memory_utilization,
                                max_model_len=max_model_len, model_args=model_args) if cells else BackendPlan("hf", False, batch_size)
    timings: dict[str, float] = {}

    perplexities: dict[str, Any] = {}
    hidden: dict[str, Any] = {}
    if ppl_source is not None:
        from prunekit.textsources import load_texts

        t0 = time.perf_counter()
        for lang in languages:
            windows_wanted = max_windows if max_windows is not None else (MC4_DEFAULT_WINDOWS if ppl_source == "mc4" else None)
            budget = windows_wanted * seqlen * CHARS_PER_TOKEN_BUDGET if (ppl_source == "mc4" and windows_wanted) else None
            texts = load_texts(ppl_source, lang, "evaluation", char_budget=budget)
            windows = make_windows(tokenizer, [d.text for d in texts.documents], seqlen, windows_wanted, conventions)
            if dense is None:
                result = perplexity(weights, windows, batch_size, progress, f"perplexity {lang}", device=compute_device)
            else:
                result, hidden[lang] = perplexity_and_hidden_state_errors(
                    weights, dense, windows, snr_tokens=snr_tokens,
                    device=compute_device, batch_size=batch_size, exclude_bos=exclude_bos,
                    store_dtype=snr_store_dtype, progress=progress, lang=lang,
                )
            perplexities[lang] = result.to_json() | {
                "source": ppl_source, "location": texts.location, "content_hash": texts.content_hash, "bos": result.bos,
            }
        timings["perplexity_and_hidden_states_s"] = time.perf_counter() - t0
        if dense is not None:
            dense.release()  # its states are cached; free the memory before the tasks
    elif dense is not None:
        raise ConfigError("SNR / pruning error need evaluation text: give --ppl-source together with --dense")

    task_results: dict[str, Any] = {}
    harness_info: dict[str, Any] = {}
    if cells:
        t0 = time.perf_counter()
        task_results, harness_info = run_tasks(
            backend_plan.model(task_model, compute_device), tokenizer, cells, limit=limit, task_data=task_data,
            chat_template=chat_template, num_fewshot=num_fewshot, batch_size=backend_plan.batch_size,
            bootstrap_iters=bootstrap_iters, seed=seed, model_name=f"'{name}'", backend=backend_plan,
            partial=None if out is None else partial_results_path(out),
            identity={"model": None if source is None else model_fingerprint(source), "dtype": str(dtype)},
        )
        timings["tasks_s"] = time.perf_counter() - t0
    timings["total_s"] = time.perf_counter() - started

    model_block = {
        "spec": name,
        "path": str(source.path) if source is not None else None,
        "revision": source.revision if source is not None else None,
        "kind": source.kind if source is not None else "in-memory",
        "record": record,
    }
    settings = {
        "seqlen": seqlen,
        "dtype": str(dtype).replace("torch.", ""),
        "device": str(compute_device),
        "batch_size": batch_size,
        "task_batch_size": backend_plan.batch_size if cells else None,
        "backend": backend_plan.describe() if cells else None,
        "ppl_source": ppl_source,
        "max_windows": max_windows,
        "conventions": describe_conventions(conventions),
        "ppl_windowing": DESCRIPTIONS[conventions]["perplexity"] if conventions != "prunekit" else "documents joined with '\\n\\n', tokenized once without special tokens, non-overlapping "
                         "windows of seqlen-1 tokens each prefixed with BOS (BOS never scored; without a BOS token: "
                         "windows of seqlen tokens, first token context only); last partial window scored if >= 2 tokens",
        "snr_tokens": snr_tokens if dense is not None else None,
        "exclude_bos": exclude_bos if dense is not None else None,
        "snr_store_dtype": snr_store_dtype or "model",
        "tasks": [c.name for c in cells],
        "task_data": str(Path(task_data).expanduser().resolve()) if task_data is not None else None,
        "limit": limit,
        "num_fewshot": num_fewshot,
        "chat_template": harness_info.get("chat_template"),
        "chat_template_sha": harness_info.get("chat_template_sha"),
        "bootstrap_iters": bootstrap_iters,
        "seed": seed,
        "timings": timings,
    }
    results = versioned(
        RESULTS_KIND,
        {
            "model": model_block,
            "dense": None if dense is None else {"spec": dense.spec, "revision": dense.revision, "fingerprint": dense.fingerprint},
            "languages": languages,
            "perplexity": perplexities,
            "hidden_states": hidden,
            "tasks": task_results,
            "settings": settings,
            "versions": library_versions("datasets", "lm_eval") | ({"lm_eval_tasks": harness_info["task_versions"]} if harness_info.get("task_versions") else {}),
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        },
    )
    if out is not None:
        write_results(out, results)
        partial_results_path(out).unlink(missing_ok=True)  # the finished results replace the per-task progress
    return results


def evaluate(
    checkpoint: str | Path,
    dense: str | None = None,
    langs: str | Sequence[str] | None = None,
    ppl_source: str | None = "embedded",
    tasks: str | Sequence[str] | None = None,
    limit: int | float | None = None,
    seqlen: int = 2048,
    dtype: str = "auto",
    device: str = "auto",
    out: str | Path | None = None,
    progress: bool = True,
    task_data: str | Path | None = None,
    chat_template: bool | None = None,
    *,
    batch_size: int = 4,
    task_batch_size: int | str | None = None,
    backend: str = "hf",
    parallelize: bool | None = None,
    gpu_memory_utilization: float | None = None,
    max_model_len: int | None = None,
    model_args: str | dict[str, Any] | None = None,
    snr_tokens: int = DEFAULT_SNR_TOKENS,
    exclude_bos: bool = True,
    snr_store_dtype: str | None = None,
    max_windows: int | None = None,
    num_fewshot: int = 0,
    bootstrap_iters: int = 100,
    seed: int = 0,
    trust_remote_code: bool = False,
    conventions: str = "prunekit",
) -> dict[str, Any]:
    """Evaluate a checkpoint (local dir, Hub id, .gguf, embedded:NAME) and return the results dict.

    Mirrors ``prunekit eval``; writes ``out`` (results.json) atomically when given. Perplexity and SNR
    stream the checkpoint a decoder layer at a time from its safetensors shards; the model is loaded
    whole only for lm-eval tasks (by lm-eval itself with ``parallelize`` or ``backend="vllm"``). ``langs`` None:
    the study's seven plus the checkpoint's calibration languages (``default_evaluation_languages``)."""
    from prunekit.languages import default_evaluation_languages

    if langs is None:
        langs = default_evaluation_languages(read_record(resolve_model(str(checkpoint)).path))[0]
    languages = _languages(langs)
    plan_tasks(tasks, languages)  # fail on unknown tasks before loading anything
    check_backend(backend)
    wanted = torch_dtype(dtype)
    source = resolve_model(str(checkpoint))
    tokenizer = load_tokenizer(source, trust_remote_code)
    dense_ref = None
    if dense is not None:  # compare configs and tokenizers before loading any weights
        from transformers import AutoConfig

        dense_ref = DenseReference.from_spec(dense, dtype, trust_remote_code)
        config = AutoConfig.from_pretrained(str(source.path), trust_remote_code=trust_remote_code)
        check_compatible(config, tokenizer, dense_ref, name=f"checkpoint '{source.spec}'")
    record = read_record(source.path)
    weights = open_weights(source, wanted, trust_remote_code)

    def task_model() -> Any:
        if isinstance(weights, ModelWeights):
            return weights.model
        model, _, _ = load_model(source, wanted or weights_dtype(weights), trust_remote_code=trust_remote_code,
                                 with_tokenizer=False)
        return model

    return _evaluate(
        weights, tokenizer, task_model, source=source, record=record, dense=dense_ref, langs=languages,
        ppl_source=ppl_source, tasks=tasks, limit=limit, seqlen=seqlen, device=device, batch_size=batch_size,
        task_batch_size=task_batch_size, backend=backend, parallelize=parallelize, snr_tokens=snr_tokens,
        gpu_memory_utilization=gpu_memory_utilization, max_model_len=max_model_len, model_args=model_args,
        exclude_bos=exclude_bos, snr_store_dtype=snr_store_dtype, max_windows=max_windows, task_data=task_data,
        chat_template=chat_template, num_fewshot=num_fewshot, bootstrap_iters=bootstrap_iters, seed=seed,
        out=out, progress=progress, trust_remote_code=trust_remote_code, conventions=conventions,
    )


def weights_dtype(weights: Weights) -> torch.dtype:
    return next(weights.model.parameters()).dtype
