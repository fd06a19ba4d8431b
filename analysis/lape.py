"""LAPE: language activation probability entropy of FFN neurons (Tang et al. 2024; study App. D.4,
analysis-spec §4).

A neuron j of layer i is active on a token when act_fn(gate_proj(x))_j > 0. With n_k valid tokens
of language k and c^{(k)}_{i,j} activations:

    p^{(k)} = c^{(k)} / n_k ;  p̃^{(k)} = p^{(k)} / Σ_k p^{(k)}  (0 where the sum is 0)
    LAPE    = −Σ_k p̃^{(k)} ln p̃^{(k)}  (0·ln 0 = 0)

Low LAPE = language-specific. A neuron active for one language only has LAPE 0, one equally likely
active in all K languages has ln K. A never-active neuron has LAPE 0 by this definition; its count is
reported (``never_active``) because it sorts among the "most specific".

Figure 3 of the study: sort the neurons of the DENSE (reference) model by LAPE, cut into bins of 2 %,
and show per bin the pruned model's LAPE distribution, the activation probability and the mean
absolute neuron output. Tang et al.'s selection thresholds (top_rate 0.01, filter_rate 0.95,
activation_bar_ratio 0.95) are options; the study relaxes them (off by default here as well).
Quantiles over all neurons use numpy (``torch.quantile`` fails above 2^24 elements).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from prunekit.errors import ConfigError

BIN_FRACTION = 0.02
TANG_THRESHOLDS = {"top_rate": 0.01, "filter_rate": 0.95, "activation_bar_ratio": 0.95}


def activation_probability(counts: np.ndarray, tokens: Sequence[int]) -> np.ndarray:
    """p[..., k] from counts [K, ...] and n_k: returns [..., K] (language last, as Tang et al.)."""
    counts = np.asarray(counts, dtype=np.float64)
    n = np.asarray(tokens, dtype=np.float64).reshape((-1,) + (1,) * (counts.ndim - 1))
    if np.any(n <= 0):
        raise ConfigError("LAPE needs at least one valid token in every language")
    return np.moveaxis(counts / n, 0, -1)


def lape(probs: np.ndarray) -> np.ndarray:
    """Entropy over the last axis of the L1-normalized activation probabilities (float64)."""
    p = np.asarray(probs, dtype=np.float64)
    total = p.sum(axis=-1, keepdims=True)
    normed = np.divide(p, total, out=np.zeros_like(p), where=total > 0)
    logs = np.log(normed, out=np.zeros_like(normed), where=normed > 0)
    return -(normed * logs).sum(axis=-1)


def kth_value(values: np.ndarray, fraction: float) -> float:
    """torch.kthvalue(flat, round(N·fraction)) — Tang et al.'s threshold — with numpy (any size)."""
    flat = np.asarray(values).reshape(-1)
    k = min(max(int(round(flat.size * fraction)), 1), flat.size)
    return float(np.partition(flat, k - 1)[k - 1])


def box_stats(values: np.ndarray) -> dict[str, float]:
    """Boxplot numbers: quartiles, Tukey whiskers (1.5 IQR, clipped to the data), mean, extremes."""
    v = np.asarray(values, dtype=np.float64)
    q1, median, q3 = np.percentile(v, [25, 50, 75])
    iqr = q3 - q1
    inside = v[(v >= q1 - 1.5 * iqr) & (v <= q3 + 1.5 * iqr)]
    return {
        "q1": float(q1), "median": float(median), "q3": float(q3),
        "whisker_low": float(inside.min()), "whisker_high": float(inside.max()),
        "min": float(v.min()), "max": float(v.max()), "mean": float(v.mean()),
    }


@dataclass
class LapeStats:
    """One model's LAPE data: [layers, F] scores, [layers, F, K] activation probabilities and
    [layers, F, K] mean |neuron output|, with the token counts per language."""

    langs: list[str]
    scores: np.ndarray
    probs: np.ndarray
    mean_abs_output: np.ndarray
    tokens: list[int]

    @classmethod
    def from_counts(cls, langs: Sequence[str], counts: np.ndarray, abs_sum: np.ndarray, tokens: Sequence[int]) -> "LapeStats":
        probs = activation_probability(counts, tokens)
        out = activation_probability(abs_sum, tokens)  # Σ|out| / n_k, same normalization
        return cls(list(langs), lape(probs), probs, out, [int(t) for t in tokens])


def bin_edges(count: int, fraction: float = BIN_FRACTION) -> list[tuple[int, int]]:
    bins = max(1, int(round(1.0 / fraction)))
    edges = np.linspace(0, count, bins + 1).round().astype(int)
    return [(int(a), int(b)) for a, b in zip(edges[:-1], edges[1:]) if b > a]


