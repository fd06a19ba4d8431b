"""Token-level perplexity over non-overlapping windows of held-out text.

Windowing with ``conventions="prunekit"`` (the default):

* the documents are joined with ``"\\n\\n"`` and tokenized ONCE, without special tokens;
* the token stream is cut into consecutive, non-overlapping pieces of ``seqlen - 1`` tokens and
  each piece is prefixed with the tokenizer's BOS token, so every window is ``seqlen`` long; the
  BOS position is context only and is never scored, so every content token is scored exactly once
  (a tokenizer without a BOS token gets pieces of ``seqlen`` tokens whose first token is context);
* the last, shorter window is scored too when it has at least 2 tokens;
* PPL = exp(total NLL / scored tokens), with the NLL of each token in fp32 and the sum in fp64.

With ``conventions="study"`` exactly the reference (locuslab/wanda ``eval_ppl_wikitext``): the
documents are joined with ``"\n\n"`` and tokenized once WITH the tokenizer's special tokens (so BOS
only at the start of the stream), cut into ⌊n/seqlen⌋ windows of ``seqlen`` tokens, the last
partial window dropped; PPL = exp(mean over windows of the window's mean NLL) (every window scores
seqlen−1 tokens, so this equals exp(total NLL / scored tokens)).

The final hidden state comes from the decoder once per batch of windows; the LM head (and any
logit transform: Cohere's ``logit_scale``, Granite's ``logits_scaling``, Gemma's
``final_logit_softcapping``) is applied chunk by chunk of tokens so a 262k vocabulary never
materialises ``[batch, seqlen, vocab]`` logits. Before the first batch a short probe compares
this path with the model's own ``forward`` logits; a model whose head does something else falls
back to the model's own forward, one window at a time.
"""

from __future__ import annotations

import contextlib
import logging
import math
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F

from prunekit.errors import ConfigError, DataError
from prunekit.models import layer_hooks, text_config
from prunekit.progress import progress_bar

log = logging.getLogger(__name__)

LOGIT_CHUNK_ELEMENTS = 1 << 26  # logits computed at once: 64M floats (256 MiB in fp32)
PROBE_TOKENS = 8


@dataclass
class Windows:
    """Token windows over a text, ready to score (each a list of ids)."""

    windows: list[list[int]]
    bos: int | None  # the BOS put before every window (None: none is added)
    seqlen: int
    stream_tokens: int
    conventions: str = "prunekit"

    @property
    def scored_tokens(self) -> int:
        return sum(len(w) - 1 for w in self.windows)

    def truncated(self, max_positions: int) -> "Windows":
        """The first ``max_positions`` token positions (windows in order; the last one cut short)."""
        out, total = [], 0
        for window in self.windows:
            take = min(len(window), max_positions - total)
            if take < 2:
                break
            out.append(window[:take])
            total += take
        return Windows(out, self.bos, self.seqlen, self.stream_tokens, self.conventions)


def make_windows(
    tokenizer, texts: list[str], seqlen: int, max_windows: int | None = None, conventions: str = "prunekit"
) -> Windows:
    """Cut ``texts`` into scoring windows (see the module docstring)."""
    if seqlen < 2:
        raise ConfigError(f"--seqlen must be at least 2, got {seqlen}")
    if conventions == "study":
        return _study_windows(tokenizer, texts, seqlen, max_windows)
    bos = tokenizer.bos_token_id
    stream = tokenizer("\n\n".join(texts), add_special_tokens=False, verbose=False)["input_ids"]
    body = seqlen - 1 if bos is not None else seqlen
    windows: list[list[int]] = []
    for start in range(0, len(stream), body):
        window = ([bos] if bos is not None else []) + stream[start : start + body]
        if len(window) >= 2:
            windows.append(window)
        if max_windows is not None and len(windows) >= max_windows:
            break
    if not windows:
        raise DataError(f"the evaluation text has {len(stream)} tokens: too short to score a single window")
    return Windows(windows, bos, seqlen, len(stream))


def _study_windows(tokenizer, texts: list[str], seqlen: int, max_windows: int | None) -> Windows:
    stream = tokenizer("\n\n".join(texts), verbose=False)["input_ids"]  # special tokens as the tokenizer adds them
    count = len(stream) // seqlen
    if max_windows is not None:
        count = min(count, max_windows)
    if count == 0:
        raise DataError(
            f"the evaluation text has {len(stream)} tokens, fewer than one window of --seqlen {seqlen}; the study's "
            "convention drops partial windows: lower --seqlen, give more text, or use --conventions prunekit"
        )
    windows = [stream[i * seqlen : (i + 1) * seqlen] for i in range(count)]
    return Windows(windows, None, seqlen, len(stream), "study")


