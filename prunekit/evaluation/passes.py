"""One pass for all languages: perplexity and SNR / pruning error of N languages read each decoder layer
of each model once.

Every language's windows are cut into batches (``batch_size`` windows, equal lengths), each batch
tagged with its language and, per window, how many of its first positions count towards SNR (the
first ``snr_tokens`` positions of the language's windows, in order). All the batches of all the
languages go through each layer before the next layer is read (``forward.run_forward``); the
activations are placed like the prune's (``streaming.plan_activations``: on the GPU when they fit,
else in host RAM, moved to the GPU one batch at a time).

The dense reference is the cached design (docs/ARCHITECTURE.md records the measurement): the dense
states of the SNR positions are computed in one dense pass over the batches of every language whose
cache entry is missing, stored per language (``hidden_states.CacheEntry``) and read back a layer at
a time while the checkpoint's layer runs. A model evaluated against itself collects its states in its
own scoring pass (PE 0, SNR +inf), so the sweep's dense stage reads the dense model once.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from prunekit.evaluation.forward import Batch, Consumer, run_forward
from prunekit.evaluation.hidden_states import (
    COUNTERS,
    CacheEntry,
    DenseReference,
    LayerError,
    errors_json,
    dense_cache_key,
    store_dtype_for,
)
from prunekit.evaluation.perplexity import NllSum, PerplexityResult, Windows
from prunekit.io import cache_dir
from prunekit.models import text_config

ONE_PASS_FORMAT = "one-pass"  # in the cache key: states of the SNR positions of the full windows


@dataclass
class Language:
    """One language's windows and, per window, the positions counted in SNR (0: none)."""

    lang: str
    windows: Windows
    snr: list[int]

    @classmethod
    def of(cls, lang: str, windows: Windows, snr_tokens: int) -> Language:
        takes, total = [], 0
        for window in windows.windows:
            take = min(len(window), snr_tokens - total)
            take = take if take >= 2 and (not takes or takes[-1] > 0) else 0
            takes.append(take)
            total += take
        return cls(lang, windows, takes)

    def batches(self, batch_size: int) -> list[Batch]:
        """Equal-length windows ``batch_size`` at a time, as ``perplexity.batches`` cuts them."""
        out: list[Batch] = []
        rows: list[int] = []
        for index, window in enumerate(self.windows.windows):
            if rows and (len(window) != len(self.windows.windows[rows[0]]) or len(rows) == batch_size):
                out.append(self._batch(rows))
                rows = []
            rows.append(index)
        if rows:
            out.append(self._batch(rows))
        return out

    def _batch(self, rows: list[int]) -> Batch:
        ids = torch.tensor([self.windows.windows[r] for r in rows], dtype=torch.long)
        return Batch(ids, info={"lang": self.lang, "snr": [self.snr[r] for r in rows]})

    def snr_windows(self) -> int:
        return sum(1 for take in self.snr if take > 0)

    def snr_ids(self) -> list[list[int]]:
        return [w[:take] for w, take in zip(self.windows.windows, self.snr) if take > 0]


def selected(hidden: torch.Tensor, batch: Batch, exclude_first: bool) -> torch.Tensor | None:
    """The SNR positions of a batch's layer output: [tokens, d] (None when the batch has none)."""
    first = 1 if exclude_first else 0
    parts = [hidden[row, first:take] for row, take in enumerate(batch.info["snr"]) if take > first]
    return torch.cat(parts) if parts else None


class LanguageNll(NllSum):
    """Σ NLL of one language's batches."""

    def __init__(self, lang: str):
        super().__init__()
        self.lang = lang

    def final(self, batch: Batch, scores) -> None:
        if batch.info["lang"] == self.lang:
            super().final(batch, scores)


class StateCollector(Consumer):
    """Keeps one language's SNR-position states of every layer on the CPU (the dense side)."""

    def __init__(self, lang: str, entry: CacheEntry):
        self.lang, self.entry = lang, entry
        self.per_layer: dict[int, list[torch.Tensor]] = {}

    def layer(self, index: int, hidden: torch.Tensor, batch: Batch) -> None:
        if batch.info["lang"] != self.lang:
            return
        states = selected(hidden, batch, self.entry.exclude_first)
        if states is not None:
            self.per_layer.setdefault(index, []).append(states.to("cpu", self.entry.store_dtype))

    def states(self) -> list[torch.Tensor]:
        return [torch.cat(self.per_layer[i]) for i in sorted(self.per_layer)]