def binned(reference: LapeStats, models: dict[str, LapeStats], fraction: float = BIN_FRACTION,
           per_layer: bool = True) -> dict[str, Any]:
    """Sort neurons by the reference's LAPE (ascending, stable) and summarize every model per bin.

    ``global``: all neurons of all layers pooled (study Fig. 3); ``per_layer``: each layer sorted on its
    own (study Fig. 8, LAPE boxes only).
    """
    langs = reference.langs

    def summarize(order: np.ndarray, stats: LapeStats, flat_scores, flat_probs, flat_out, full: bool):
        rows = []
        for lo, hi in bin_edges(order.size, fraction):
            idx = order[lo:hi]
            row: dict[str, Any] = {"lape": box_stats(flat_scores[idx])}
            if full:
                p = flat_probs[idx]
                o = flat_out[idx]
                row["activation_probability"] = {lang: float(p[:, k].mean()) for k, lang in enumerate(langs)}
                row["activation_probability"]["max"] = float(p.max(axis=1).mean())
                row["mean_abs_output"] = {lang: float(o[:, k].mean()) for k, lang in enumerate(langs)}
                row["mean_abs_output"]["all"] = float(o.mean())
            rows.append(row)
        return rows

    ref_flat = reference.scores.reshape(-1)
    order = np.argsort(ref_flat, kind="stable")
    result: dict[str, Any] = {"bin_fraction": fraction, "bins": len(bin_edges(order.size, fraction)), "global": {}}
    everyone = {"reference": reference, **models}
    for name, stats in everyone.items():
        k = len(langs)
        result["global"][name] = summarize(
            order, stats, stats.scores.reshape(-1), stats.probs.reshape(-1, k), stats.mean_abs_output.reshape(-1, k), True
        )
    if per_layer:
        result["per_layer"] = []
        for layer in range(reference.scores.shape[0]):
            layer_order = np.argsort(reference.scores[layer], kind="stable")
            result["per_layer"].append({
                name: [box_stats(stats.scores[layer][layer_order[lo:hi]]) for lo, hi in bin_edges(layer_order.size, fraction)]
                for name, stats in everyone.items()
            })
    return result


def normalize_thresholds(thresholds: str | dict | None) -> dict[str, float | None]:
    """``None`` (the study: no filter, no activation bar), ``"tang"`` or a dict of the three values."""
    values: dict[str, float | None] = {"top_rate": TANG_THRESHOLDS["top_rate"], "filter_rate": None,
                                        "activation_bar_ratio": None}
    if thresholds in (None, "none", "study"):
        return values
    if thresholds == "tang":
        return dict(TANG_THRESHOLDS)
    if isinstance(thresholds, dict):
        unknown = set(thresholds) - set(values)
        if unknown:
            raise ConfigError(f"unknown LAPE threshold(s) {sorted(unknown)}; use top_rate, filter_rate, activation_bar_ratio")
        values.update(thresholds)
        for key, value in values.items():
            if value is not None and not 0 < float(value) <= 1:
                raise ConfigError(f"LAPE threshold {key} must be in (0, 1], got {value}")
        return values
    raise ConfigError(f"unknown LAPE thresholds '{thresholds}'; use none (the study) or tang (Tang et al. 2024)")


def select_language_neurons(stats: LapeStats, thresholds: dict[str, float | None]) -> dict[str, list[tuple[int, int]]]:
    """Tang et al.'s language-specific neurons: the ``top_rate`` lowest-LAPE neurons, optionally only
    those where some language's probability exceeds the ``filter_rate`` quantile of all probabilities,
    assigned to every language whose probability exceeds the ``activation_bar_ratio`` quantile — or,
    with no bar (the relaxed default), to the language where the neuron is most often active.

    Deviation, for the deactivation test: the study sets no thresholds because it only plots trends,
    but switching neurons off needs a selection, so ``top_rate`` (Tang's 1 %) stays on and the
    language is the argmax when no activation bar is set. Never-active neurons (LAPE 0 by the
    definition) are never selected — Tang's filter would drop them too. Returns lang -> sorted
    (layer, neuron) pairs.
    """
    scores = stats.scores.astype(np.float64).copy()
    probs = stats.probs
    layers, width, k = probs.shape
    scores[probs.sum(axis=-1) == 0] = np.inf  # never active: LAPE 0 by definition, but specific to no language
    if thresholds.get("filter_rate") is not None:
        top_prob = kth_value(probs, thresholds["filter_rate"])
        scores[(probs > top_prob).sum(axis=-1) == 0] = np.inf
    flat = scores.reshape(-1)
    count = int(round(flat.size * float(thresholds.get("top_rate") or TANG_THRESHOLDS["top_rate"])))
    order = np.argsort(flat, kind="stable")[:count]
    order = order[np.isfinite(flat[order])]
    rows, cols = np.divmod(order, width)
    selected = probs[rows, cols]  # n × K
    if thresholds.get("activation_bar_ratio") is not None:
        bar = kth_value(probs, thresholds["activation_bar_ratio"])
        member = selected > bar
    else:
        member = np.zeros_like(selected, dtype=bool)
        member[np.arange(len(order)), selected.argmax(axis=1)] = True
    result = {}
    for k_index, lang in enumerate(stats.langs):
        pick = member[:, k_index]
        result[lang] = sorted(zip(rows[pick].tolist(), cols[pick].tolist()))
    return result


def neurons_by_layer(pairs: list[tuple[int, int]], num_layers: int) -> dict[int, list[int]]:
    by_layer: dict[int, list[int]] = {}
    for layer, neuron in pairs:
        by_layer.setdefault(layer, []).append(neuron)
    return {layer: sorted(v) for layer, v in by_layer.items() if layer < num_layers}


def summary(stats: LapeStats) -> dict[str, Any]:
    return {
        "tokens": dict(zip(stats.langs, stats.tokens)),
        "mean_lape": float(stats.scores.mean()),
        "mean_lape_per_layer": [float(x) for x in stats.scores.mean(axis=1)],
        "never_active": int((stats.probs.sum(axis=-1) == 0).sum()),
        "mean_activation_probability": {lang: float(stats.probs[..., k].mean()) for k, lang in enumerate(stats.langs)},
        "max_lape": float(np.log(len(stats.langs))),
    }
