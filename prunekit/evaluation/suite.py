"""The evaluation suite of one model: ``evaluate`` / ``evaluate_loaded`` run perplexity, hidden-state
SNR / pruning error and lm-eval tasks, as an :class:`~prunekit.evaluation.spec.EvaluationSpec` says, and
assemble them into results.json.

Results are written as they finish: with ``out``, the perplexity and SNR of every language are saved
(atomically, in ``out``) before the lm-eval tasks start, and each task as it ends (the harness's
partial file). A rerun with the same model, dense reference and measured settings finds them there,
says so, and skips them.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import torch

from prunekit.artifacts import RESULTS_KIND, library_versions, read_record, read_results, write_results
from prunekit.conventions import DESCRIPTIONS, describe as describe_conventions
from prunekit.errors import ConfigError, PrunekitError
from prunekit.evaluation.forward import ModelWeights, Weights, open_weights
from prunekit.evaluation.harness import partial_results_path, plan_tasks, resolve_chat_template, run_tasks
from prunekit.evaluation.lm_backend import BackendPlan, plan_backend
from prunekit.evaluation.hidden_states import DenseReference, check_compatible, model_fingerprint, torch_dtype
from prunekit.evaluation.passes import Language, measure
from prunekit.evaluation.perplexity import MC4_DEFAULT_WINDOWS, make_windows
from prunekit.evaluation.spec import DEFAULT_SNR_TOKENS, EvaluationSpec
from prunekit.io import versioned
from prunekit.models import ModelSource, load_model, load_tokenizer, resolve_device, resolve_model

log = logging.getLogger(__name__)

__all__ = ["DEFAULT_SNR_TOKENS", "RESULTS_KIND", "evaluate", "evaluate_loaded"]

CHARS_PER_TOKEN_BUDGET = 8  # how much mC4 text to stream per token needed
PPL_WINDOWING = ("documents joined with '\\n\\n', tokenized once without special tokens, non-overlapping "
                 "windows of seqlen-1 tokens each prefixed with BOS (BOS never scored; without a BOS token: "
                 "windows of seqlen tokens, first token context only); last partial window scored if >= 2 tokens")


@dataclass
class Subject:
    """The model being evaluated: its weights (streamed or in memory) and how to get it whole for tasks."""

    weights: Weights
    tokenizer: Any
    task_model: Callable[[], Any]
    source: ModelSource | None = None
    record: dict[str, Any] | None = None

    @property
    def name(self) -> str:
        if self.source is not None:
            return self.source.spec
        return getattr(self.weights.model.config, "_name_or_path", "") or "the model"

    @property
    def dtype(self) -> torch.dtype:
        return next(self.weights.model.parameters()).dtype

    def identity(self) -> str | None:
        return None if self.source is None else model_fingerprint(self.source)


def evaluate_loaded(
    model: torch.nn.Module,
    tokenizer,
    spec: EvaluationSpec | None = None,
    *,
    source: ModelSource | None = None,
    record: dict[str, Any] | None = None,
    dense: DenseReference | None = None,
    out: str | Path | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Evaluate an already-loaded model as ``spec`` says (default: ``EvaluationSpec()``; its ``langs``
    None means English here, there being no checkpoint record to read).

    ``dense`` is a :class:`DenseReference`; it is only run when its hidden states are not cached yet.
    The model stays where it is for the perplexity / SNR forward (each layer visits the compute device
    in turn) and moves to the device only for the lm-eval tasks."""
    spec = spec or EvaluationSpec()
    if spec.langs is None:
        spec = spec.for_languages(["en"])
    model.eval()
    subject = Subject(ModelWeights(model), tokenizer, lambda: model, source, record)
    return _evaluate(subject, spec, dense, out, progress)


