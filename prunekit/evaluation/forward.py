"""One layer-by-layer forward for evaluation and analysis, with per-layer consumers.

Perplexity, SNR / pruning error against the dense model, and compare's LSAR / LAPE / drift all run
through :func:`run_forward`. It takes a batch list and runs the model layer-major:

1. **inputs** — every batch goes through the model's own decoder forward with each decoder layer
   replaced by a recorder: the first layer's input (embedding, Gemma's scaling and all) and every
   layer's keyword arguments (masks per layer type, rotary position embeddings) are exactly what the
   model computes; the recorder of the last layer stops the forward before the final norm
   (``prunekit.layer_inputs``, shared with the pruning engine).
2. **layers** — decoder layer k is loaded (see below), every batch's hidden state goes through it,
   the consumers see each output (``Consumer.layer``), and the layer is released.
3. **head** — only when a consumer wants scores: the decoder forward runs once more per batch with
   its layers replaced by a replay of the last layer's output, so the final norm is the model's own;
   the LM head is applied chunk by chunk of tokens with the model's logit transform (checked once
   against the model's own forward logits; a model whose head does something else is scored by its
   own forward on the replayed states, one window at a time).

The weights come from a :class:`Weights`: :class:`ModelWeights` over an in-memory model (each layer
moved to the compute device when reached and back after), or :class:`ShardWeights`, which builds the
model skeleton on the meta device (``checkpoint_files.empty_model``, accelerate's
``init_empty_weights``: non-persistent buffers such as rotary ``inv_freq`` are created by the model's
own ``__init__``, then moved to the device; they are never read from the shards) and reads each
layer's tensors from the checkpoint's shards (``checkpoint_files.SafetensorsCheckpoint``) only when
the layer is reached. Tied embeddings stay tied: the LM head is read under the embedding's
name. Peak memory is one layer (or the embedding, or the head) plus the activations of the batches.

Layer-major order runs the same operations on the same shapes as a whole-model forward, so the
numbers equal it (the head's chunking aside, within float rounding).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F

from prunekit.checkpoint_files import SafetensorsCheckpoint, empty_model
from prunekit.errors import ModelError
from prunekit.evaluation.microbatches import MicroBatches
from prunekit.layer_inputs import capture_inputs, decoder_of, layers_replaced
from prunekit.models import find_decoder_layers, text_config
from prunekit.progress import progress_bar

log = logging.getLogger(__name__)

LOGIT_CHUNK_ELEMENTS = 1 << 26  # logits computed at once: 64M floats (256 MiB in fp32)
PROBE_TOKENS = 8


# ----------------------------------------------------------------------------------- batches


@dataclass
class Batch:
    """One batch of token windows and whatever its consumers need to know about it."""

    input_ids: torch.Tensor  # [B, T] long
    attention_mask: torch.Tensor | None = None  # [B, T]; None: every position is real
    info: dict[str, Any] = field(default_factory=dict)


class Consumer:
    """What a measurement does with the forward; override the parts it needs."""

    wants_scores = False  # whether :meth:`final` is called (the head runs only for consumers that want it)

    def attach(self, index: int, layer: torch.nn.Module) -> list[Any]:
        """Hooks on decoder layer ``index`` while it is loaded (returned handles are removed after)."""
        return []

    def before(self, index: int, batch: Batch) -> None:
        """Called right before ``batch`` goes through layer ``index`` (for hooks that need the batch)."""

    def layer(self, index: int, hidden: torch.Tensor, batch: Batch) -> None:
        """The output of decoder layer ``index`` for ``batch``: [B, T, d] on the compute device."""

    def final(self, batch: Batch, scores: "Scores") -> None:
        """The batch's next-token scores after the final norm and the LM head."""


class Callback(Consumer):
    """A plain ``callback(index, hidden)`` as a consumer."""

    def __init__(self, callback: Callable[[int, torch.Tensor], None]):
        self.callback = callback

    def layer(self, index: int, hidden: torch.Tensor, batch: Batch) -> None:
        self.callback(index, hidden)


# ----------------------------------------------------------------------------------- weights


def _move_outside_layers(module: torch.nn.Module, layers: torch.nn.ModuleList, device: torch.device) -> None:
    """Move every parameter and buffer except the decoder layers' (ties kept: tensors move in place)."""
    if module is layers:
        return
    if not any(m is layers for m in module.modules()):
        module.to(device)
        return
    for name, param in module.named_parameters(recurse=False):
        param.data = param.data.to(device)
    for name, buffer in module.named_buffers(recurse=False):
        module._buffers[name] = buffer.to(device)
    for child in module.children():
        _move_outside_layers(child, layers, device)


