"""Model passes over per-language evaluation text, collecting what the analyses need — and nothing
of the pruning stack. The passes run through the layer-by-layer forward of
``prunekit.evaluation.forward`` (one forward for evaluation and analysis), so a checkpoint is
streamed from its shards a decoder layer at a time.

Valid tokens (analysis-spec §0.1): attention_mask == 1 and not a special token (BOS, EOS, chat
template tokens); the tokenizer's ``special_tokens_mask`` marks them. Every statistic carries its
number of valid tokens.

Hidden state h_l (§0.2): the residual-stream output of decoder layer l, taken by a forward hook on
the layer (not ``output_hidden_states``, whose last entry is after the final norm).

Precision (§0.3): hidden states are cast to fp32 before subtracting; sums accumulate in fp64 and
counts in int64.
"""

from __future__ import annotations

import contextlib
import math
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch

from prunekit.analysis.spec import DEFAULT_MAX_LENGTH
from prunekit.errors import DataError, ModelError
from prunekit.evaluation.forward import Batch, Consumer, as_weights, run_forward
from prunekit.models import find_decoder_layers
from prunekit.textsources import load_texts


@dataclass
class Sample:
    lang: str
    index: int  # position in the language's text (same index = same passage for parallel text)
    doc_id: str
    input_ids: torch.Tensor  # [T] long
    valid: torch.Tensor  # [T] bool: real content tokens


@dataclass
class Texts:
    """Tokenized evaluation text of every language, with its provenance."""

    langs: list[str]
    samples: dict[str, list[Sample]]
    provenance: dict[str, Any]

    def batches(self, lang: str, batch_size: int) -> Iterator[list[Sample]]:
        items = self.samples[lang]
        for start in range(0, len(items), batch_size):
            yield items[start: start + batch_size]

    def num_batches(self, batch_size: int) -> int:
        return sum(math.ceil(len(self.samples[lang]) / batch_size) for lang in self.langs)


def prepare_texts(
    tokenizer,
    langs: Sequence[str],
    text_source: str = "embedded",
    split: str = "evaluation",
    max_tokens: int | None = None,
    max_length: int = DEFAULT_MAX_LENGTH,
) -> Texts:
    """Tokenize each language's documents; keep at most ``max_tokens`` valid tokens per language
    (the last document is cut) and at most ``max_length`` tokens per document."""
    samples: dict[str, list[Sample]] = {}
    provenance: dict[str, Any] = {"source": text_source, "split": split, "max_tokens": max_tokens,
                                  "max_length": max_length, "languages": {}}
    for lang in langs:
        texts = load_texts(text_source, lang, split)
        items: list[Sample] = []
        tokens = 0
        for index, doc in enumerate(texts.documents):
            enc = tokenizer(doc.text, add_special_tokens=True, return_special_tokens_mask=True,
                            truncation=True, max_length=max_length)
            ids = torch.tensor(enc["input_ids"], dtype=torch.long)
            valid = torch.tensor(enc["special_tokens_mask"], dtype=torch.bool).logical_not()
            if max_tokens is not None:
                room = max_tokens - tokens
                if room <= 0:
                    break
                positions = torch.nonzero(valid).flatten()
                if len(positions) > room:  # cut after the room-th content token
                    cut = int(positions[room - 1]) + 1
                    ids, valid = ids[:cut], valid[:cut]
            count = int(valid.sum())
            if count == 0:
                continue
            items.append(Sample(lang, index, doc.id, ids, valid))
            tokens += count
        if not items:
            raise DataError(f"no usable evaluation text for language '{lang}' in source '{text_source}'")
        samples[lang] = items
        provenance["languages"][lang] = {
            "location": texts.location, "content_hash": texts.content_hash,
            "documents": len(items), "valid_tokens": tokens,
        }
    return Texts(list(langs), samples, provenance)