class StateComparer(Consumer):
    """Compares one language's layer outputs with its cached dense states, read a layer at a time."""

    def __init__(self, lang: str, entry: CacheEntry):
        self.lang, self.entry = lang, entry
        self.accumulators: dict[int, LayerError] = {}
        self.reference: tuple[int, torch.Tensor] | None = None
        self.offset = 0

    def _dense(self, index: int) -> torch.Tensor:
        if self.reference is None or self.reference[0] != index:
            from safetensors import safe_open

            with safe_open(str(self.entry.path), framework="pt") as handle:
                self.reference = (index, handle.get_tensor(f"layer.{index}"))
            self.offset = 0
        return self.reference[1]

    def layer(self, index: int, hidden: torch.Tensor, batch: Batch) -> None:
        if batch.info["lang"] != self.lang:
            return
        pruned = selected(hidden, batch, self.entry.exclude_first)
        if pruned is None:
            return
        reference = self._dense(index)
        pruned = pruned.to(reference.dtype)
        lo, hi = self.offset, self.offset + pruned.shape[0]
        if hi > reference.shape[0]:
            raise RuntimeError("the model saw more tokens than the dense reference holds")
        self.offset = hi
        self.accumulators.setdefault(index, LayerError()).update(reference[lo:hi].to(pruned.device), pruned)

    def finish(self, n_layers: int) -> list[dict[str, float]]:
        from prunekit.errors import ModelError

        with open(self.entry.path, "rb") as handle:  # the safetensors header: the layer count of the dense model
            header = json.loads(handle.read(int.from_bytes(handle.read(8), "little")))
        dense_layers = json.loads(header["__metadata__"]["prunekit"])["layers"]
        if n_layers != dense_layers:
            raise ModelError(f"the model has {n_layers} decoder layers, the dense reference {dense_layers}")
        return [self.accumulators[i].finish() for i in range(n_layers)]


def entry_for(dense: DenseReference, language: Language, *, dtype: torch.dtype, device: torch.device,
              batch_size: int, exclude_bos: bool, store_dtype: str | None) -> CacheEntry:
    """The cache entry of one language's dense states (keyed by the full windows and the SNR positions)."""
    from prunekit.evaluation.hidden_states import device_key

    stored = store_dtype_for(dtype, store_dtype)
    exclude_first = bool(exclude_bos and language.windows.bos is not None)
    settings = {
        "dtype": str(dtype), "store_dtype": str(stored), "device": device_key(device), "batch_size": batch_size,
        "exclude_bos": exclude_first, "layout": ONE_PASS_FORMAT, "snr_positions": language.snr,
    }
    key = dense_cache_key(dense, language.windows, settings)
    tokens = sum(take - (1 if exclude_first else 0) for take in language.snr if take > 0)
    return CacheEntry(cache_dir("dense") / f"{key}.safetensors", settings, stored, exclude_first, tokens)


def cached(entry: CacheEntry) -> bool:
    """Whether the entry's file holds its states (its first layer's length is checked; a bad file is recomputed)."""
    if not entry.path.exists():
        return False
    try:
        from safetensors import safe_open

        with safe_open(str(entry.path), framework="pt") as handle:
            return handle.get_slice("layer.0").get_shape()[0] == entry.tokens
    except Exception:  # a corrupt entry is recomputed, never trusted
        return False


def activation_device(languages: Sequence[Language], model: torch.nn.Module, device: torch.device) -> torch.device:
    """Where the batches' hidden states wait between layers, planned like the prune's activations."""
    if device.type == "cpu":
        return device
    from prunekit.streaming import host_available, plan_activations

    windows = sum(len(lang.windows.windows) for lang in languages)
    seqlen = max(len(w) for lang in languages for w in lang.windows.windows)
    hidden = text_config(model.config).hidden_size
    bytes_per = next(model.parameters()).element_size()
    free, _ = torch.cuda.mem_get_info(device) if device.type == "cuda" else (None, None)
    layer_bytes = 4 * 12 * hidden * hidden * bytes_per  # a generous bound on one decoder layer's weights
    plan = plan_activations(windows, seqlen, hidden, bytes_per, device.type, free, host_available(), layer_bytes)
    return device if plan.where == "device" else torch.device("cpu")


@dataclass
class PassResult:
    perplexity: dict[str, PerplexityResult]
    hidden: dict[str, dict[str, Any]]