class Weights:
    """Where the forward gets its modules from."""

    model: torch.nn.Module

    def prepare(self, device: torch.device) -> None:
        """Before the first stage: small non-layer state onto the device."""

    def load_input(self, device: torch.device) -> None:
        """The input embedding, for the first stage."""

    def release_input(self) -> None:
        pass

    def load_layer(self, index: int, device: torch.device) -> torch.nn.Module:
        raise NotImplementedError

    def release_layer(self, index: int) -> None:
        pass

    def load_output(self, device: torch.device) -> None:
        """The final norm and LM head, for the scoring stage."""

    def release_output(self) -> None:
        pass

    def finish(self) -> None:
        """After the forward."""


class ModelWeights(Weights):
    """An in-memory model: the layer being run is on the compute device, the rest where it was."""

    def __init__(self, model: torch.nn.Module):
        self.model = model
        _, self.layers = find_decoder_layers(model)
        self.home = next(model.parameters()).device
        self._moved: dict[int, torch.device] = {}

    def prepare(self, device: torch.device) -> None:
        self.home = next(self.model.parameters()).device
        _move_outside_layers(self.model, self.layers, device)

    def load_layer(self, index: int, device: torch.device) -> torch.nn.Module:
        layer = self.layers[index]
        here = next(layer.parameters()).device
        if here != device:
            self._moved[index] = here
            layer.to(device)
        return layer

    def release_layer(self, index: int) -> None:
        if index in self._moved:
            self.layers[index].to(self._moved.pop(index))

    def finish(self) -> None:
        _move_outside_layers(self.model, self.layers, self.home)


