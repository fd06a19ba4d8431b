"""Conventions: how calibration windows, perplexity windows and pruning thresholds are built.

Two sets, chosen with ``--conventions`` (config key ``conventions:``):

``prunekit`` (the default)
    calibration: documents shuffled with the seed and joined with EOS, non-overlapping windows, each
    starting with BOS (short documents are used, not skipped); perplexity: BOS + seqlen−1 tokens per
    window, the last partial window scored too; magnitude / SparseGPT prune exactly ⌊n·s⌋ weights
    per matrix / 128-column block.
``study``
    exactly the code the study adopted (locuslab/wanda, IST-DASLab/sparsegpt): calibration windows
    are a random seqlen-token slice of a random document longer than seqlen tokens (tokenized with
    the tokenizer's special tokens, so BOS only where a slice starts at 0; shorter documents are
    drawn again); perplexity: the text joined with "\\n\\n", tokenized once, ⌊n/seqlen⌋
    non-overlapping windows, the last partial window dropped, PPL = exp(mean over windows of the
    window's mean NLL); magnitude / SparseGPT prune every weight ``<=`` the value at index ⌊n·s⌋ of
    the sorted scores (⌊n·s⌋+1 weights plus ties).
"""

from __future__ import annotations

from typing import Any

from prunekit.errors import ConfigError, did_you_mean

PRUNEKIT = "prunekit"
STUDY = "study"
CONVENTIONS = (PRUNEKIT, STUDY)
DEFAULT_CONVENTIONS = PRUNEKIT

# The study's calibration size: "128 sequences of 8192 tokens for each language".
STUDY_NSAMPLES = 128
STUDY_SEQLEN = 8192

DESCRIPTIONS: dict[str, dict[str, str]] = {
    PRUNEKIT: {
        "calibration": "documents shuffled with the seed and joined with EOS; non-overlapping windows of seqlen-1 "
                       "tokens, each prefixed with BOS",
        "perplexity": "documents joined with '\\n\\n', tokenized once without special tokens; windows of BOS + "
                      "seqlen-1 tokens; the last partial window scored; PPL = exp(total NLL / scored tokens)",
        "threshold": "magnitude and SparseGPT prune exactly floor(n*s) weights per matrix / 128-column block",
    },
    STUDY: {
        "calibration": "locuslab/wanda get_c4: a random document with more than seqlen tokens (tokenized with special "
                       "tokens), a random seqlen-token window inside it; Python random seeded with the seed",
        "perplexity": "locuslab/wanda eval_ppl_wikitext: documents joined with '\\n\\n', tokenized once with special "
                      "tokens; floor(n/seqlen) windows, the last partial one dropped; PPL = exp(mean over windows "
                      "of the window's mean NLL)",
        "threshold": "reference '<=': every weight whose score is <= the value at index floor(n*s) of the sorted "
                     "scores (floor(n*s)+1 weights plus ties) per matrix (magnitude) / 128-column block (SparseGPT)",
    },
}

HELP = (
    "study: the study's reference code exactly (random windows of long documents, no BOS added; perplexity "
    "windows without BOS, last partial window dropped; '<=' thresholds). prunekit: BOS on every window, "
    "short documents used, every token scored, exact sparsity."
)


def parse_conventions(value: str | None) -> str:
    """Validate ``--conventions`` (None means the default)."""
    if value is None:
        return DEFAULT_CONVENTIONS
    name = str(value).strip().lower()
    if name not in CONVENTIONS:
        raise ConfigError(f"unknown --conventions '{value}'{did_you_mean(name, CONVENTIONS)}; choose {' or '.join(CONVENTIONS)}")
    return name


def describe(name: str) -> dict[str, Any]:
    """What is recorded in prunekit.json / results.json: the name and what it means."""
    return {"name": name, **DESCRIPTIONS[name]}
