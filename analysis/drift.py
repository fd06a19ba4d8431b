"""Hidden-state drift (study Fig. 4): per decoder layer and evaluation language, the mean magnitude
of the difference between the reference (dense) and the pruned model's residual-stream outputs over
the same valid tokens.

- ``mean_abs``: mean over valid tokens and features of |h_ref − h| (the figure's quantity);
- ``mean_l2``: mean over valid tokens of ‖h_ref − h‖₂;
- ``relative``: mean_abs / mean |h_ref| (drift on the scale of the layer's own activations).
The layer outputs are taken by forward hooks on the decoder layers (analysis-spec §0.2), cast to
fp32 before subtracting, summed in fp64.
"""

from __future__ import annotations

from typing import Any

from prunekit.analysis.activations import PassResult


def summarize(target: PassResult) -> dict[str, Any]:
    """Per language: lists over layers (index 0 = output of the first decoder layer)."""
    if target.drift_abs_sum is None:
        raise ValueError("this pass did not compare hidden states")
    per_lang = {}
    d = target.hidden_size
    for k, lang in enumerate(target.langs):
        n = target.valid_tokens.get(lang, 0)
        abs_sum, l2_sum, ref_sum = target.drift_abs_sum[k], target.drift_l2_sum[k], target.reference_abs_sum[k]
        per_lang[lang] = {
            "tokens": n,
            "mean_abs": [float(x / (n * d)) if n else None for x in abs_sum],
            "mean_l2": [float(x / n) if n else None for x in l2_sum],
            "relative": [float(a / r) if r else None for a, r in zip(abs_sum, ref_sum)],
        }
    return {"per_language": per_lang, "num_layers": target.num_layers}
