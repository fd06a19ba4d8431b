"""What an evaluation measures and how: :class:`EvaluationSpec`, validated once, when it is made.

``prunekit eval`` builds it from its options (``cli/evaluate.py``), a sweep from its ``evaluation:``
section (``SweepConfig.evaluation``); :func:`prunekit.evaluation.evaluate` takes it whole. Modelled on
lm-evaluation-harness's ``EvaluationConfig``: one frozen value, its settings as JSON, and a fingerprint
of what changes the numbers.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Sequence

from prunekit.conventions import parse_conventions
from prunekit.errors import ConfigError
from prunekit.evaluation.perplexity import DEFAULT_SEQLEN

DEFAULT_SNR_TOKENS = 4096
# What changes no number of the results (left out of the fingerprint): where and how fast they are
# computed. vLLM's max_model_len (it truncates long contexts) and lm-eval's model_args (free-form: a
# dtype, max_length, ...) can change them, so they stay in.
NOT_MEASURED = ("device", "task_batch_size", "backend", "parallelize", "gpu_memory_utilization", "trust_remote_code")


class OptionError(ConfigError):
    """An evaluation option out of range: ``option`` is the field, ``reason`` the sentence without the flag
    (the sweep schema reports it at its YAML path, the CLI as ``--flag reason``)."""

    def __init__(self, option: str, reason: str, message: str | None = None):
        self.option, self.reason = option, reason
        super().__init__(message or f"--{option.replace('_', '-')} {reason}")


def _at_least(option: str, value: int | None, minimum: int) -> None:
    if value is not None and value < minimum:
        raise OptionError(option, f"must be at least {minimum}, got {value}")


def _names(value: str | Sequence[str] | None) -> tuple[str, ...] | None:
    if value is None:
        return None
    items = value.split(",") if isinstance(value, str) else list(value)
    return tuple(str(item).strip() for item in items if str(item).strip())


def _limit(value: int | float | None) -> int | float | None:
    if value is None:
        return None
    if value <= 0:
        raise OptionError("limit", f"must be positive, got {value}")
    return int(value) if value >= 1 and float(value).is_integer() else value


@dataclass(frozen=True)
class EvaluationSpec:
    """An evaluation's choices, validated once, when the spec is made.

    Args:
        langs: language codes (``("sw", "en")``, or ``"sw,en"`` / ``"all"``); None: the study's seven plus the
            checkpoint's calibration languages (``prunekit.languages.default_evaluation_languages``).
        ppl_source: held-out text: ``embedded``, ``mc4`` or a PATH; None (or ``"none"``): no perplexity nor SNR.
        tasks: lm-eval tasks or groups (``"belebele,xcopa"`` or a list); None: none.
        limit: at most N examples per task (a fraction if < 1).
        seqlen: tokens per perplexity window (BOS included).
        dtype: ``auto`` (each checkpoint's own), ``float32``, ``bfloat16`` or ``float16``.
        device: ``auto``, ``cpu`` or ``cuda[:i]``.
        batch_size: windows per forward pass (and lm-eval's batch size on the CPU).
        task_batch_size: lm-eval's batch size: N, ``auto`` or ``auto:N``; None: auto on a GPU.
        backend: ``hf`` or ``vllm`` (in a subprocess of its own) for the tasks.
        parallelize: spread the task model over every GPU this process owns (hf: ``device_map=auto``; vllm:
            tensor parallelism); off by default, one GPU (a sweep turns it on with ``execution.gpus_per_worker`` > 1).
        gpu_memory_utilization: vllm: the fraction of the GPU vLLM may take, in (0, 1] (None: vLLM's 0.9).
        max_model_len: vllm: the longest sequence its KV cache is planned for (None: the model's).
        model_args: extra keyword arguments of lm-eval's model (HFLM or vLLM), ``"key=value,key=value"`` or a
            mapping; kept as a dict; they win over prunekit's.
        snr_tokens: token positions per language for SNR / pruning error.
        include_bos: count the BOS position in SNR / pruning error (excluded by default).
        snr_store_dtype: dtype of the cached dense states (None: the model's).
        max_windows: at most N perplexity windows per language (None: all the text; mc4: 256).
        task_data: directory of local task data. chat_template: wrap task prompts (None: when the tokenizer has one).
        num_fewshot, bootstrap_iters, seed: lm-eval's. trust_remote_code: allow model code from the Hub.
        conventions: ``prunekit`` or ``study`` (how perplexity windows are cut).

    Raises:
        ConfigError: an unknown language, task, backend, dtype or conventions, or a size out of range.

    Example: ``EvaluationSpec(langs="sw,en", seqlen=512, tasks="belebele", limit=50)``.
    """

    langs: tuple[str, ...] | None = None
    ppl_source: str | None = "embedded"
    tasks: tuple[str, ...] | None = None
    limit: int | float | None = None
    seqlen: int = DEFAULT_SEQLEN
    dtype: str = "auto"
    device: str = "auto"
    batch_size: int = 4
    task_batch_size: int | str | None = None
    backend: str = "hf"
    parallelize: bool = False
    gpu_memory_utilization: float | None = None
    max_model_len: int | None = None
    model_args: dict[str, Any] | None = None
    snr_tokens: int = DEFAULT_SNR_TOKENS
    include_bos: bool = False
    snr_store_dtype: str | None = None
    max_windows: int | None = None
    task_data: str | None = None
    chat_template: bool | None = None
    num_fewshot: int = 0
    bootstrap_iters: int = 100
    seed: int = 0
    trust_remote_code: bool = False
    conventions: str = "prunekit"

    def __post_init__(self) -> None:
        from prunekit.evaluation.harness import plan_tasks
        from prunekit.evaluation.lm_backend import check_backend, parse_model_args
        from prunekit.evaluation.hidden_states import store_dtype_for, torch_dtype
        from prunekit.languages import parse_language_list

        object.__setattr__(self, "conventions", parse_conventions(self.conventions))
        langs = _names(self.langs)
        if langs is not None:
            langs = tuple(lang.code for lang in parse_language_list(",".join(langs)))
        object.__setattr__(self, "langs", langs)
        object.__setattr__(self, "ppl_source", None if self.ppl_source in (None, "none") else str(self.ppl_source))
        object.__setattr__(self, "tasks", _names(self.tasks) or None)
        object.__setattr__(self, "limit", _limit(self.limit))
        if self.task_data is not None:
            given = self.task_data
            object.__setattr__(self, "task_data", str(Path(given).expanduser().resolve()))
            if not Path(self.task_data).is_dir():  # before hours of perplexity, not when the tasks start
                raise OptionError("task_data", f"'{given}' is not a directory: give the folder that holds the tasks' "
                                               "local files (e.g. xcopa/sw/test.jsonl), or leave it out to read them from the Hub")
        _at_least("seqlen", self.seqlen, 2)
        _at_least("batch_size", self.batch_size, 1)
        _at_least("snr_tokens", self.snr_tokens, 2)
        _at_least("max_windows", self.max_windows, 1)
        if self.num_fewshot < 0:
            raise OptionError("num_fewshot", f"must be >= 0, got {self.num_fewshot}")
        _at_least("bootstrap_iters", self.bootstrap_iters, 0)
        check_backend(self.backend)
        object.__setattr__(self, "parallelize", bool(self.parallelize))
        object.__setattr__(self, "model_args", parse_model_args(self.model_args) or None)
        self._check_vllm_settings()
        torch_dtype(self.dtype)
        store_dtype_for(None, self.snr_store_dtype)
        if langs is not None:
            plan_tasks(self.tasks, list(langs))  # unknown task names fail before any work

    def _check_vllm_settings(self) -> None:
        utilization, length = self.gpu_memory_utilization, self.max_model_len
        if utilization is not None and not 0 < utilization <= 1:
            raise OptionError("gpu_memory_utilization", f"is the fraction of the GPU vLLM may take, in (0, 1], got {utilization}")
        if length is not None and length < 1:
            raise OptionError("max_model_len", f"must be at least 1 token, got {length}")
        if self.backend != "vllm" and (utilization is not None or length is not None):
            raise OptionError("gpu_memory_utilization" if utilization is not None else "max_model_len",
                              "is a vLLM setting: set the backend to vllm, or drop it",
                              "--gpu-memory-utilization and --max-model-len are vLLM settings: add --backend vllm, or drop them")

    @property
    def exclude_bos(self) -> bool:
        return not self.include_bos

    def with_default_languages(self, record: dict[str, Any] | None) -> tuple[EvaluationSpec, str | None]:
        """This spec with its default languages chosen for a checkpoint whose record is ``record`` (the
        study's seven plus its calibration languages), and the line saying so (None: ``langs`` was given)."""
        if self.langs is not None:
            return self, None
        from prunekit.languages import default_evaluation_languages

        codes, note = default_evaluation_languages(record)
        return self.for_languages(codes), note

    def for_languages(self, langs: Sequence[str]) -> EvaluationSpec:
        """This spec with its languages chosen (how ``evaluate`` fills in the default)."""
        return replace(self, langs=tuple(langs))

    def to_settings(self) -> dict[str, Any]:
        """Every choice as JSON (lists for tuples)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    def fingerprint(self) -> str:
        """A hash of the choices that change the numbers (not where or how fast they are computed)."""
        measured = {k: v for k, v in self.to_settings().items() if k not in NOT_MEASURED}
        return hashlib.sha256(json.dumps(measured, sort_keys=True, default=str).encode()).hexdigest()[:16]
