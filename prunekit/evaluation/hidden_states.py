"""Pruning error and SNR of hidden states per decoder layer (the study's D.1, analysis-spec §1).

For layer k with dense hidden states H (N valid tokens × d) and pruned H̃:

    μ_k   = (1/N) Σ_i ‖h_i‖₂                      mean token-vector norm of the DENSE output
    PE_k  = 1/(N d) Σ_ij ((h_ij − h̃_ij) / μ_k)²
    E_k   = 1/(N d) Σ_ij (h_ij / μ_k)²
    SNR_k = 10 log10(E_k / PE_k) dB               (+inf where PE_k = 0)
    model PE = mean_k PE_k ; model SNR = mean_k SNR_k

Hidden states are the residual-stream outputs of each decoder layer (a forward hook on the layer,
``out[0]`` for tuple outputs). Differences are taken in fp64 and sums accumulated in fp64.

The dense side is computed once and cached (``cache_dir("dense")``): for each evaluation language
the dense hidden states of the first ``snr_tokens`` token positions of the evaluation windows are
stored per layer in a safetensors file (in the model's dtype unless ``store_dtype`` says otherwise;
the pruned states are rounded to the same dtype before subtracting, so a model compared with
itself gives PE = 0 exactly). Size: snr_tokens × hidden × layers × bytes per language, e.g.
4096 × 640 × 18 × 4 B = 189 MB for Gemma-3-270M in fp32, 4096 × 4096 × 32 × 2 B = 1 GiB for an
8B model in bf16. The key is a hash of the dense model's content fingerprint, the tokenizer
fingerprint, the exact token ids of the windows, dtype, store dtype, device type, batch size,
BOS handling and the cache format, so evaluating N pruned models against one dense model costs
one dense pass per language.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from prunekit.errors import ConfigError, ModelError
from prunekit.evaluation.forward import Consumer, ModelWeights, Weights, as_weights, open_weights, run_forward
from prunekit.evaluation.perplexity import Windows, window_batches
from prunekit.io import cache_dir
from prunekit.models import DTYPES, ModelSource, text_config, tokenizer_fingerprint

log = logging.getLogger(__name__)

CACHE_FORMAT = 1
COUNTERS = {"dense_passes": 0}  # how many dense forward passes this process ran (tests assert on it)


# --------------------------------------------------------------------------------------- math


@dataclass
class LayerError:
    """Running fp64 sums for one layer; ``finish()`` turns them into μ, E, PE and SNR."""

    tokens: int = 0
    width: int = 0
    norm_sum: float = 0.0  # Σ_i ‖h_i‖₂
    energy_sum: float = 0.0  # Σ_ij h_ij²
    error_sum: float = 0.0  # Σ_ij (h_ij − h̃_ij)²

    def update(self, dense: torch.Tensor, pruned: torch.Tensor) -> None:
        """Add tokens: ``dense`` and ``pruned`` are [n, d] (any float dtype)."""
        if dense.shape != pruned.shape:
            raise ValueError(f"dense {tuple(dense.shape)} and pruned {tuple(pruned.shape)} hidden states differ in shape")
        h = dense.to(torch.float64)
        diff = h - pruned.to(torch.float64)
        self.tokens += h.shape[0]
        self.width = h.shape[1]
        self.norm_sum += float(torch.linalg.vector_norm(h, dim=1).sum())
        self.energy_sum += float((h * h).sum())
        self.error_sum += float((diff * diff).sum())

    @property
    def mu(self) -> float:
        return self.norm_sum / self.tokens

    def finish(self) -> dict[str, float]:
        if self.tokens == 0:
            raise ValueError("no tokens were compared")
        scale = self.tokens * self.width * self.mu**2
        pe = self.error_sum / scale
        energy = self.energy_sum / scale
        snr = math.inf if pe == 0 else 10.0 * math.log10(energy / pe)
        return {"mu": self.mu, "energy": energy, "pruning_error": pe, "snr_db": snr}


def pruning_error_and_snr(dense: torch.Tensor, pruned: torch.Tensor) -> dict[str, float]:
    """D.1 for one layer from whole tensors ([N, d], or [..., d] flattened over tokens)."""
    acc = LayerError()
    acc.update(dense.reshape(-1, dense.shape[-1]), pruned.reshape(-1, pruned.shape[-1]))
    return acc.finish()


def summarize(layers: list[dict[str, float]]) -> dict[str, Any]:
    """Model-level numbers: the mean over layers of PE and of SNR[dB] (inf if any layer is identical)."""
    snr = [layer["snr_db"] for layer in layers]
    pe = [layer["pruning_error"] for layer in layers]
    finite = [s for s in snr if math.isfinite(s)]
    return {
        "snr_db": sum(snr) / len(snr),
        "pruning_error": sum(pe) / len(pe),
        "snr_db_finite_layers": (sum(finite) / len(finite)) if finite else None,
        "identical_layers": len(snr) - len(finite),
    }


# ----------------------------------------------------------------------------------- capture


def _valid(hidden: torch.Tensor, exclude_first: bool) -> torch.Tensor:
    """[B, T, d] -> [valid tokens, d] (dropping position 0 of each window when it is BOS)."""
    if exclude_first:
        hidden = hidden[:, 1:]
    return hidden.reshape(-1, hidden.shape[-1])


class StateCollector(Consumer):
    """Keeps every decoder layer's valid-token states on the CPU (the dense side)."""

    def __init__(self, exclude_first: bool, store_dtype: torch.dtype):
        self.exclude_first = exclude_first
        self.store_dtype = store_dtype
        self.per_layer: dict[int, list[torch.Tensor]] = {}

    def layer(self, index: int, hidden: torch.Tensor, batch=None) -> None:
        self.per_layer.setdefault(index, []).append(_valid(hidden, self.exclude_first).to("cpu", self.store_dtype))

    def states(self, n_layers: int) -> list[torch.Tensor]:
        COUNTERS["dense_passes"] += 1
        return [torch.cat(self.per_layer[i]) for i in range(n_layers)]