def collate(batch: list[Sample], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded input_ids, attention_mask and valid mask [B, T]."""
    length = max(len(s.input_ids) for s in batch)
    ids = torch.full((len(batch), length), pad_id, dtype=torch.long)
    attention = torch.zeros((len(batch), length), dtype=torch.long)
    valid = torch.zeros((len(batch), length), dtype=torch.bool)
    for row, s in enumerate(batch):
        n = len(s.input_ids)
        ids[row, :n] = s.input_ids
        attention[row, :n] = 1
        valid[row, :n] = s.valid
    return ids, attention, valid


def mlp_parts(layer: torch.nn.Module, index: int) -> tuple[torch.nn.Module, torch.nn.Module, Any]:
    """(gate_proj, down_proj, act_fn) of a gated FFN (Llama, Gemma, Cohere, Qwen, Mistral)."""
    mlp = getattr(layer, "mlp", None)
    gate = getattr(mlp, "gate_proj", None)
    down = getattr(mlp, "down_proj", None)
    act = getattr(mlp, "act_fn", None)
    if gate is None or down is None or act is None:
        raise ModelError(
            f"decoder layer {index} has no gated FFN (mlp.gate_proj / mlp.down_proj / mlp.act_fn); "
            "LAPE supports Llama, Gemma, Cohere/Aya, Qwen and Mistral layouts"
        )
    return gate, down, act


class ReferenceStates:
    """The reference model's valid-token hidden states, per layer, in a memory-mapped temp file
    (so two models are never in memory together): [tokens, layers, d] in the model's dtype."""

    def __init__(self, tokens: int, layers: int, hidden: int, dtype: torch.dtype, folder: Path | None = None):
        self._dir = tempfile.TemporaryDirectory(prefix="prunekit-drift-", dir=folder)
        self.path = Path(self._dir.name) / "reference.bin"
        self.shape = (tokens, layers, hidden)
        self.dtype = dtype
        numel = tokens * layers * hidden
        self.bytes = numel * torch.empty((), dtype=dtype).element_size()
        self.data = torch.from_file(str(self.path), shared=True, size=numel, dtype=dtype).view(self.shape)

    def close(self) -> None:
        self.data = None
        self._dir.cleanup()


@dataclass
class PassResult:
    """What one model pass collected. Arrays are indexed [language, layer, ...] in ``langs`` order."""

    langs: list[str]
    num_layers: int
    hidden_size: int
    valid_tokens: dict[str, int] = field(default_factory=dict)
    embeddings: dict[str, np.ndarray] | None = None  # lang -> [layers, samples, d] float64
    active_counts: np.ndarray | None = None  # [K, layers, F] int64: act_fn(gate(x)) > 0
    abs_output_sum: np.ndarray | None = None  # [K, layers, F] float64: Σ |act_fn(gate(x)) ⊙ up(x)|
    nll_sum: dict[str, float] = field(default_factory=dict)
    nll_tokens: dict[str, int] = field(default_factory=dict)
    drift_abs_sum: np.ndarray | None = None  # [K, layers] Σ |h_ref − h| over valid tokens and features
    drift_l2_sum: np.ndarray | None = None  # [K, layers] Σ ‖h_ref − h‖₂ over valid tokens
    reference_abs_sum: np.ndarray | None = None  # [K, layers] Σ |h_ref|

    def nll(self, lang: str) -> float:
        return self.nll_sum[lang] / self.nll_tokens[lang] if self.nll_tokens.get(lang) else float("nan")


class _Pass(Consumer):
    """What one model pass collects, fed by the layer-by-layer forward (see ``run_pass``)."""

    def __init__(self, result: PassResult, texts: Texts, *, embeddings: bool, lape: bool, nll: bool,
                 record: ReferenceStates | None, compare_to: ReferenceStates | None,
                 deactivate: dict[int, torch.Tensor] | None):
        self.result = result
        self.texts = texts
        self.embeddings, self.lape, self.record, self.compare_to = embeddings, lape, record, compare_to
        self.deactivate = deactivate or {}
        self.wants_scores = nll
        self.info: dict[str, Any] = {}

    def attach(self, index: int, layer: torch.nn.Module) -> list[Any]:
        handles = []
        if not (self.lape or len(self.deactivate.get(index, ()))):
            return handles
        gate, down, act = mlp_parts(layer, index)
        if self.lape:
            result = self.result

            def gate_hook(module, args, output):
                active = act(output)[self.info["valid"]] > 0
                result.active_counts[self.info["lang_index"], index] += active.sum(dim=0, dtype=torch.int64).cpu().numpy()

            def down_hook(module, args):
                neurons = args[0][self.info["valid"]]  # act_fn(gate(x)) ⊙ up(x), after any deactivation
                result.abs_output_sum[self.info["lang_index"], index] += (
                    neurons.abs().sum(dim=0, dtype=torch.float64).cpu().numpy())

            handles.append(gate.register_forward_hook(gate_hook))
            handles.append(down.register_forward_pre_hook(down_hook))
        columns = self.deactivate.get(index)
        if columns is not None and len(columns):
            def zero_hook(module, args):
                x = args[0].clone()
                x[..., columns.to(x.device)] = 0
                return (x, *args[1:])

            # prepended: runs before the LAPE hook so |output| sees the zeros
            handles.append(down.register_forward_pre_hook(zero_hook, prepend=True))
        return handles

    def before(self, index: int, batch: Batch) -> None:
        self.info = batch.info

    def layer(self, index: int, h: torch.Tensor, batch: Batch) -> None:
        info, result = batch.info, self.result
        valid = info["valid"]
        if self.embeddings:
            store = result.embeddings[info["lang"]]
            for row, sample_index in enumerate(info["rows"]):
                tokens = h[row][valid[row]].to(torch.float64)
                store[index, sample_index] = tokens.mean(dim=0).cpu().numpy()
        if self.record is not None or self.compare_to is not None:
            flat = h[valid]  # [n_valid, d], rows in sample order
            start, stop = info["offset"], info["offset"] + flat.shape[0]
            if self.record is not None:
                self.record.data[start:stop, index] = flat.to(self.record.dtype).cpu()
            if self.compare_to is not None:
                ref = self.compare_to.data[start:stop, index].to(device=flat.device, dtype=torch.float32)
                diff = ref - flat.float()
                k = info["lang_index"]
                result.drift_abs_sum[k, index] += float(diff.abs().sum(dtype=torch.float64))
                result.drift_l2_sum[k, index] += float(torch.linalg.vector_norm(diff, dim=-1).sum(dtype=torch.float64))
                result.reference_abs_sum[k, index] += float(ref.abs().sum(dtype=torch.float64))

    def final(self, batch: Batch, scores) -> None:
        lang = batch.info["lang"]
        total, count = scores.nll(batch.info["valid"][:, 1:])  # targets that are valid content tokens
        self.result.nll_sum[lang] = self.result.nll_sum.get(lang, 0.0) + total
        self.result.nll_tokens[lang] = self.result.nll_tokens.get(lang, 0) + count


def pass_batches(texts: Texts, batch_size: int, pad_id: int, device: torch.device | str) -> list[Batch]:
    """Every language's samples as forward batches, with what the consumers need in ``info``."""
    out, offset = [], 0
    for k, lang in enumerate(texts.langs):
        row = 0
        for batch in texts.batches(lang, batch_size):
            ids, attention, valid = collate(batch, pad_id)
            out.append(Batch(ids, attention, {"lang": lang, "lang_index": k, "valid": valid.to(device),
                                              "offset": offset, "rows": list(range(row, row + len(batch)))}))
            offset += int(valid.sum())
            row += len(batch)
    return out


@dataclass(frozen=True)
class PassSettings:
    """How a pass runs (not what it collects): documents per forward, the pad token, the device, progress bars."""

    batch_size: int = 1
    pad_id: int = 0
    device: torch.device | str = "cpu"
    progress: bool = True


def run_pass(
    model,
    texts: Texts,
    *,
    label: str,
    embeddings: bool = False,
    lape: bool = False,
    nll: bool = False,
    record: ReferenceStates | None = None,
    compare_to: ReferenceStates | None = None,
    deactivate: dict[int, torch.Tensor] | None = None,
    settings: PassSettings = PassSettings(),
) -> PassResult:
    """Run ``model`` (in memory, or a ``prunekit.evaluation.forward.Weights`` streamed a layer at a
    time) over every language's samples, collecting what is asked for.

    ``record`` stores the valid-token layer outputs (reference model); ``compare_to`` accumulates the
    drift against stored ones (a target model: same texts, same order). ``deactivate`` maps a layer
    index to FFN neuron indices whose act_fn output is zeroed (Tang et al.'s test; zeroing the
    down_proj input at a neuron equals zeroing act_fn there, since the input is act_fn(gate) ⊙ up).
    ``settings``: batch size, pad token, device and progress bars.
    """
    weights = as_weights(model)
    skeleton = weights.model
    _, layers = find_decoder_layers(skeleton)
    n_layers = len(layers)
    hidden = int(skeleton.get_input_embeddings().weight.shape[1])
    langs = texts.langs
    result = PassResult(list(langs), n_layers, hidden)
    if embeddings:
        result.embeddings = {
            lang: np.zeros((n_layers, len(texts.samples[lang]), hidden), dtype=np.float64) for lang in langs
        }
    if compare_to is not None:
        result.drift_abs_sum = np.zeros((len(langs), n_layers), dtype=np.float64)
        result.drift_l2_sum = np.zeros((len(langs), n_layers), dtype=np.float64)
        result.reference_abs_sum = np.zeros((len(langs), n_layers), dtype=np.float64)
    if lape or deactivate:
        parts = [mlp_parts(layer, i) for i, layer in enumerate(layers)]  # fail before the forward
    if lape:
        width = int(parts[0][0].out_features)
        result.active_counts = np.zeros((len(langs), n_layers, width), dtype=np.int64)
        result.abs_output_sum = np.zeros((len(langs), n_layers, width), dtype=np.float64)
    consumer = _Pass(result, texts, embeddings=embeddings, lape=lape, nll=nll, record=record, compare_to=compare_to,
                     deactivate=deactivate)
    batches = pass_batches(texts, settings.batch_size, settings.pad_id, settings.device)
    run_forward(weights, batches, [consumer], settings.device, progress=settings.progress, description=label)
    for batch in batches:
        lang = batch.info["lang"]
        result.valid_tokens[lang] = result.valid_tokens.get(lang, 0) + int(batch.info["valid"].sum())
    return result


def total_valid_tokens(texts: Texts) -> int:
    return sum(int(s.valid.sum()) for lang in texts.langs for s in texts.samples[lang])


@contextlib.contextmanager
def reference_states(model: torch.nn.Module, texts: Texts, dtype: torch.dtype, folder: Path | None = None):
    """Room for the valid-token states of ``model`` (in memory, or a streamed checkpoint's skeleton);
    the model itself is not kept (the caller frees it before the next one is opened)."""
    store = ReferenceStates(total_valid_tokens(texts), len(find_decoder_layers(model)[1]),
                            int(model.get_input_embeddings().weight.shape[1]), dtype, folder)
    del model
    try:
        yield store
    finally:
        store.close()
