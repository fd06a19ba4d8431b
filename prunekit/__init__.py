"""prunekit: prune multilingual LLMs with language-specific calibration."""

__version__ = "0.1.0"


def prune(*args, **kwargs):
    """Prune a model; see :func:`prunekit.pipeline.prune`."""
    from prunekit.pipeline import prune as _prune

    return _prune(*args, **kwargs)


__all__ = ["__version__", "prune"]