def evaluate(
    checkpoint: str | Path | ModelSource,
    spec: EvaluationSpec | None = None,
    *,
    dense: str | DenseReference | None = None,
    out: str | Path | None = None,
    progress: bool = True,
    revision: str | None = None,
) -> dict[str, Any]:
    """Evaluate a checkpoint per language and return its results (what ``prunekit eval`` runs).

    Perplexity and SNR stream the checkpoint a decoder layer at a time from its safetensors shards, every
    language in one pass; the model is loaded whole only for lm-eval tasks.

    Args:
        checkpoint (`str`, `Path` or `ModelSource`):
            The model to evaluate: a local checkpoint dir (e.g. from ``prunekit prune``), a Hub id
            (``org/name``, downloaded into the Hugging Face cache), a ``.gguf`` file, or ``embedded:NAME``; or one
            already resolved by ``prunekit.models.resolve_model`` (``revision`` is then ignored).
        spec (`EvaluationSpec`, *optional*, defaults to `EvaluationSpec()`):
            What to measure and how: languages, perplexity text and windows (``seqlen`` 2048, all the embedded
            held-out text), SNR tokens, lm-eval tasks and their backend. Its ``langs`` None means the study's
            seven languages plus the checkpoint's calibration languages.
        dense (`str` or `DenseReference`, *optional*, defaults to `None`):
            The dense model the checkpoint was pruned from (a MODEL string as ``checkpoint``, or a reference a
            sweep shares between runs). Enables SNR / pruning error of hidden states, its states cached per dense
            model. None: no SNR (``prunekit eval`` defaults it to the recorded base model; this function does not).
        out (`str` or `Path`, *optional*, defaults to `None`):
            The results.json to write atomically: perplexity and SNR before the tasks start, each task as it
            ends; a rerun with the same settings skips what it holds. None: nothing is written.
        progress (`bool`, *optional*, defaults to `True`):
            Show progress bars.
        revision (`str`, *optional*, defaults to `None`):
            The Hub revision (branch, tag or commit) of a Hub ``checkpoint``; None: its default branch.

    Returns:
        `dict`: the results (schema in ``prunekit/evaluation/SCHEMA.md``): ``model``, ``dense``, ``languages``,
        ``perplexity`` and ``hidden_states`` per language, ``tasks``, ``settings``, ``versions``, ``created``.

    Raises:
        [`ConfigError`]: an option the spec refuses, or SNR asked for without evaluation text (``ppl_source`` none).
        [`ModelError`]: a checkpoint that cannot be found or read, or a checkpoint and dense model of different
            architectures or tokenizers.
        [`DataError`]: evaluation text too short to score one window.
        [`HubError`]: a Hub id that cannot be downloaded.

    Example:

    ```python
    >>> from prunekit.evaluation import EvaluationSpec, evaluate
    >>> results = evaluate("gemma-sw", EvaluationSpec(langs="sw,en"), dense="embedded:gemma-3-270m", out="results.json")
    >>> results["perplexity"]["sw"]["ppl"], results["hidden_states"]["sw"]["snr_db"]
    ```
    """
    spec = spec or EvaluationSpec()
    source = checkpoint if isinstance(checkpoint, ModelSource) else resolve_model(str(checkpoint), revision)
    record = read_record(source.path)
    spec, _ = spec.with_default_languages(record)
    wanted = torch_dtype(spec.dtype)
    tokenizer = load_tokenizer(source, spec.trust_remote_code)
    dense_ref = None
    if dense is not None:  # compare configs and tokenizers before loading any weights
        dense_ref = dense if isinstance(dense, DenseReference) else DenseReference.from_spec(dense, spec.dtype, spec.trust_remote_code)
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(str(source.path), trust_remote_code=spec.trust_remote_code)
        check_compatible(config, tokenizer, dense_ref, name=f"checkpoint '{source.spec}'")
    weights = open_weights(source, wanted, spec.trust_remote_code)

    def task_model() -> Any:
        if isinstance(weights, ModelWeights):
            return weights.model
        model, _, _ = load_model(source, wanted or next(weights.model.parameters()).dtype,
                                 trust_remote_code=spec.trust_remote_code, with_tokenizer=False)
        return model

    return _evaluate(Subject(weights, tokenizer, task_model, source, record), spec, dense_ref, out, progress)


# ------------------------------------------------------------------------------------------ the suite


