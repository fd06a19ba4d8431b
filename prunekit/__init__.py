"""prunekit: prune multilingual LLMs with language-specific calibration.

    import prunekit
    prunekit.prune("embedded:gemma-3-270m", "wanda", calibration=prunekit.CalibrationSpec("sw"),
                   output=prunekit.OutputSpec("gemma-sw"))

Importing prunekit imports none of the pipeline, the engine or the methods: each name below is imported
on first use.
"""

from prunekit.version import __version__

# name -> the module it lives in, imported on first use (``prunekit.prune`` loads the pipeline then).
_LAZY = {
    "prune": "prunekit.pipeline",
    "CalibrationSpec": "prunekit.recipe",
    "OutputSpec": "prunekit.recipe",
    "EngineSpec": "prunekit.recipe",
    "EvaluationSpec": "prunekit.evaluation.spec",
    "CompareSpec": "prunekit.analysis.spec",
}


def __getattr__(name: str):
    """The face's names, imported on first use: ``prune`` (prunekit.pipeline), ``CalibrationSpec``,
    ``OutputSpec`` and ``EngineSpec`` (prunekit.recipe), ``EvaluationSpec`` (prunekit.evaluation.spec),
    ``CompareSpec`` (prunekit.analysis.spec)."""
    if name not in _LAZY:
        raise AttributeError(f"module 'prunekit' has no attribute '{name}'")
    import importlib

    return getattr(importlib.import_module(_LAZY[name]), name)


__all__ = ["CalibrationSpec", "CompareSpec", "EngineSpec", "EvaluationSpec", "OutputSpec", "__version__", "prune"]
