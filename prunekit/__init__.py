"""prunekit: prune multilingual LLMs with language-specific calibration.

    import prunekit
    prunekit.prune("embedded:gemma-3-270m", "wanda", calibration=prunekit.CalibrationSpec("sw"),
                   output=prunekit.OutputSpec("gemma-sw"))
"""

__version__ = "0.1.0"


def prune(*args, **kwargs):
    """Prune a model; see :func:`prunekit.pipeline.prune`."""
    from prunekit.pipeline import prune as _prune

    return _prune(*args, **kwargs)


def __getattr__(name: str):
    """The run's specs, imported on first use: ``CalibrationSpec`` (prunekit.recipe), ``EvaluationSpec``
    (prunekit.evaluation.spec) and ``OutputSpec`` (prunekit.pipeline)."""
    if name == "CalibrationSpec":
        from prunekit.recipe import CalibrationSpec

        return CalibrationSpec
    if name == "EvaluationSpec":
        from prunekit.evaluation.spec import EvaluationSpec

        return EvaluationSpec
    if name == "OutputSpec":
        from prunekit.pipeline import OutputSpec

        return OutputSpec
    raise AttributeError(f"module 'prunekit' has no attribute '{name}'")


__all__ = ["CalibrationSpec", "EvaluationSpec", "OutputSpec", "__version__", "prune"]