class StateComparer(Consumer):
    """Compares every decoder layer's output with cached dense states as it goes
    (the pruned side is never stored). Each layer keeps its own token offset, so batches of any shape,
    or one window at a time, line up with the dense states."""

    def __init__(self, dense_states: list[torch.Tensor], exclude_first: bool):
        self.dense_states = dense_states
        self.exclude_first = exclude_first
        self.accumulators = [LayerError() for _ in dense_states]
        self.offsets = [0] * len(dense_states)

    def layer(self, index: int, hidden: torch.Tensor, batch=None) -> None:
        if index >= len(self.dense_states):
            raise ModelError(f"the model has more decoder layers than the dense reference ({len(self.dense_states)})")
        reference = self.dense_states[index]
        pruned = _valid(hidden, self.exclude_first).to(reference.dtype)
        lo = self.offsets[index]
        hi = lo + pruned.shape[0]
        if hi > reference.shape[0]:
            raise RuntimeError("the model saw more tokens than the dense reference holds")
        self.offsets[index] = hi
        self.accumulators[index].update(reference[lo:hi].to(pruned.device), pruned)

    def finish(self, n_layers: int | None = None) -> list[dict[str, float]]:
        """Per-layer D.1; ``n_layers``: the model's layer count (default: the layers this comparer saw)."""
        if n_layers is None:
            n_layers = sum(1 for offset in self.offsets if offset > 0)
        if n_layers != len(self.dense_states):
            raise ModelError(f"the model has {n_layers} decoder layers, the dense reference {len(self.dense_states)}")
        if any(offset != self.dense_states[0].shape[0] for offset in self.offsets):
            raise RuntimeError("pruned and dense passes saw different numbers of tokens")
        return [acc.finish() for acc in self.accumulators]


def _forward_windows(model, windows: Windows, batch_size: int, consumer, progress: bool, description: str,
                     device: torch.device | str | None = None) -> int:
    weights = as_weights(model)
    if device is None:
        device = next(weights.model.parameters()).device
    return run_forward(weights, window_batches(windows, batch_size), [consumer], device, progress=progress,
                       description=description)


def collect_states(
    model, windows: Windows, batch_size: int, exclude_bos: bool, store_dtype: torch.dtype,
    progress: bool = True, description: str = "dense hidden states", device: torch.device | str | None = None,
) -> list[torch.Tensor]:
    """Every decoder layer's output for the valid tokens of ``windows``: a list of [N, d] CPU tensors.

    ``model``: an in-memory model or a ``forward.Weights`` (streamed layer by layer)."""
    collector = StateCollector(exclude_bos and windows.bos is not None, store_dtype)
    n_layers = _forward_windows(model, windows, batch_size, collector, progress, description, device)
    return collector.states(n_layers)