class ShardWeights(Weights):
    """A checkpoint read lazily from its safetensors shards onto a meta-device skeleton."""

    def __init__(self, model: torch.nn.Module, checkpoint: SafetensorsCheckpoint, names: dict[str, str]):
        self.model = model
        self.path: Path | None = None  # the checkpoint directory (set by :meth:`open`)
        self.checkpoint = checkpoint  # the shards (checkpoint tensor name -> file: ``checkpoint.weight_map``)
        self.names = names  # model tensor name -> checkpoint tensor name (tied names share one)
        self.layers_name, self.layers = find_decoder_layers(model)
        embedding = model.get_input_embeddings()
        self.input_names = [n for n in names if _owner(model, n) is embedding]
        prefix = f"{self.layers_name}."
        self.output_names = [n for n in names if not n.startswith(prefix) and n not in self.input_names]
        self.tensors_read = 0  # bytes read from the shards (tests and benchmarks check it)
        self.scheme = None  # a pack-quantized checkpoint's compressed-tensors scheme (its Linears are unpacked)

    @classmethod
    def open(cls, path: str | Path, dtype: torch.dtype | None, trust_remote_code: bool = False) -> "ShardWeights | None":
        """The skeleton of the model in ``path``; None when its weights are not safetensors whose names
        the model uses as they are (the caller then loads the model whole)."""
        from transformers import AutoConfig

        path = Path(path)
        checkpoint = SafetensorsCheckpoint.find(path)
        if checkpoint is None:
            return None
        files = checkpoint.weight_map
        config = AutoConfig.from_pretrained(str(path), trust_remote_code=trust_remote_code)
        scheme = None
        if getattr(config, "quantization_config", None) is not None:
            scheme = packed_scheme(config.quantization_config)
            if scheme is None:
                return None  # another quantization: transformers reads it on a whole load
            del config.quantization_config  # the skeleton has plain Linears; each is unpacked as it is read
        if dtype is None:  # the checkpoint's own (a packed one's: the dtype its scales and kept Linears are in)
            dtype = getattr(text_config(config), "dtype", None) or getattr(config, "dtype", None) or torch.float32
            dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
        try:
            model = empty_model(config, dtype, trust_remote_code)
        except ValueError as err:
            raise ModelError(f"cannot load '{path}' as a causal language model: {err}") from err
        model.tie_weights()  # from_config leaves tied embeddings untied on the meta device
        model.eval()
        model.config.use_cache = False
        aliases: dict[int, list[str]] = {}
        for name, param in model.named_parameters(remove_duplicate=False):
            aliases.setdefault(id(param), []).append(name)
        names: dict[str, str] = {}
        for name in model.state_dict():
            group = aliases.get(id(model.get_parameter(name)) if _is_parameter(model, name) else None, [name])
            stored = next((n for n in [name, *group] if n in files), None)
            if stored is None and scheme is not None and f"{name}_packed" in files:
                stored = f"{name}_packed"  # a packed Linear: weight_packed, weight_scale, weight_shape (+ zero point)
            if stored is None:
                log.info("'%s' has no tensor '%s' in its shards; loading the model whole", path, name)
                return None
            names[name] = stored
        weights = cls(model, checkpoint, names)
        weights.path, weights.scheme = path, scheme
        return weights

    def _read(self, names: Sequence[str], device: torch.device) -> None:
        from accelerate.utils import set_module_tensor_to_device

        stored = list(dict.fromkeys(self.names[name] for name in names))  # tied names share one tensor
        parts = {key: [f"{key[: -len('weight_packed')]}{part}" for part in PACKED_PARTS
                       if f"{key[: -len('weight_packed')]}{part}" in self.checkpoint.weight_map]
                 for key in stored if key.endswith("_packed")}
        wanted = [key for key in stored if key not in parts] + [part for group in parts.values() for part in group]
        # One handle per file and read: the pages it maps are given back when the views are.
        views = self.checkpoint.read(wanted, materialise=False)
        self.tensors_read += sum(view.numel() * view.element_size() for view in views.values())
        read: dict[str, torch.Tensor] = {}
        for name in names:
            key = self.names[name]
            if key not in read:
                target = _tensor_of(self.model, name)
                tensor = self._unpack({p[len(key) - len("weight_packed"):]: views.pop(p) for p in parts[key]}) \
                    if key in parts else views.pop(key)
                read[key] = tensor.to(device=device, dtype=target.dtype)
                del tensor
            set_module_tensor_to_device(self.model, name, device, value=read[key])

    def _unpack(self, state: dict[str, torch.Tensor]) -> torch.Tensor:
        """One packed Linear's weight (``weight_packed``, ``weight_scale``, ``weight_shape``, maybe
        ``weight_zero_point``), decompressed by compressed-tensors (in the dtype of its scales)."""
        from compressed_tensors.compressors import BaseCompressor

        compressor = BaseCompressor.get_value_from_registry(PACKED_FORMAT)
        return compressor.decompress(state, self.scheme)["weight"].to(state["weight_scale"].dtype)

    def _drop(self, names: Sequence[str]) -> None:
        from accelerate.utils import set_module_tensor_to_device

        for name in names:
            set_module_tensor_to_device(self.model, name, "meta")

    def prepare(self, device: torch.device) -> None:
        # Non-persistent buffers (rotary inv_freq, Gemma's embed_scale) were made by the model's own
        # __init__ on the CPU; they are not in the shards.
        persistent = set(self.names)
        for name, buffer in list(self.model.named_buffers()):
            if name not in persistent:
                module, attr = _split(self.model, name)
                module._buffers[attr] = buffer.to(device)

    def load_input(self, device: torch.device) -> None:
        self._read(self.input_names, device)

    def release_input(self) -> None:
        self._drop(self.input_names)

    def _layer_names(self, index: int) -> list[str]:
        prefix = f"{self.layers_name}.{index}."
        return [n for n in self.names if n.startswith(prefix)]

    def load_layer(self, index: int, device: torch.device) -> torch.nn.Module:
        self._read(self._layer_names(index), device)
        return self.layers[index]

    def release_layer(self, index: int) -> None:
        self._drop(self._layer_names(index))

    def load_output(self, device: torch.device) -> None:
        self._read(self.output_names, device)

    def release_output(self) -> None:
        self._drop(self.output_names)


PACKED_FORMAT = "pack-quantized"
PACKED_PARTS = ("weight_packed", "weight_scale", "weight_shape", "weight_zero_point")


def packed_scheme(quantization_config: Any):
    """The compressed-tensors scheme of a pack-quantized checkpoint whose Linears share one scheme
    (prunekit's and llm-compressor's WxA16); None for any other quantization."""
    config = quantization_config if isinstance(quantization_config, dict) else quantization_config.to_dict()
    groups = config.get("config_groups") or {}
    if config.get("quant_method") != "compressed-tensors" or config.get("format") != PACKED_FORMAT or len(groups) != 1:
        return None
    from prunekit.packing import require_compressed_tensors

    require_compressed_tensors("reading a pack-quantized checkpoint needs compressed-tensors")
    from compressed_tensors.quantization import QuantizationScheme

    return QuantizationScheme.model_validate(next(iter(groups.values())))


