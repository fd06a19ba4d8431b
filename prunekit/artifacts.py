"""What prunekit leaves on disk: the one home for artefact names, kinds and their readers / writers.

A pruned checkpoint is a Hugging Face model folder plus ``prunekit.json`` (its *record*: recipe,
calibration, per-layer sparsity or quantization summary, timings, versions); an evaluation is a ``results.json``. Both are
versioned JSON (``kind`` + ``schema_version``, see :mod:`prunekit.io`). Every module that names,
reads or writes them goes through this one, so a name or a kind is spelled once:

>>> from prunekit import artifacts
>>> record = artifacts.read_record("gemma-sw")        # None for a model prunekit did not write
>>> results = artifacts.read_results("gemma-sw/results.json")

This module imports only the standard library and :mod:`prunekit.io`, so anything may import it.
"""

from __future__ import annotations

import platform
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from prunekit.io import read_versioned, write_json_atomic
from prunekit.version import __version__

RECORD_FILE = "prunekit.json"  # a checkpoint's record, next to its weights
RESULTS_FILE = "results.json"  # an evaluation's results (``prunekit eval --out``, a sweep run's dir)
CHECKPOINT_KIND = "prunekit-checkpoint"
RESULTS_KIND = "prunekit-results"
# Sweep bookkeeping (``--runs-dir``): what the sweep writes and the report reads.
SWEEP_KIND = "prunekit-sweep"
SWEEP_CONFIG_KIND = "prunekit-sweep-config"
SWEEP_RUN_KIND = "prunekit-sweep-run"
SWEEP_DENSE_KIND = "prunekit-sweep-dense"
SWEEP_ANALYSIS_KIND = "prunekit-sweep-analysis"
SWEEP_ANALYSIS_RESULT_KIND = "prunekit-sweep-analysis-result"
SWEEP_PUSH_KIND = "prunekit-sweep-push"
SWEEP_SUMMARY_KIND = "prunekit-sweep-summary"
STAGE_STATUS_KIND = "prunekit-stage-status"  # <stage>.status.json in a sweep task's dir
SWEEP_FILE = "sweep.json"  # the last sweep's plan, in the runs dir
SWEEP_SUMMARY_FILE = "sweep-summary.json"
RUN_FILE = "run.json"  # a run's description, in runs/<run hash>/
DENSE_FILE = "dense.json"  # a dense model's description, in dense/<model key>/
ANALYSIS_FILE = "analysis.json"  # an analysis pair's description, in analysis/<pair key>/
ANALYSIS_RESULT_FILE = "result.json"  # what the analysis stage left, next to analysis.json
PUSH_FILE = "push.json"  # the Hub repo a run's push stage published to
# A comparison (``prunekit compare --out``, prunekit.analysis).
COMPARE_FILE = "compare.json"
COMPARE_KIND = "prunekit-compare"
# The sweep report's own JSON (``prunekit report --out``): the leaderboard, findings and tables.
REPORT_JSON_FILE = "leaderboard.json"
REPORT_KIND = "prunekit-report"
# Work in progress: a pruning run's staging dir and an evaluation's per-task progress.
STAGING_KIND = "prunekit-staging"
TASK_PROGRESS_KIND = "prunekit-task-progress"
# A sharded safetensors checkpoint's index (tensor name -> shard file).
INDEX_FILE = "model.safetensors.index.json"

# The files of a checkpoint: what a Hub push sends and a pull / model resolution downloads
# (README.md is the model card).
CHECKPOINT_PATTERNS = [
    "*.safetensors",
    "*.safetensors.index.json",
    "*.bin",
    "*.bin.index.json",
    "config.json",
    "generation_config.json",
    "tokenizer*",
    "special_tokens_map.json",
    "*.model",
    "*.tiktoken",
    "chat_template.*",
    RECORD_FILE,
    RESULTS_FILE,
    "README.md",
]

_CORE_LIBRARIES = ("torch", "transformers")


def library_versions(*extra: str) -> dict[str, str | None]:
    """Versions of prunekit, torch, transformers, Python and the ``extra`` distributions (None if absent).

    Example: ``library_versions("datasets", "lm_eval")`` for an evaluation's results."""
    versions: dict[str, str | None] = {"prunekit": __version__}
    for name in (*_CORE_LIBRARIES, *extra):
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            versions[name] = None
    versions["python"] = platform.python_version()
    return versions


def record_path(checkpoint: str | Path) -> Path:
    return Path(checkpoint) / RECORD_FILE


def read_record(checkpoint: str | Path) -> dict[str, Any] | None:
    """The record of a checkpoint dir, or None for a model prunekit did not write.

    Raises SchemaError when the record has an unknown major schema version or another kind."""
    path = record_path(checkpoint)
    return read_versioned(path, CHECKPOINT_KIND) if path.is_file() else None