def compare_states(
    model, windows: Windows, dense_states: list[torch.Tensor], batch_size: int, exclude_bos: bool,
    progress: bool = True, description: str = "hidden-state error", device: torch.device | str | None = None,
) -> list[dict[str, float]]:
    """D.1 per layer of ``model`` against cached dense states (the pruned side is never stored)."""
    comparer = StateComparer(dense_states, exclude_bos and windows.bos is not None)
    n_layers = _forward_windows(model, windows, batch_size, comparer, progress, description, device)
    return comparer.finish(n_layers)


# ------------------------------------------------------------------------------ dense model


def model_fingerprint(source: ModelSource) -> str:
    """Content fingerprint of a model without reading its weights: Hub revision, or file names,
    sizes and modification times plus config.json."""
    digest = hashlib.sha256()
    if source.kind == "hub" and source.revision:
        digest.update(f"hub:{source.spec}@{source.revision}".encode())
    path = Path(source.path)
    for file in sorted(path.iterdir()):
        if file.suffix in (".safetensors", ".bin", ".gguf") or file.name.endswith(".index.json"):
            stat = file.stat()
            digest.update(f"{file.name}|{stat.st_size}|{stat.st_mtime_ns}\n".encode())
    config = path / "config.json"
    if config.exists():
        digest.update(config.read_bytes())
    return digest.hexdigest()[:24]


def parameters_fingerprint(model: torch.nn.Module) -> str:
    """Content hash of an in-memory model's parameters (slow for big models; pass a source instead)."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        digest.update(str(tensor.dtype).encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:24]


def architecture_summary(config) -> dict[str, Any]:
    cfg = text_config(config)
    return {
        "model_type": getattr(cfg, "model_type", None),
        "num_hidden_layers": getattr(cfg, "num_hidden_layers", None),
        "hidden_size": getattr(cfg, "hidden_size", None),
        "vocab_size": getattr(cfg, "vocab_size", None),
    }


def torch_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """A --dtype value as a torch dtype; None (or "auto"): the checkpoint's own."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return None
    if dtype not in DTYPES:
        raise ConfigError(f"unknown --dtype '{dtype}'; choose auto or one of: {', '.join(DTYPES)}")
    return DTYPES[dtype]


def model_dtype(model) -> torch.dtype:
    """The dtype of an in-memory model or of a streamed checkpoint's skeleton."""
    return next(as_weights(model).model.parameters()).dtype


@dataclass
class DenseReference:
    """The dense model SNR / PE compare against; its weights are opened only when its cache is missing
    (streamed from its checkpoint a layer at a time)."""

    spec: str
    revision: str | None
    config: Any
    tokenizer: Any
    fingerprint: str
    loader: Callable[[], Weights] | None = None
    _weights: Weights | None = field(default=None, repr=False)
    _model: torch.nn.Module | None = field(default=None, repr=False)

    @classmethod
    def from_spec(cls, spec: str, dtype: str | torch.dtype | None = "auto", trust_remote_code: bool = False) -> "DenseReference":
        from prunekit.models import resolve_model

        return cls.from_source(resolve_model(spec), dtype, trust_remote_code)

    @classmethod
    def from_source(cls, source: ModelSource, dtype: str | torch.dtype | None = "auto",
                    trust_remote_code: bool = False) -> "DenseReference":
        """The reference of a model already resolved (e.g. the recorded base model found in the Hub cache)."""
        from transformers import AutoConfig

        from prunekit.models import load_tokenizer

        config = AutoConfig.from_pretrained(str(source.path), trust_remote_code=trust_remote_code)
        tokenizer = load_tokenizer(source, trust_remote_code)
        wanted = torch_dtype(dtype)

        def loader() -> Weights:
            return open_weights(source, wanted, trust_remote_code)

        return cls(source.spec, source.revision, config, tokenizer, model_fingerprint(source), loader)

    @classmethod
    def from_loaded(cls, model, tokenizer, source: ModelSource | None = None) -> "DenseReference":
        fingerprint = model_fingerprint(source) if source is not None else parameters_fingerprint(model)
        spec = source.spec if source is not None else getattr(model.config, "_name_or_path", "") or "in-memory"
        return cls(spec, source.revision if source else None, model.config, tokenizer, fingerprint, None,
                   ModelWeights(model), model)

    def weights(self) -> Weights:
        """The dense model's weights (opened now if they were not)."""
        if self._weights is None:
            if self.loader is None:
                raise RuntimeError("dense reference has neither a model nor a loader")
            self._weights = self.loader()
        return self._weights

    def holds(self, model) -> bool:
        """Whether ``model`` is this reference's dense model itself (the dense model evaluating itself)."""
        if isinstance(model, ModelWeights):
            model = model.model
        return model is not None and (model is self._model or model is self._weights)

    def release(self) -> None:
        """Drop dense weights this reference opened itself (a model given in memory is kept)."""
        if self.loader is not None:
            self._weights = None

    def to_json(self) -> dict[str, Any]:
        return {"spec": self.spec, "revision": self.revision, "fingerprint": self.fingerprint}


