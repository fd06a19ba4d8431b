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

# ``prunekit eval``'s perplexity settings; the sweep, the Python API and every other perplexity say how they differ.
DEFAULT_SEQLEN = 2048
DEFAULT_PPL_SOURCE = "embedded"
DEFAULT_MAX_WINDOWS = None  # all the text (mC4: 256 windows, the Wanda / SparseGPT C4 convention)
MC4_DEFAULT_WINDOWS = 256
DEFAULT_PERPLEXITY = {"source": DEFAULT_PPL_SOURCE, "windowing": "stream", "seqlen": DEFAULT_SEQLEN,
                      "max_windows": DEFAULT_MAX_WINDOWS, "conventions": "prunekit"}
WHY_PERPLEXITIES_DIFFER = ("perplexities are comparable only under the same settings: the window length (a longer "
                           "window gives each token more context, so lower perplexity), how much text, and which text")


def describe_perplexity(settings: dict[str, Any], measured: dict[str, Any] | None = None) -> str:
    """ONE line saying how a perplexity was measured, and how that differs from ``prunekit eval``'s defaults.

    ``settings``: ``source`` (embedded, mc4, a path), ``windowing`` (``stream``: the documents joined and cut into
    non-overlapping windows of ``seqlen`` tokens, as eval, the sweep and the demo do; ``documents``: each document on
    its own, cut at ``max_length`` tokens, as compare does), ``seqlen`` / ``max_windows`` (stream), ``max_length`` /
    ``max_tokens`` (documents), ``conventions``. ``measured``: per language ``{"windows", "tokens"}`` if known.
    Used by eval's output, the demo's and compare's summaries, so the three numbers explain each other."""
    source = settings.get("source", DEFAULT_PPL_SOURCE)
    text = {"embedded": "the embedded held-out text", "mc4": "mC4's validation split"}.get(str(source), f"the text in {source}")
    if settings.get("windowing", "stream") == "documents":
        cap = settings.get("max_tokens")
        shape = (f"each document scored on its own, cut at {settings.get('max_length')} tokens, "
                 + (f"at most {cap:,} tokens per language" if cap else "all the text"))
        differs = [f"per-document instead of {DEFAULT_SEQLEN}-token windows over the joined text"]
    else:
        seqlen, most = settings.get("seqlen", DEFAULT_SEQLEN), settings.get("max_windows")
        if most is None and source == "mc4":
            most = MC4_DEFAULT_WINDOWS
        conventions = settings.get("conventions") or "prunekit"
        shape = f"windows of {seqlen} tokens over the joined documents, " + (f"the first {most}" if most else "all of them")
        if conventions != "prunekit":
            shape += f" ({conventions} conventions)"
        differs = ([f"{seqlen}-token windows instead of {DEFAULT_SEQLEN}"] if seqlen != DEFAULT_SEQLEN else []) \
            + ([f"the first {most} windows instead of all the text"] if most and source != "mc4" else []) \
            + ([f"--conventions {conventions}"] if conventions != "prunekit" else [])
    if source != DEFAULT_PPL_SOURCE:
        differs.append(f"{source} text instead of the embedded text")
    line = f"perplexity: {text}, {shape}"
    if measured:
        counts = {(m.get("windows"), m.get("tokens")) for m in measured.values()}
        if len(counts) == 1:
            windows, tokens = counts.pop()
            line += f" ({tokens:,} scored tokens per language)" if windows is None else \
                f" ({windows} window{'s' if windows != 1 else ''}, {tokens:,} scored tokens per language)"
        else:
            low = min(m.get("tokens", 0) for m in measured.values())
            high = max(m.get("tokens", 0) for m in measured.values())
            line += f" ({low:,}–{high:,} scored tokens per language)"
    if differs:
        line += f"; differs from `prunekit eval`'s defaults ({'; '.join(differs)}): {WHY_PERPLEXITIES_DIFFER}"
    return line


def describe_results_perplexity(results: dict[str, Any]) -> str:
    """:func:`describe_perplexity` of an evaluation's results.json (``prunekit eval``, a sweep run)."""
    settings = results.get("settings") or {}
    conventions = settings.get("conventions")
    return describe_perplexity({"source": settings.get("ppl_source"), "seqlen": settings.get("seqlen"),
                                "max_windows": settings.get("max_windows"),
                                "conventions": conventions.get("name") if isinstance(conventions, dict) else conventions},
                               results.get("perplexity") or None)


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
    forward, so hidden-state measurements ride on it (see ``perplexity_and_hidden_state_errors``)."""
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