def write_record(checkpoint: str | Path, record: dict[str, Any]) -> Path:
    """Write (atomically) the record of a checkpoint dir; returns its path."""
    return write_json_atomic(record_path(checkpoint), record)


# What a record holds per kind of run (``record["recipe"]["kind"]``): its own summary and its own timing.
# A pruning run: ``record["sparsity"]`` (overall, per module, per layer) and ``timings["prune_s"]``; a
# quantization run: ``record["quantization"]`` (format, bytes, per-Linear errors) and ``timings["quantize_s"]``.
SUMMARY_KEYS = {"prune": "sparsity", "quantize": "quantization"}
METHOD_SECONDS_KEYS = {"prune": "prune_s", "quantize": "quantize_s"}


def summary_key(kind: str) -> str:
    """The record key of a run's summary: ``sparsity`` for a pruning run, ``quantization`` for a quantization run."""
    return SUMMARY_KEYS[kind]


def method_seconds_key(kind: str) -> str:
    """The ``timings`` key of the method's own time: ``prune_s`` or ``quantize_s``."""
    return METHOD_SECONDS_KEYS[kind]


def record_kind(record: dict[str, Any]) -> str:
    """``prune`` or ``quantize``: the recipe's kind (a record without one is a quantization if its recipe
    has a quantization)."""
    recipe = record.get("recipe") or {}
    return recipe.get("kind") or ("quantize" if recipe.get("quantization") else "prune")


def sparsity_summary(record: dict[str, Any]) -> dict[str, Any] | None:
    """A pruning run's sparsity (``overall``, ``per_module``, ``per_layer``); None for a quantization run."""
    return record.get(SUMMARY_KEYS["prune"]) if record_kind(record) == "prune" else None


def quantization_summary(record: dict[str, Any]) -> dict[str, Any] | None:
    """A quantization run's summary (``format``, ``bytes``, ``kept_dense``, per-Linear errors); None for a pruning run."""
    return record.get(SUMMARY_KEYS["quantize"]) if record_kind(record) == "quantize" else None


def overall_sparsity(record: dict[str, Any]) -> float | None:
    """The fraction of the pruned Linears' weights that are zero; None for a quantization run."""
    return (sparsity_summary(record) or {}).get("overall")


def method_seconds(record: dict[str, Any]) -> float | None:
    """The seconds the method itself took (``prune_s`` or ``quantize_s``), None if not recorded."""
    return (record.get("timings") or {}).get(method_seconds_key(record_kind(record)))


def weight_bytes(directory: str | Path) -> int | None:
    """Bytes on disk of a checkpoint's weight files (``*.safetensors``, or ``*.bin`` where it has none);
    None for a directory that is not there or holds no weight file."""
    directory = Path(directory)
    if not directory.is_dir():
        return None
    files = sorted(directory.glob("*.safetensors")) or sorted(directory.glob("*.bin"))
    return sum(f.stat().st_size for f in files) if files else None


def results_path(directory: str | Path) -> Path:
    """Where a checkpoint dir or a sweep run's dir keeps its evaluation."""
    return Path(directory) / RESULTS_FILE


def read_results(path: str | Path) -> dict[str, Any]:
    """An evaluation's results (a ``results.json`` file). Raises SchemaError on another kind or major version."""
    return read_versioned(path, RESULTS_KIND)


def write_results(path: str | Path, results: dict[str, Any]) -> Path:
    """Write (atomically) an evaluation's results to ``path``."""
    return write_json_atomic(path, results)


# ------------------------------------------------------------------------------ perplexity settings
# One explanation of why one checkpoint has several perplexities; eval, the demo's report and compare's
# summary each print it with their own settings (tests/test_defaults.py holds the figures to the defaults).
PERPLEXITY_SETTINGS_NOTE = (
    "Perplexity depends on how the text is cut, so it is comparable only between runs with the same settings: "
    "`prunekit eval` scores every window of 2048 tokens of each language's held-out text (joined), the demo the "
    "first 3 windows of 128 tokens (sized for a laptop CPU), and `prunekit compare` each passage on its own "
    "(up to 512 tokens), which its per-passage analyses need."
)


def windows_perplexity_settings(settings: dict[str, Any]) -> str:
    """One line for an evaluation's perplexity settings (``results.json``'s ``settings``)."""
    windows = settings.get("max_windows")
    count = "every window" if windows is None else f"the first {windows} window{'s' * (windows != 1)}"
    source = settings.get("ppl_source") or "no"
    return f"perplexity: {count} of {settings.get('seqlen')} tokens of the {source} held-out text per language"


def passage_perplexity_settings(settings: dict[str, Any]) -> str:
    """One line for a comparison's perplexity settings (``compare.json``'s ``settings``)."""
    budget = settings.get("max_tokens")
    tokens = "all its passages" if budget is None else f"its first {budget} tokens of passages"
    return (f"perplexity: each passage scored on its own (up to {settings.get('max_length')} tokens), "
            f"{tokens} per language, {settings.get('text_source')} text")