def check_compatible(model_config, tokenizer, dense: DenseReference, name: str = "the checkpoint") -> None:
    """Refuse to compare models of different architectures or tokenizers."""
    mine, theirs = architecture_summary(model_config), architecture_summary(dense.config)
    if mine != theirs:
        diff = ", ".join(f"{k} {mine[k]} vs {theirs[k]}" for k in mine if mine[k] != theirs[k])
        raise ModelError(
            f"{name} and the dense model '{dense.spec}' have different architectures ({diff}); "
            "pass the dense model the checkpoint was pruned from as --dense"
        )
    if tokenizer_fingerprint(tokenizer) != tokenizer_fingerprint(dense.tokenizer):
        raise ModelError(
            f"{name} and the dense model '{dense.spec}' have different tokenizers, so their hidden states "
            "cannot be compared token by token; pass the dense model the checkpoint was pruned from as --dense"
        )


# ------------------------------------------------------------------------------------ cache


def store_dtype_for(model_dtype: torch.dtype, store_dtype: str | None) -> torch.dtype:
    if store_dtype in (None, "model"):
        return model_dtype
    if store_dtype not in DTYPES:
        raise ConfigError(f"unknown hidden-state store dtype '{store_dtype}'; choose model, {', '.join(DTYPES)}")
    return DTYPES[store_dtype]


def dense_cache_key(dense: DenseReference, windows: Windows, settings: dict[str, Any]) -> str:
    ids = hashlib.sha256(json.dumps(windows.windows).encode()).hexdigest()
    payload = {
        "format": CACHE_FORMAT,
        "dense": dense.fingerprint,
        "tokenizer": tokenizer_fingerprint(dense.tokenizer),
        "windows": ids,
        **settings,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:32]


def _load_cache(path: Path, n_tokens: int) -> list[torch.Tensor] | None:
    from safetensors import safe_open

    if not path.exists():
        return None
    try:
        with safe_open(str(path), framework="pt") as handle:
            meta = json.loads(handle.metadata()["prunekit"])
            states = [handle.get_tensor(f"layer.{i}") for i in range(meta["layers"])]
    except Exception:  # a corrupt entry is recomputed, never trusted
        log.warning("ignoring unreadable dense cache entry %s", path)
        return None
    if not states or states[0].shape[0] != n_tokens:
        return None
    return states


def save_cache(path: Path, states: list[torch.Tensor], meta: dict[str, Any]) -> None:
    from safetensors.torch import save_file

    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        tensors = {f"layer.{i}": s.contiguous() for i, s in enumerate(states)}
        save_file(tensors, tmp, metadata={"prunekit": json.dumps(meta | {"layers": len(states)})})
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def device_key(device: torch.device) -> str:
    """The device part of the dense cache key: the GPU model, not only "cuda" (kernels, and so the
    states' last bits, differ between GPU models)."""
    if device.type == "cuda":
        return f"cuda:{torch.cuda.get_device_name(device)}"
    return device.type


@dataclass
class CacheEntry:
    """Where the dense states of one set of windows live, and what they hold."""

    path: Path
    settings: dict[str, Any]
    store_dtype: torch.dtype
    exclude_first: bool
    tokens: int