def _evaluate(subject: Subject, spec: EvaluationSpec, dense: DenseReference | None, out, progress: bool) -> dict[str, Any]:
    started = time.perf_counter()
    cells = plan_tasks(spec.tasks, list(spec.langs))
    if any(cell.kind != "n/a" for cell in cells):
        resolve_chat_template(subject.tokenizer, spec.chat_template, f"'{subject.name}'")  # fail before the slow parts
    if dense is not None:
        check_compatible(subject.weights.model.config, subject.tokenizer, dense, name=f"'{subject.name}'")
        if spec.ppl_source is None:
            raise ConfigError("SNR / pruning error need evaluation text: give --ppl-source together with --dense")
    device = resolve_device(spec.device)
    backend = plan_backend(spec, device, path=None if subject.source is None else subject.source.path,
                           dtype=subject.dtype) if cells else None
    timings: dict[str, float] = {}
    results = _resumed(out, subject, spec, dense)
    if results is None:
        t0 = time.perf_counter()
        perplexities, hidden = _perplexity_and_hidden_states(subject, spec, dense, device, progress)
        if spec.ppl_source is not None:
            timings["perplexity_and_hidden_states_s"] = time.perf_counter() - t0
        results = _results(subject, spec, dense, device, backend, cells, (perplexities, hidden), ({}, {}), timings)
        if out is not None and cells and spec.ppl_source is not None:
            write_results(out, results)  # saved before the tasks start: an error there loses nothing
    else:
        timings = results["settings"]["timings"]
    if cells:
        t0 = time.perf_counter()
        task_results, harness_info = _tasks(subject, spec, backend, cells, device, out, dict(results))
        timings["tasks_s"] = time.perf_counter() - t0
        results = _results(subject, spec, dense, device, backend, cells, (results["perplexity"], results["hidden_states"]),
                           (task_results, harness_info), timings)
    timings["total_s"] = time.perf_counter() - started
    results["settings"]["timings"] = timings
    if out is not None:
        write_results(out, results)
        partial_results_path(out).unlink(missing_ok=True)  # the finished results replace the per-task progress
    return results


def _resumed(out, subject: Subject, spec: EvaluationSpec, dense: DenseReference | None) -> dict[str, Any] | None:
    """The results an interrupted run of the same evaluation left in ``out`` (its perplexity and SNR), if any."""
    if out is None or not Path(out).exists() or subject.identity() is None or spec.ppl_source is None:
        return None
    try:
        saved = read_results(out)
    except PrunekitError:
        return None
    settings = saved.get("settings") or {}
    same = (settings.get("fingerprint") == spec.fingerprint() and settings.get("model_fingerprint") == subject.identity()
            and saved.get("dense") == (None if dense is None else dense.to_json())
            and set(saved.get("perplexity") or {}) == set(spec.langs))
    if not same:
        return None
    log.warning("perplexity%s of %s already in %s; skipping them", " and SNR" if dense is not None else "",
                ",".join(spec.langs), out)
    return saved


def _perplexity_and_hidden_states(subject: Subject, spec: EvaluationSpec, dense: DenseReference | None, device,
                                  progress: bool) -> tuple[dict[str, Any], dict[str, Any]]:
    """Every language's perplexity (and SNR / PE against ``dense``) in one pass over the model's layers."""
    if spec.ppl_source is None:
        return {}, {}
    from prunekit.textsources import load_texts

    windows_wanted = spec.max_windows if spec.max_windows is not None else (MC4_DEFAULT_WINDOWS if spec.ppl_source == "mc4" else None)
    budget = windows_wanted * spec.seqlen * CHARS_PER_TOKEN_BUDGET if (spec.ppl_source == "mc4" and windows_wanted) else None
    languages, texts = [], {}
    for lang in spec.langs:
        texts[lang] = load_texts(spec.ppl_source, lang, "evaluation", char_budget=budget)
        windows = make_windows(subject.tokenizer, [d.text for d in texts[lang].documents], spec.seqlen, windows_wanted,
                               spec.conventions)
        languages.append(Language.of(lang, windows, spec.snr_tokens))
    is_dense = dense is not None and (dense.holds(subject.weights) or subject.identity() == dense.fingerprint)
    measured = measure(subject.weights, languages, dense, device=device, batch_size=spec.batch_size,
                       exclude_bos=spec.exclude_bos, store_dtype=spec.snr_store_dtype, is_dense=is_dense, progress=progress)
    if dense is not None:
        dense.release()  # its states are cached; free the memory before the tasks
    perplexities = {
        lang: result.to_json() | {"source": spec.ppl_source, "location": texts[lang].location,
                                  "content_hash": texts[lang].content_hash, "bos": result.bos}
        for lang, result in measured.perplexity.items()
    }
    return perplexities, measured.hidden


