"""prunekit.analysis: what pruning changed between two checkpoints (study §5, App. D.2–D.4).

- mask IoU / IoMin / seed intersections, streamed from safetensors (``masks``);
- LSAR subspace drift of language-agnostic and language-specific features (``lsar``);
- LAPE of FFN neurons, dense-sorted bins and neuron deactivation (``lape``);
- per-layer hidden-state drift (``drift``).

``compare(a, b, CompareSpec(...), dense=None, out=None)`` mirrors ``prunekit compare`` (``a`` / ``b`` a checkpoint,
or a list of its seeds for mask intersections);
the :class:`CompareSpec` (``analysis/spec.py``) holds what to measure and how, validated once. The analysis reads checkpoints and runs models; it does
not import the pruning stack (prunekit.engine, prunekit.pipeline, prunekit.methods).
"""

from __future__ import annotations

from typing import Any

from prunekit.analysis.spec import ANALYSES, CompareSpec

__all__ = ["ANALYSES", "CompareSpec", "compare", "compare_masks"]


def compare(*args: Any, **kwargs: Any) -> dict[str, Any]:
    """Compare two checkpoints; see :func:`prunekit.analysis.api.compare`."""
    from prunekit.analysis.api import compare as _compare

    return _compare(*args, **kwargs)


def compare_masks(*args: Any, **kwargs: Any) -> dict[str, Any]:
    """Mask overlap only; see :func:`prunekit.analysis.masks.compare_masks`."""
    from prunekit.analysis.masks import compare_masks as _compare_masks

    return _compare_masks(*args, **kwargs)