def cache_entry(
    dense: DenseReference, windows: Windows, *, dtype: torch.dtype, device: torch.device, batch_size: int,
    exclude_bos: bool, store_dtype: str | None = None,
) -> CacheEntry:
    stored = store_dtype_for(dtype, store_dtype)
    exclude_first = bool(exclude_bos and windows.bos is not None)
    settings = {
        "dtype": str(dtype), "store_dtype": str(stored), "device": device_key(device), "batch_size": batch_size,
        "exclude_bos": exclude_first,
    }
    path = cache_dir("dense") / f"{dense_cache_key(dense, windows, settings)}.safetensors"
    tokens = sum(len(w) - (1 if exclude_first else 0) for w in windows.windows)
    return CacheEntry(path, settings, stored, exclude_first, tokens)


def _store(entry: CacheEntry, dense: DenseReference, states: list[torch.Tensor], lang: str) -> None:
    save_cache(entry.path, states, {"dense": dense.to_json(), "lang": lang, "tokens": entry.tokens, "settings": entry.settings})


def dense_states(
    dense: DenseReference, windows: Windows, *, dtype: torch.dtype, device: torch.device, batch_size: int,
    exclude_bos: bool, store_dtype: str | None = None, progress: bool = True, lang: str = "",
) -> tuple[list[torch.Tensor], str, Path]:
    """The dense model's per-layer hidden states for ``windows``: from the cache, or computed and cached.

    Returns (states, "hit" | "computed", cache file)."""
    entry = cache_entry(dense, windows, dtype=dtype, device=device, batch_size=batch_size, exclude_bos=exclude_bos,
                        store_dtype=store_dtype)
    cached = _load_cache(entry.path, entry.tokens)
    if cached is not None:
        return cached, "hit", entry.path
    return _compute_dense_states(dense, windows, entry, device=device, batch_size=batch_size, progress=progress,
                                 lang=lang), "computed", entry.path


def _compute_dense_states(
    dense: DenseReference, windows: Windows, entry: CacheEntry, *, device: torch.device, batch_size: int,
    progress: bool, lang: str,
) -> list[torch.Tensor]:
    """One dense pass over ``windows`` (the dense model loaded if it is not in memory), cached in ``entry``."""
    # One dense layer at a time on the device: a cache miss never puts a second model there.
    states = collect_states(dense.weights(), windows, batch_size, entry.exclude_first, entry.store_dtype, progress,
                            f"dense hidden states {lang}".strip(), device=device)
    _store(entry, dense, states, lang)
    return states


def errors_json(layers: list[dict[str, float]], tokens: int, exclude_first: bool, windows: Windows, cache: str, path: Path) -> dict[str, Any]:
    summary = summarize(layers)
    return {
        "snr_db": summary["snr_db"],
        "pruning_error": summary["pruning_error"],
        "tokens": tokens,
        "exclude_bos": exclude_first,
        "per_layer": {
            "snr_db": [layer["snr_db"] for layer in layers],
            "pruning_error": [layer["pruning_error"] for layer in layers],
            "mu": [layer["mu"] for layer in layers],
        },
        "snr_db_finite_layers": summary["snr_db_finite_layers"],
        "identical_layers": summary["identical_layers"],
        "windows": len(windows.windows),
        "dense_cache": {"status": cache, "file": str(path)},
    }


def hidden_state_errors(
    model, dense: DenseReference, windows: Windows, *, device: torch.device, batch_size: int = 4,
    exclude_bos: bool = True, store_dtype: str | None = None, progress: bool = True, lang: str = "",
) -> dict[str, Any]:
    """SNR and pruning error per layer and per model of ``model`` (run on ``device``) against ``dense``."""
    dtype = model_dtype(model)
    states, cache, path = dense_states(
        dense, windows, dtype=dtype, device=device, batch_size=batch_size, exclude_bos=exclude_bos,
        store_dtype=store_dtype, progress=progress, lang=lang,
    )
    layers = compare_states(model, windows, states, batch_size, exclude_bos, progress, f"hidden-state error {lang}".strip(),
                            device=device)
    exclude_first = bool(exclude_bos and windows.bos is not None)
    return errors_json(layers, int(states[0].shape[0]), exclude_first, windows, cache, path)
