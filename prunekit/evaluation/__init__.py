"""Evaluation: per-language perplexity, SNR / pruning error of hidden states, lm-eval tasks.

    from prunekit.evaluation import EvaluationSpec, evaluate
    spec = EvaluationSpec(langs=["sw", "en"], ppl_source="embedded", tasks=["belebele"])
    results = evaluate("gemma-sw", spec, dense="embedded:gemma-3-270m", out="results.json")

``evaluate_loaded`` takes an already-loaded (model, tokenizer) so sweeps reuse loaded models.
The results schema is documented in SCHEMA.md beside this file.
"""

from prunekit.evaluation.harness import plan_tasks, run_tasks
from prunekit.evaluation.hidden_states import (
    COUNTERS,
    DenseReference,
    check_compatible,
    hidden_state_errors,
    pruning_error_and_snr,
)
from prunekit.evaluation.spec import EvaluationSpec
from prunekit.evaluation.perplexity import PerplexityResult, Windows, make_windows, perplexity
from prunekit.evaluation.suite import RESULTS_KIND, evaluate, evaluate_loaded

__all__ = [
    "COUNTERS",
    "DenseReference",
    "EvaluationSpec",
    "PerplexityResult",
    "RESULTS_KIND",
    "Windows",
    "check_compatible",
    "evaluate",
    "evaluate_loaded",
    "hidden_state_errors",
    "make_windows",
    "perplexity",
    "plan_tasks",
    "pruning_error_and_snr",
    "run_tasks",
]