def _tasks(subject: Subject, spec: EvaluationSpec, backend: BackendPlan, cells, device, out, saved) -> tuple[dict, dict]:
    def save(done: dict[str, Any], info: dict[str, Any]) -> None:  # each task in results.json as it ends
        saved["tasks"] = done
        write_results(out, saved)

    return run_tasks(
        backend.model(subject.task_model, device), subject.tokenizer, cells, spec,
        model_name=f"'{subject.name}'", backend=backend, partial=None if out is None else partial_results_path(out),
        identity={"model": subject.identity(), "dtype": str(subject.dtype)},
        on_task=save if out is not None and spec.ppl_source is not None else None,
    )


def _settings(subject: Subject, spec: EvaluationSpec, dense, device, backend, cells, harness_info, timings) -> dict[str, Any]:
    conventions = spec.conventions
    return {
        "seqlen": spec.seqlen,
        "dtype": str(subject.dtype).replace("torch.", ""),
        "device": str(device),
        "batch_size": spec.batch_size,
        "task_batch_size": backend.batch_size if cells else None,
        "backend": backend.describe() if cells else None,
        "max_model_len": spec.max_model_len,
        "model_args": spec.model_args,
        "ppl_source": spec.ppl_source,
        "max_windows": spec.max_windows,
        "conventions": describe_conventions(conventions),
        "ppl_windowing": DESCRIPTIONS[conventions]["perplexity"] if conventions != "prunekit" else PPL_WINDOWING,
        "snr_tokens": spec.snr_tokens if dense is not None else None,
        "exclude_bos": spec.exclude_bos if dense is not None else None,
        "snr_store_dtype": spec.snr_store_dtype or "model",
        "tasks": [c.name for c in cells],
        "task_data": spec.task_data,
        "limit": spec.limit,
        "num_fewshot": spec.num_fewshot,
        "chat_template": harness_info.get("chat_template"),
        "chat_template_sha": harness_info.get("chat_template_sha"),
        "bootstrap_iters": spec.bootstrap_iters,
        "seed": spec.seed,
        "fingerprint": spec.fingerprint(),
        "model_fingerprint": subject.identity(),
        "timings": timings,
    }


def _results(subject: Subject, spec: EvaluationSpec, dense, device, backend, cells, measured: tuple[dict, dict],
             tasks: tuple[dict, dict], timings) -> dict[str, Any]:
    """results.json: ``measured`` = (perplexity, hidden_states), ``tasks`` = (task results, harness info)."""
    (perplexities, hidden), (task_results, harness_info) = measured, tasks
    source = subject.source
    model_block = {
        "spec": subject.name,
        "path": str(source.path) if source is not None else None,
        "revision": source.revision if source is not None else None,
        "kind": source.kind if source is not None else "in-memory",
        "record": subject.record,
    }
    versions = library_versions("datasets", "lm_eval")
    if harness_info.get("task_versions"):
        versions["lm_eval_tasks"] = harness_info["task_versions"]
    return versioned(RESULTS_KIND, {
        "model": model_block,
        "dense": None if dense is None else dense.to_json(),
        "languages": list(spec.langs),
        "perplexity": perplexities,
        "hidden_states": hidden,
        "tasks": task_results,
        "settings": _settings(subject, spec, dense, device, backend, cells, harness_info, timings),
        "versions": versions,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    })