def _split(model: torch.nn.Module, name: str) -> tuple[torch.nn.Module, str]:
    path, _, attr = name.rpartition(".")
    return (model.get_submodule(path) if path else model), attr


def _owner(model: torch.nn.Module, name: str) -> torch.nn.Module:
    return _split(model, name)[0]


def _is_parameter(model: torch.nn.Module, name: str) -> bool:
    module, attr = _split(model, name)
    return attr in module._parameters


def _tensor_of(model: torch.nn.Module, name: str) -> torch.Tensor:
    module, attr = _split(model, name)
    return module._parameters[attr] if attr in module._parameters else module._buffers[attr]


def open_weights(source, dtype: torch.dtype | None, trust_remote_code: bool = False) -> Weights:
    """Weights of a resolved model (``prunekit.models.ModelSource``): streamed from its safetensors
    shards when it has them, else the model loaded whole."""
    weights = ShardWeights.open(source.path, dtype, trust_remote_code)
    if weights is not None:
        return weights
    from prunekit.models import load_model

    model, _, _ = load_model(source, dtype or "float32", trust_remote_code=trust_remote_code, with_tokenizer=False)
    return ModelWeights(model)


def as_weights(model_or_weights) -> Weights:
    return model_or_weights if isinstance(model_or_weights, Weights) else ModelWeights(model_or_weights)


# ------------------------------------------------------------------------------------ stages


def _replayed(model_or_decoder, layers, hidden: torch.Tensor, mask: torch.Tensor | None, **extra):
    """The module's own forward after the decoder layers, with the last layer's output ``hidden``."""
    last = len(layers) - 1

    def make(index: int):
        def replay(*args, **kw):
            return hidden if index == last else (args[0] if args else kw["hidden_states"])

        return replay

    with layers_replaced(layers, make):
        return model_or_decoder(inputs_embeds=hidden, attention_mask=mask, use_cache=False, **extra)


