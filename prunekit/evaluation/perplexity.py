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


The windows run through the layer-by-layer forward of ``prunekit.evaluation.forward`` (the model in
memory, or streamed from its checkpoint a layer at a time); its LM head (and any logit transform:
Cohere's ``logit_scale``, Granite's ``logits_scaling``, Gemma's ``final_logit_softcapping``) is
applied chunk by chunk of tokens so a 262k vocabulary never materialises ``[batch, seqlen, vocab]``
logits, checked once against the model's own ``forward`` logits.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import torch

from prunekit.errors import ConfigError, DataError
from prunekit.evaluation.forward import Batch, Callback, Consumer, as_weights, run_forward

log = logging.getLogger(__name__)

# ``prunekit eval``'s perplexity window (EvaluationSpec's default); mC4 is scored on its first 256 windows by
# default (the Wanda / SparseGPT C4 convention). Why other places differ: artifacts.PERPLEXITY_SETTINGS_NOTE.
DEFAULT_SEQLEN = 2048
MC4_DEFAULT_WINDOWS = 256


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


def window_batches(windows: Windows, batch_size: int) -> list[Batch]:
    """The batches of :func:`batches` as forward batches."""
    return [Batch(ids) for ids in batches(windows.windows, batch_size)]


class NllSum(Consumer):
    """Σ next-token NLL over every scored position of the batches it sees."""

    wants_scores = True

    def __init__(self):
        self.total, self.count = 0.0, 0

    def final(self, batch: Batch, scores) -> None:
        nll, n = scores.nll()
        self.total += nll
        self.count += n


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
    model,
    windows: Windows,
    batch_size: int = 4,
    progress: bool = True,
    description: str = "perplexity",
    layer_callback: Callable[[int, torch.Tensor], None] | None = None,
    *,
    device: torch.device | str | None = None,
    consumers: Sequence[Consumer] = (),
) -> PerplexityResult:
    """exp(mean NLL) over every scored token of ``windows``.

    ``model`` is an in-memory model or a :class:`prunekit.evaluation.forward.Weights` (a checkpoint
    streamed layer by layer); ``device`` defaults to where the model's parameters are.
    ``layer_callback(index, hidden)`` and ``consumers`` see every decoder layer's output of the same
    forward, so hidden-state measurements ride on it (``passes.measure`` does that for every language at once)."""
    scorer = NllSum()
    extra = list(consumers) + ([Callback(layer_callback)] if layer_callback is not None else [])
    weights = as_weights(model)
    if device is None:
        device = next(weights.model.parameters()).device
    run_forward(weights, window_batches(windows, batch_size), [scorer, *extra], device, progress=progress,
                description=description)
    mean = scorer.total / scorer.count
    # study: the reference's mean over windows of each window's mean NLL; every study window scores the
    # same seqlen-1 tokens, so that mean equals total NLL / scored tokens.
    return PerplexityResult(math.exp(mean), mean, scorer.count, len(windows.windows), windows.seqlen, windows.bos is not None)
