"""Hidden-state drift (study Fig. 4): per decoder layer and evaluation language, the mean over valid tokens of the L2 norm of h_ref − h.

The study's quantity, and the Δ LSAR uses, is the per-token L2 norm ‖h_ref − h‖₂ of the difference
between the reference (dense) and the pruned model's residual-stream outputs over the same valid
tokens (its Fig. 4 reads 20–60 at layer 32 of an 8B model). Reported per layer:

- ``mean_l2``: mean over valid tokens of ‖h_ref − h‖₂ (the figure's quantity, the headline);
- ``mean_abs`` (extra): mean over valid tokens and features of |h_ref − h|, about ‖·‖₂/√d;
- ``relative`` (extra): Σ|h_ref − h| / Σ|h_ref| (drift on the scale of the layer's own activations).
The layer outputs are taken by forward hooks on the decoder layers (analysis-spec §0.2), cast to
fp32 before subtracting, summed in fp64.
"""

from __future__ import annotations

from typing import Any

import torch

from prunekit.analysis.activations import PassResult

HEADLINE = "mean_l2"
LABELS = {
    "mean_l2": "mean ‖h_ref − h‖₂ per token",
    "mean_abs": "extra: mean |h_ref − h| per feature",
    "relative": "extra: Σ|h_ref − h| / Σ|h_ref|",
}


def token_l2(reference: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
    """‖h_ref − h‖₂ of each token ([..., d] -> [...]), in fp32: the study's drift of one token."""
    return torch.linalg.vector_norm(reference.float() - hidden.float(), dim=-1)


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
            "mean_l2": [float(x / n) if n else None for x in l2_sum],
            "mean_abs": [float(x / (n * d)) if n else None for x in abs_sum],
            "relative": [float(a / r) if r else None for a, r in zip(abs_sum, ref_sum)],
        }
    return {"quantity": HEADLINE, "labels": LABELS, "per_language": per_lang, "num_layers": target.num_layers}