def logit_transform(model: torch.nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """What a causal LM does to ``lm_head(h)`` before the loss, for the transforms we know of."""
    config = text_config(model.config)
    scale = getattr(model, "logit_scale", None)
    if scale is None:
        scale = getattr(config, "logit_scale", None)
    divide = getattr(config, "logits_scaling", None)
    cap = getattr(config, "final_logit_softcapping", None)

    def transform(logits: torch.Tensor) -> torch.Tensor:
        if isinstance(scale, (int, float)) and scale != 1:
            logits = logits * scale
        if isinstance(divide, (int, float)) and divide not in (0, 1):
            logits = logits / divide
        if cap:
            logits = torch.tanh(logits / cap) * cap
        return logits

    return transform


class Head:
    """The LM head applied in chunks of tokens, checked once against the model's own logits."""

    def __init__(self, model: torch.nn.Module, layers):
        self.model = model
        self.layers = layers
        self.head = model.get_output_embeddings()
        self.transform = logit_transform(model)
        self.chunked = self.head is not None
        self.probed = False

    def logits(self, normed: torch.Tensor) -> torch.Tensor:
        return self.transform(self.head(normed).float())

    def probe(self, raw: torch.Tensor, normed: torch.Tensor, mask: torch.Tensor | None) -> None:
        """Compare the chunked head with the model's own forward on the last few positions of one window."""
        self.probed = True
        if not self.chunked:
            return
        keep = min(PROBE_TOKENS, raw.shape[1])
        try:
            reference = _replayed(self.model, self.layers, raw[:1], None if mask is None else mask[:1],
                                  logits_to_keep=keep).logits.float()
        except TypeError:  # a model without logits_to_keep: trust the known transforms
            return
        mine = self.logits(normed[:1, -keep:])
        scale = reference.abs().max().clamp_min(1e-6)
        tolerance = 1e-4 if normed.dtype == torch.float32 else 3e-2
        if reference.shape != mine.shape or ((reference - mine).abs().max() / scale) > tolerance:
            log.warning(
                "%s transforms its logits in a way prunekit does not know; scoring with the model's own "
                "forward, one window at a time (more memory)", type(self.model).__name__,
            )
            self.chunked = False


class Scores:
    """Next-token negative log-likelihoods of one batch, computed on demand."""

    def __init__(self, head: Head, raw: torch.Tensor, normed: torch.Tensor, batch: Batch, mask: torch.Tensor | None):
        self.head, self.raw, self.normed, self.batch, self.mask = head, raw, normed, batch, mask

    def nll(self, targets: torch.Tensor | None = None) -> tuple[float, int]:
        """Σ NLL (fp32 per token, fp64 sum) of token t+1 given tokens ≤ t, over the target positions
        ``targets`` ([B, T-1] bool; None: all of them), and their count."""
        ids = self.batch.input_ids.to(self.normed.device)
        labels = ids[:, 1:]
        select = torch.ones_like(labels, dtype=torch.bool) if targets is None else targets.to(labels.device)
        total = torch.zeros((), dtype=torch.float64, device=ids.device)
        count = int(select.sum())
        if count == 0:
            return 0.0, 0
        if not self.head.chunked:
            for row in range(ids.shape[0]):
                mask = None if self.mask is None else self.mask[row : row + 1]
                logits = _replayed(self.head.model, self.head.layers, self.raw[row : row + 1], mask).logits[0, :-1]
                losses = F.cross_entropy(logits.float()[select[row]], labels[row][select[row]], reduction="none")
                total += losses.double().sum()
            return float(total), count
        hidden = self.normed[:, :-1][select]
        flat = labels[select]
        chunk = max(1, LOGIT_CHUNK_ELEMENTS // self.head.head.weight.shape[0])
        for start in range(0, hidden.shape[0], chunk):
            logits = self.head.logits(hidden[start : start + chunk])
            total += F.cross_entropy(logits, flat[start : start + chunk], reduction="none").double().sum()
        return float(total), count


# ------------------------------------------------------------------------------------- forward


def run_forward(
    weights,
    batches: Sequence[Batch],
    consumers: Sequence[Consumer],
    device: torch.device | str = "cpu",
    *,
    progress: bool = True,
    description: str = "forward",
    store: torch.device | str | None = None,
) -> int:
    """Run ``batches`` through the model layer by layer, feeding ``consumers``; returns the layer count.

    ``weights`` is a :class:`Weights` or an in-memory model. ``store``: where the batches' hidden states
    wait between layers (default: the compute device; host RAM moves each to the device for its turn)."""
    weights = as_weights(weights)
    device = torch.device(device)
    store = device if store is None else torch.device(store)
    model = weights.model
    decoder = decoder_of(model)
    _, layers = find_decoder_layers(model)
    scoring = any(c.wants_scores for c in consumers)
    hidden: list[torch.Tensor] = []
    kwargs: list[list[dict[str, Any]]] = []
    shared: dict[tuple, list[dict[str, Any]]] = {}  # kwargs depend on the shape only when there is no mask
    halving = MicroBatches()
    with torch.no_grad(), progress_bar(description, len(layers) + 1 + int(scoring), progress) as update:
        weights.prepare(device)
        try:
            weights.load_input(device)
            try:
                for batch in batches:
                    mask = None if batch.attention_mask is None else batch.attention_mask.to(device)
                    first, kw = capture_inputs(decoder, layers, batch.input_ids.to(device), mask)
                    hidden.append(first.to(store))
                    if batch.attention_mask is None:
                        kw = shared.setdefault(tuple(batch.input_ids.shape), kw)
                    kwargs.append(kw)
            finally:
                weights.release_input()
            update(1, len(layers) + 1 + int(scoring))
            for index in range(len(layers)):
                layer = weights.load_layer(index, device)
                handles = [h for c in consumers for h in c.attach(index, layer)]
                try:
                    for b, batch in enumerate(batches):
                        for consumer in consumers:
                            consumer.before(index, batch)
                        out = halving.layer(layer, hidden[b], kwargs[b][index], device)
                        for consumer in consumers:
                            consumer.layer(index, out, batch)
                        hidden[b] = out.to(store)
                finally:
                    for handle in handles:
                        handle.remove()
                    weights.release_layer(index)
                update(index + 2, len(layers) + 1 + int(scoring))
            if scoring:
                _score(weights, decoder, layers, batches, hidden, consumers, device)
                update(len(layers) + 2, len(layers) + 2)
        finally:
            weights.finish()
    return len(layers)


def _score(weights: Weights, decoder, layers, batches, hidden, consumers, device) -> None:
    weights.load_output(device)
    try:
        head = Head(weights.model, layers)
        for b, batch in enumerate(batches):
            hidden[b] = hidden[b].to(device)
            mask = None if batch.attention_mask is None else batch.attention_mask.to(device)
            normed = _replayed(decoder, layers, hidden[b], mask).last_hidden_state
            if not head.probed:
                head.probe(hidden[b], normed, mask)
            scores = Scores(head, hidden[b], normed, batch, mask)
            for consumer in consumers:
                if consumer.wants_scores:
                    consumer.final(batch, scores)
            hidden[b] = None  # this batch is done
    finally:
        weights.release_output()