def batches(windows: list[list[int]], batch_size: int) -> Iterator[torch.Tensor]:
    """Equal-length windows stacked ``batch_size`` at a time (a shorter window goes alone)."""
    current: list[list[int]] = []
    for window in windows:
        if current and (len(window) != len(current[0]) or len(current) == batch_size):
            yield torch.tensor(current, dtype=torch.long)
            current = []
        current.append(window)
    if current:
        yield torch.tensor(current, dtype=torch.long)


def decoder_of(model: torch.nn.Module) -> torch.nn.Module:
    """The model without its LM head (its output is the final, normed hidden state)."""
    if hasattr(model, "get_decoder"):
        decoder = model.get_decoder()
        if decoder is not None and decoder is not model:
            return decoder
    return model.base_model


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


class TokenScorer:
    """Sum of next-token NLLs of batches of windows, with the LM head applied in chunks."""

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.decoder = decoder_of(model)
        self.head = model.get_output_embeddings()
        self.transform = logit_transform(model)
        self.chunked = self.head is not None
        self._probed = False

    def _device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _chunked_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.transform(self.head(hidden).float())

    def probe(self, input_ids: torch.Tensor) -> None:
        """Check the chunked head against the model's own logits on a few tokens."""
        self._probed = True
        if not self.chunked:
            return
        ids = input_ids[:1, :PROBE_TOKENS].to(self._device())
        with torch.no_grad():
            reference = self.model(input_ids=ids, use_cache=False).logits.float()
            hidden = self.decoder(input_ids=ids, use_cache=False).last_hidden_state
            mine = self._chunked_logits(hidden)
        scale = reference.abs().max().clamp_min(1e-6)
        tolerance = 1e-4 if hidden.dtype == torch.float32 else 3e-2
        if reference.shape != mine.shape or ((reference - mine).abs().max() / scale) > tolerance:
            log.warning(
                "%s transforms its logits in a way prunekit does not know; scoring with the model's own "
                "forward, one window at a time (more memory)", type(self.model).__name__,
            )
            self.chunked = False

    def nll(self, input_ids: torch.Tensor) -> tuple[float, int]:
        """Summed NLL (fp64) of tokens 1..T-1 of each window given its prefix, and their count."""
        if not self._probed:
            self.probe(input_ids)
        ids = input_ids.to(self._device())
        targets = ids[:, 1:]
        total = torch.zeros((), dtype=torch.float64, device=ids.device)
        with torch.no_grad():
            if not self.chunked:
                for row in range(ids.shape[0]):
                    logits = self.model(input_ids=ids[row : row + 1], use_cache=False).logits[0, :-1].float()
                    total += F.cross_entropy(logits, targets[row], reduction="sum").double()
                return float(total), int(targets.numel())
            hidden = self.decoder(input_ids=ids, use_cache=False).last_hidden_state[:, :-1]
            hidden = hidden.reshape(-1, hidden.shape[-1])
            flat = targets.reshape(-1)
            vocab = self.head.weight.shape[0]
            chunk = max(1, LOGIT_CHUNK_ELEMENTS // vocab)
            for start in range(0, hidden.shape[0], chunk):
                logits = self._chunked_logits(hidden[start : start + chunk])
                total += F.cross_entropy(logits, flat[start : start + chunk], reduction="sum").double()
        return float(total), int(targets.numel())


@dataclass
class PerplexityResult:
    ppl: float
    nll: float  # mean NLL per scored token (nats)
    tokens: int
    windows: int
    seqlen: int
    bos: bool

    def to_json(self) -> dict[str, Any]:
        return {"ppl": self.ppl, "nll": self.nll, "tokens": self.tokens, "windows": self.windows, "seqlen": self.seqlen}


def perplexity(
    model: torch.nn.Module,
    windows: Windows,
    batch_size: int = 4,
    progress: bool = True,
    description: str = "perplexity",
    layer_callback: Callable[[int, torch.Tensor], None] | None = None,
) -> PerplexityResult:
    """exp(mean NLL) over every scored token of ``windows`` (model already on its device).

    ``layer_callback(index, hidden)`` sees every decoder layer's output of the scoring passes, so
    hidden-state measurements ride on the same forward (see ``perplexity_and_hidden_state_errors``)."""
    scorer = TokenScorer(model)
    total, count = 0.0, 0
    todo = list(batches(windows.windows, batch_size))
    window_means: list[float] = []  # study: the reference's mean over windows of each window's mean NLL
    hooks = contextlib.nullcontext()
    if layer_callback is not None:
        scorer.probe(todo[0])  # the probe's own forward must not reach the callback
        hooks = layer_hooks(model, layer_callback)
    with hooks, progress_bar(description, len(todo), progress) as update:
        for done, batch in enumerate(todo, 1):
            nll, n = scorer.nll(batch)
            total += nll
            count += n
            window_means += [nll / n] * batch.shape[0]  # equal-length windows: the batch mean is each one's share
            update(done, len(todo))
    mean = total / count if windows.conventions != "study" else math.fsum(window_means) / len(window_means)
    return PerplexityResult(math.exp(mean), mean, count, len(windows.windows), windows.seqlen, windows.bos is not None)