def _ppl(lang: Language, scorer: LanguageNll) -> PerplexityResult:
    import math

    mean = scorer.total / scorer.count
    windows = lang.windows
    return PerplexityResult(math.exp(mean), mean, scorer.count, len(windows.windows), windows.seqlen, windows.bos is not None)


def _self_errors(states: list[torch.Tensor]) -> list[dict[str, float]]:
    layers = []
    for layer_states in states:  # the model against its own states: PE 0, SNR +inf, μ and E as usual
        acc = LayerError()
        acc.update(layer_states, layer_states)
        layers.append(acc.finish())
    return layers


def _store(entry: CacheEntry, dense: DenseReference, states: list[torch.Tensor], lang: str) -> None:
    from prunekit.evaluation.hidden_states import save_cache

    save_cache(entry.path, states, {"dense": dense.to_json(), "lang": lang, "tokens": entry.tokens, "settings": entry.settings})


def dense_pass(dense: DenseReference, languages: Sequence[Language], entries: dict[str, CacheEntry], *,
               device: torch.device, batch_size: int, progress: bool) -> None:
    """One pass of the dense model over the batches (with SNR positions) of every language, cached per language."""
    collectors = [StateCollector(lang.lang, entries[lang.lang]) for lang in languages]
    batches = [b for lang in languages for b in lang.batches(batch_size) if any(t > 0 for t in b.info["snr"])]
    description = f"dense hidden states {','.join(lang.lang for lang in languages)}"
    run_forward(dense.weights(), batches, collectors, device, progress=progress, description=description)
    COUNTERS["dense_passes"] += 1
    for collector in collectors:
        _store(collector.entry, dense, collector.states(), collector.lang)


def measure(weights, languages: Sequence[Language], dense: DenseReference | None, *, device: torch.device,
            batch_size: int, exclude_bos: bool, store_dtype: str | None, is_dense: bool, progress: bool) -> PassResult:
    """Perplexity of every language, and SNR / PE against ``dense``, in one pass of ``weights``
    (plus, for the languages whose dense states are not cached, one pass of the dense model)."""
    scorers = {lang.lang: LanguageNll(lang.lang) for lang in languages}
    consumers: list[Consumer] = list(scorers.values())
    entries: dict[str, CacheEntry] = {}
    status: dict[str, str] = {}
    if dense is not None:
        dtype = next(weights.model.parameters()).dtype
        for lang in languages:
            entries[lang.lang] = entry_for(dense, lang, dtype=dtype, device=device, batch_size=batch_size,
                                           exclude_bos=exclude_bos, store_dtype=store_dtype)
            status[lang.lang] = "hit" if cached(entries[lang.lang]) else "computed"
        missing = [lang for lang in languages if status[lang.lang] == "computed"]
        if missing and not is_dense:
            dense_pass(dense, missing, entries, device=device, batch_size=batch_size, progress=progress)
            dense.release()
    collect = {lang.lang for lang in languages if is_dense and status.get(lang.lang) == "computed"}
    side = {lang.lang: (StateCollector if lang.lang in collect else StateComparer)(lang.lang, entries[lang.lang])
            for lang in languages if dense is not None}
    consumers += list(side.values())
    batches = [b for lang in languages for b in lang.batches(batch_size)]
    what = "perplexity" + (" + hidden-state error" if dense is not None else "")
    n_layers = run_forward(weights, batches, consumers, device, progress=progress,
                           description=f"{what} {','.join(lang.lang for lang in languages)}",
                           store=activation_device(languages, weights.model, device))
    hidden: dict[str, dict[str, Any]] = {}
    if collect:
        COUNTERS["dense_passes"] += 1  # the model's own pass collected the dense states
    for lang in languages if dense is not None else ():
        consumer, entry = side[lang.lang], entries[lang.lang]
        if isinstance(consumer, StateCollector):
            states = consumer.states()
            _store(entry, dense, states, lang.lang)
            layers = _self_errors(states)
        else:
            layers = consumer.finish(n_layers)
        snr_windows = Windows(lang.snr_ids(), lang.windows.bos, lang.windows.seqlen, lang.windows.stream_tokens)
        hidden[lang.lang] = errors_json(layers, entry.tokens, entry.exclude_first, snr_windows, status[lang.lang], entry.path)
    return PassResult({lang.lang: _ppl(lang, scorers[lang.lang]) for lang in languages}, hidden)
