"""Model passes over per-language evaluation text, with forward hooks that collect what the
analyses need — and nothing of the pruning stack.

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

from prunekit.errors import DataError, ModelError
from prunekit.models import find_decoder_layers, layer_output
from prunekit.progress import progress_bar
from prunekit.textsources import load_texts

DEFAULT_MAX_LENGTH = 512


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


def _nll(logits: torch.Tensor, ids: torch.Tensor, valid: torch.Tensor) -> tuple[float, int]:
    """Σ next-token NLL over targets that are valid content tokens (fp32 log-softmax, fp64 sum)."""
    targets = ids[:, 1:]
    mask = valid[:, 1:]
    if not bool(mask.any()):
        return 0.0, 0
    picked = logits[:, :-1][mask].float()
    losses = torch.nn.functional.cross_entropy(picked, targets[mask], reduction="none")
    return float(losses.double().sum()), int(mask.sum())


def run_pass(
    model: torch.nn.Module,
    texts: Texts,
    *,
    label: str,
    embeddings: bool = False,
    lape: bool = False,
    nll: bool = False,
    record: ReferenceStates | None = None,
    compare_to: ReferenceStates | None = None,
    deactivate: dict[int, torch.Tensor] | None = None,
    batch_size: int = 1,
    pad_id: int = 0,
    device: torch.device | str = "cpu",
    progress: bool = True,
) -> PassResult:
    """Run ``model`` over every language's samples with the requested hooks.

    ``record`` stores the valid-token layer outputs (reference model); ``compare_to`` accumulates the
    drift against stored ones (a target model: same texts, same order). ``deactivate`` maps a layer
    index to FFN neuron indices whose act_fn output is zeroed (Tang et al.'s test; zeroing the
    down_proj input at a neuron equals zeroing act_fn there, since the input is act_fn(gate) ⊙ up).
    """
    _, layers = find_decoder_layers(model)
    n_layers = len(layers)
    hidden = int(model.get_input_embeddings().weight.shape[1])
    langs = texts.langs
    result = PassResult(list(langs), n_layers, hidden)
    ctx: dict[str, Any] = {}
    handles = []
    if embeddings:
        result.embeddings = {
            lang: np.zeros((n_layers, len(texts.samples[lang]), hidden), dtype=np.float64) for lang in langs
        }
    if compare_to is not None:
        result.drift_abs_sum = np.zeros((len(langs), n_layers), dtype=np.float64)
        result.drift_l2_sum = np.zeros((len(langs), n_layers), dtype=np.float64)
        result.reference_abs_sum = np.zeros((len(langs), n_layers), dtype=np.float64)

    def layer_hook(index: int):
        def hook(module, args, output):
            h = layer_output(output)
            valid = ctx["valid"]
            if embeddings:
                store = result.embeddings[ctx["lang"]]
                for row, sample_index in enumerate(ctx["rows"]):
                    tokens = h[row][valid[row]].to(torch.float64)
                    store[index, sample_index] = tokens.mean(dim=0).cpu().numpy()
            if record is not None or compare_to is not None:
                flat = h[valid]  # [n_valid, d], rows in sample order
                start, stop = ctx["offset"], ctx["offset"] + flat.shape[0]
                if record is not None:
                    record.data[start:stop, index] = flat.to(record.dtype).cpu()
                if compare_to is not None:
                    ref = compare_to.data[start:stop, index].to(device=flat.device, dtype=torch.float32)
                    diff = ref - flat.float()
                    k = ctx["lang_index"]
                    result.drift_abs_sum[k, index] += float(diff.abs().sum(dtype=torch.float64))
                    result.drift_l2_sum[k, index] += float(torch.linalg.vector_norm(diff, dim=-1).sum(dtype=torch.float64))
                    result.reference_abs_sum[k, index] += float(ref.abs().sum(dtype=torch.float64))
        return hook

    for index, layer in enumerate(layers):
        handles.append(layer.register_forward_hook(layer_hook(index)))

    if lape or deactivate:
        parts = [mlp_parts(layer, i) for i, layer in enumerate(layers)]
    if lape:
        width = int(parts[0][0].out_features)
        result.active_counts = np.zeros((len(langs), n_layers, width), dtype=np.int64)
        result.abs_output_sum = np.zeros((len(langs), n_layers, width), dtype=np.float64)

        def gate_hook(index: int, act_fn):
            def hook(module, args, output):
                active = act_fn(output)[ctx["valid"]] > 0
                counts = active.sum(dim=0, dtype=torch.int64).cpu().numpy()
                result.active_counts[ctx["lang_index"], index] += counts
            return hook

        def down_hook(index: int):
            def hook(module, args):
                neurons = args[0][ctx["valid"]]  # act_fn(gate(x)) ⊙ up(x), after any deactivation
                sums = neurons.abs().sum(dim=0, dtype=torch.float64).cpu().numpy()
                result.abs_output_sum[ctx["lang_index"], index] += sums
            return hook

        for index, (gate, down, act) in enumerate(parts):
            handles.append(gate.register_forward_hook(gate_hook(index, act)))
            handles.append(down.register_forward_pre_hook(down_hook(index)))
    if deactivate:
        def zero_hook(columns: torch.Tensor):
            def hook(module, args):
                x = args[0].clone()
                x[..., columns.to(x.device)] = 0
                return (x, *args[1:])
            return hook

        for index, columns in deactivate.items():
            if len(columns):
                # registered first-come: runs before the LAPE hook (prepend) so |output| sees the zeros
                handles.append(parts[index][1].register_forward_pre_hook(zero_hook(columns), prepend=True))

    offset = 0
    try:
        with torch.inference_mode(), progress_bar(label, texts.num_batches(batch_size), progress) as update:
            done = 0
            for k, lang in enumerate(langs):
                row = 0
                for batch in texts.batches(lang, batch_size):
                    ids, attention, valid = collate(batch, pad_id)
                    ids, attention, valid = ids.to(device), attention.to(device), valid.to(device)
                    ctx.update(lang=lang, lang_index=k, valid=valid, offset=offset,
                               rows=list(range(row, row + len(batch))))
                    out = _forward(model, ids, attention, keep_all_logits=nll)
                    if nll:
                        total, count = _nll(out.logits, ids, valid)
                        result.nll_sum[lang] = result.nll_sum.get(lang, 0.0) + total
                        result.nll_tokens[lang] = result.nll_tokens.get(lang, 0) + count
                    n_valid = int(valid.sum())
                    result.valid_tokens[lang] = result.valid_tokens.get(lang, 0) + n_valid
                    offset += n_valid
                    row += len(batch)
                    done += 1
                    update(done, texts.num_batches(batch_size))
    finally:
        for handle in handles:
            handle.remove()
    return result


def _forward(model, ids, attention, keep_all_logits: bool):
    if keep_all_logits:
        return model(input_ids=ids, attention_mask=attention, use_cache=False)
    try:  # skip the (large-vocabulary) LM head for all but the last position
        return model(input_ids=ids, attention_mask=attention, use_cache=False, logits_to_keep=1)
    except TypeError:
        return model(input_ids=ids, attention_mask=attention, use_cache=False)


def total_valid_tokens(texts: Texts) -> int:
    return sum(int(s.valid.sum()) for lang in texts.langs for s in texts.samples[lang])


@contextlib.contextmanager
def reference_states(model: torch.nn.Module, texts: Texts, dtype: torch.dtype, folder: Path | None = None):
    _, layers = find_decoder_layers(model)
    hidden = int(model.get_input_embeddings().weight.shape[1])
    store = ReferenceStates(total_valid_tokens(texts), len(layers), hidden, dtype, folder)
    try:
        yield store
    finally:
        store.close()
