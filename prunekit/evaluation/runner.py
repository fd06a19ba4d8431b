"""``prunekit.evaluation.evaluate``: perplexity, hidden-state SNR / PE and lm-eval tasks -> results.json."""

from __future__ import annotations

import platform
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Sequence

import torch

from prunekit.errors import ConfigError
from prunekit.evaluation.harness import plan_tasks, resolve_chat_template, run_tasks
from prunekit.evaluation.hidden_states import DenseReference, check_compatible, perplexity_and_hidden_state_errors
from prunekit.evaluation.perplexity import make_windows, perplexity
from prunekit.io import versioned, write_json_atomic
from prunekit.languages import parse_language_list
from prunekit.models import ModelSource, load_model, load_tokenizer, parse_dtype, resolve_device, resolve_model

RESULTS_KIND = "prunekit-results"
DEFAULT_SNR_TOKENS = 4096
MC4_DEFAULT_WINDOWS = 256  # the Wanda / SparseGPT C4 convention: 256 windows of the validation split
CHARS_PER_TOKEN_BUDGET = 8  # how much mC4 text to stream per token needed


def library_versions() -> dict[str, str]:
    import datasets
    import transformers

    from prunekit import __version__

    versions = {"prunekit": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
                "datasets": datasets.__version__, "python": platform.python_version()}
    try:
        from importlib.metadata import version

        versions["lm_eval"] = version("lm_eval")
    except Exception:  # pragma: no cover - lm-eval is a dependency
        versions["lm_eval"] = None
    return versions


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
    langs: str | Sequence[str] = ("en",),
    ppl_source: str | None = "embedded",
    tasks: str | Sequence[str] | None = None,
    limit: int | float | None = None,
    seqlen: int = 2048,
    device: str = "auto",
    batch_size: int = 4,
    snr_tokens: int = DEFAULT_SNR_TOKENS,
    exclude_bos: bool = True,
    snr_store_dtype: str | None = None,
    max_windows: int | None = None,
    task_data: str | Path | None = None,
    chat_template: bool | None = None,
    num_fewshot: int = 0,
    bootstrap_iters: int = 100,
    seed: int = 0,
    out: str | Path | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Evaluate an already-loaded model (the sweep reuses loaded models through this).

    ``dense`` is a :class:`DenseReference` (``DenseReference.from_spec(...)`` or ``.from_loaded(...)``);
    it is only run when its hidden states are not cached yet."""
    started = time.perf_counter()
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
    model.eval()
    model.to(compute_device)
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
            windows = make_windows(tokenizer, [d.text for d in texts.documents], seqlen, windows_wanted)
            if dense is None:
                result = perplexity(model, windows, batch_size, progress, f"perplexity {lang}")
            else:
                result, hidden[lang] = perplexity_and_hidden_state_errors(
                    model, dense, windows, snr_tokens=snr_tokens, device=compute_device, batch_size=batch_size,
                    exclude_bos=exclude_bos, store_dtype=snr_store_dtype, progress=progress, lang=lang,
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
            model, tokenizer, cells, limit=limit, task_data=task_data, chat_template=chat_template,
            num_fewshot=num_fewshot, batch_size=batch_size, bootstrap_iters=bootstrap_iters, seed=seed,
            model_name=f"'{name}'",
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
        "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
        "device": str(compute_device),
        "batch_size": batch_size,
        "ppl_source": ppl_source,
        "max_windows": max_windows,
        "ppl_windowing": "documents joined with '\\n\\n', tokenized once without special tokens, non-overlapping "
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
            "versions": library_versions() | ({"lm_eval_tasks": harness_info["task_versions"]} if harness_info.get("task_versions") else {}),
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        },
    )
    if out is not None:
        write_json_atomic(out, results)
    return results


def evaluate(
    checkpoint: str | Path,
    dense: str | None = None,
    langs: str | Sequence[str] = ("en",),
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
    snr_tokens: int = DEFAULT_SNR_TOKENS,
    exclude_bos: bool = True,
    snr_store_dtype: str | None = None,
    max_windows: int | None = None,
    num_fewshot: int = 0,
    bootstrap_iters: int = 100,
    seed: int = 0,
    trust_remote_code: bool = False,
) -> dict[str, Any]:
    """Evaluate a checkpoint (local dir, Hub id, .gguf, embedded:NAME) and return the results dict.

    Mirrors ``prunekit eval``; writes ``out`` (results.json) atomically when given."""
    from prunekit.pipeline import read_record

    languages = _languages(langs)
    plan_tasks(tasks, languages)  # fail on unknown tasks before loading anything
    parse_dtype(dtype)
    source = resolve_model(str(checkpoint))
    dense_ref = None
    if dense is not None:  # compare configs and tokenizers before loading any weights
        from transformers import AutoConfig

        dense_ref = DenseReference.from_spec(dense, dtype, trust_remote_code)
        config = AutoConfig.from_pretrained(str(source.path), trust_remote_code=trust_remote_code)
        check_compatible(config, load_tokenizer(source, trust_remote_code), dense_ref, name=f"checkpoint '{source.spec}'")
    record = read_record(source.path)
    model, tokenizer, source = load_model(source, dtype, trust_remote_code=trust_remote_code)
    return evaluate_loaded(
        model, tokenizer, source=source, record=record, dense=dense_ref, langs=languages, ppl_source=ppl_source,
        tasks=tasks, limit=limit, seqlen=seqlen, device=device, batch_size=batch_size, snr_tokens=snr_tokens,
        exclude_bos=exclude_bos, snr_store_dtype=snr_store_dtype, max_windows=max_windows, task_data=task_data,
        chat_template=chat_template, num_fewshot=num_fewshot, bootstrap_iters=bootstrap_iters, seed=seed,
        out=out, progress=progress,
    )
