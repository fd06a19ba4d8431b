"""Calibration sets: n seeded windows of seqlen tokens in one language or an equal-share mix.

Two conventions (``prunekit.conventions``): ``prunekit`` joins the shuffled documents with EOS and
takes non-overlapping windows that each start with BOS; ``study`` takes, like the reference
(locuslab/wanda ``get_c4``), a random seqlen-token slice of a random document longer than seqlen.
When ``nsamples`` / ``seqlen`` are not given they are sized to what the text supplies, up to the
study's 128 × 8192 (``choose_size``)."""

from __future__ import annotations

import bisect
import hashlib
import json
import os
import random
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from prunekit.conventions import STUDY, STUDY_NSAMPLES, STUDY_SEQLEN
from prunekit.errors import DataError
from prunekit.io import cache_dir
from prunekit.languages import parse_languages
from prunekit.models import tokenizer_fingerprint
from prunekit.recipe import CalibrationSpec
from prunekit.textsources import load_texts

CHARS_PER_TOKEN_BUDGET = 8  # how much text to stream from mC4 per token needed (generous for every script)
AUTO_MIN_SEQLEN = 16  # automatic sizing never goes below this many tokens per sequence
AUTO_MIN_PER_LANGUAGE = 16  # ... and prefers a shorter seqlen to fewer than this many sequences per language


@dataclass
class CalibrationSet:
    """Token ids [n, seqlen] plus where they came from."""

    input_ids: torch.Tensor
    languages: list[str]
    source: str
    seed: int
    seqlen: int
    samples_per_language: dict[str, int]
    document_ids: list[list[str]]
    tokenizer: str
    locations: dict[str, str] = field(default_factory=dict)
    bos: bool = True
    content_hash: str = ""
    conventions: str = "prunekit"
    offsets: list[int] = field(default_factory=list)  # study: each window's first token within its document
    sizing: dict[str, Any] | None = None  # how nsamples / seqlen were chosen when not given

    @property
    def nsamples(self) -> int:
        return int(self.input_ids.shape[0])

    def provenance(self) -> dict[str, Any]:
        data = asdict(self)
        data.pop("input_ids")
        data["nsamples"] = self.nsamples
        data["num_tokens"] = int(self.input_ids.numel())
        return data


def split_budget(nsamples: int, languages: list[str]) -> dict[str, int]:
    """Equal shares of the budget; the remainder goes to the first languages in the given order."""
    base, rest = divmod(nsamples, len(languages))
    return {lang: base + (1 if i < rest else 0) for i, lang in enumerate(languages)}


def _language_seed(seed: int, lang: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{lang}".encode()).digest()[:8], "little")


def sample_windows(
    token_docs: list[list[int]],
    doc_ids: list[str],
    count: int,
    seqlen: int,
    seed: int,
    separator: int | None,
    bos: int | None,
) -> tuple[list[list[int]], list[list[str]]]:
    """Shuffle documents (seeded), concatenate them with a separator so that short documents are
    used rather than skipped, and take ``count`` distinct non-overlapping windows at random."""
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(token_docs))
    stream: list[int] = []
    starts: list[int] = []
    for i in order:
        starts.append(len(stream))
        stream.extend(token_docs[i])
        if separator is not None:
            stream.append(separator)
    body = seqlen - (1 if bos is not None else 0)
    slots = len(stream) // body
    if slots < count:
        raise DataError(
            f"calibration text too short: {len(stream)} tokens available, {count * body} needed "
            f"({count} samples × {body} tokens); lower --nsamples or --seqlen, or give more text"
        )
    chosen = rng.choice(slots, size=count, replace=False)
    windows, ids = [], []
    for slot in chosen:
        lo, hi = int(slot) * body, int(slot + 1) * body
        windows.append(([bos] if bos is not None else []) + stream[lo:hi])
        first = bisect.bisect_right(starts, lo) - 1
        last = bisect.bisect_right(starts, hi - 1) - 1
        ids.append([doc_ids[order[j]] for j in range(first, last + 1)])
    return windows, ids


def sample_study_windows(
    token_docs: list[list[int]], doc_ids: list[str], count: int, seqlen: int, seed: int
) -> tuple[list[list[int]], list[list[str]], list[int]]:
    """The reference's sampling (locuslab/wanda ``get_c4``): Python's ``random`` seeded with ``seed``;
    per sample, draw documents until one has more than ``seqlen`` tokens, then a window start in
    [0, len − seqlen − 1]. ``token_docs`` are tokenized with the tokenizer's special tokens, so a
    window holds BOS only when it starts at 0."""
    if not any(len(doc) > seqlen for doc in token_docs):
        longest = max((len(doc) for doc in token_docs), default=0)
        raise DataError(
            f"no document is longer than {seqlen} tokens (the longest has {longest}); the study's convention "
            "samples windows inside single documents: lower --seqlen, give longer documents, or use "
            "--conventions prunekit (which joins documents)"
        )
    rng = random.Random(seed)
    windows, ids, offsets = [], [], []
    for _ in range(count):
        while True:
            i = rng.randint(0, len(token_docs) - 1)
            if len(token_docs[i]) > seqlen:
                break
        start = rng.randint(0, len(token_docs[i]) - seqlen - 1)
        windows.append(list(token_docs[i][start : start + seqlen]))
        ids.append([doc_ids[i]])
        offsets.append(start)
    return windows, ids, offsets


def capacity(token_docs: list[list[int]], seqlen: int, conventions: str, separator: int | None, bos: int | None) -> int:
    """How many seqlen-token windows the text supplies without reusing tokens: prunekit's joined stream
    cut into windows; for the study's convention, the tokens of the documents longer than seqlen."""
    if conventions == STUDY:
        return sum(len(doc) for doc in token_docs if len(doc) > seqlen) // seqlen
    stream = sum(len(doc) + (separator is not None) for doc in token_docs)
    return stream // (seqlen - (1 if bos is not None else 0))


def _seqlen_candidates(top: int) -> list[int]:
    out, value = [top], 1 << (top.bit_length() - 1)
    if value == top:
        value //= 2
    while value >= AUTO_MIN_SEQLEN:
        out.append(value)
        value //= 2
    return out


def choose_size(
    token_docs: dict[str, list[list[int]]],
    nsamples: int | None,
    seqlen: int | None,
    conventions: str,
    separator: int | None,
    bos: int | None,
    max_seqlen: int | None = None,
    source: str = "",
) -> tuple[int, int, dict[str, Any]]:
    """``nsamples`` / ``seqlen`` where not given: the study's 128 × 8192 (seqlen capped by the model's
    context) when the text supplies them, else the longest power-of-two seqlen (down to 16) at which
    every language still supplies min(its share, 16) sequences, with as many sequences as fit.
    Returns (nsamples, seqlen, a record of the choice with a one-line ``message``)."""
    languages = list(token_docs)
    k = len(languages)
    target = nsamples if nsamples is not None else STUDY_NSAMPLES
    top = min(STUDY_SEQLEN, max_seqlen) if max_seqlen else STUDY_SEQLEN
    candidates = [seqlen] if seqlen is not None else _seqlen_candidates(max(top, AUTO_MIN_SEQLEN))
    chosen = None
    for s in candidates:
        caps = {lang: capacity(docs, s, conventions, separator, bos) for lang, docs in token_docs.items()}
        if nsamples is not None:
            fits = all(share <= caps[lang] for lang, share in split_budget(nsamples, languages).items())
            n = nsamples
        else:
            n = min(target, k * min(caps.values()))
            fits = min(caps.values()) >= min(-(-target // k), AUTO_MIN_PER_LANGUAGE)
        if fits:
            chosen = (n, s, caps)
            break
        if n >= k and nsamples is None and (chosen is None or chosen[0] * chosen[1] < n * s):
            chosen = (n, s, caps)  # the best so far if no seqlen reaches the preferred count
    tokens = {lang: sum(len(d) for d in docs) for lang, docs in token_docs.items()}
    if chosen is None or chosen[0] < 1:
        what = f"{nsamples} samples" if nsamples is not None else f"{k} sample(s)"
        at = f"{seqlen} tokens" if seqlen is not None else f"any --seqlen from {candidates[0]} down to {AUTO_MIN_SEQLEN}"
        raise DataError(
            f"calibration text too short: {source or 'the source'} cannot supply {what} of {at} "
            f"({', '.join(f'{lang}: {n} tokens' for lang, n in tokens.items())}); lower --nsamples or --seqlen, or give more text"
        )
    n, s, caps = chosen
    given = [name for name, value in (("--nsamples", nsamples), ("--seqlen", seqlen)) if value is not None]
    missing = [name for name, value in (("--nsamples", nsamples), ("--seqlen", seqlen)) if value is None]
    if (n, s) == (STUDY_NSAMPLES, STUDY_SEQLEN):
        why = "the study's values"
    else:
        supply = ", ".join(f"{lang}: {tokens[lang]:,} tokens" for lang in languages)
        limit = f"; the model's context is {max_seqlen} tokens" if max_seqlen and max_seqlen < STUDY_SEQLEN and seqlen is None else ""
        longest = " in documents longer than seqlen" if conventions == STUDY else ""
        why = (f"the most that {source or 'the source'} supplies{longest} ({supply}{limit}), "
               f"up to the study's {STUDY_NSAMPLES} × {STUDY_SEQLEN}")
    message = (f"calibration: {n} samples × {s} tokens, {why} ({' and '.join(missing)} not given"
               + (f"; {' '.join(given)} given" if given else "") + "; pass them to choose)")
    return n, s, {"auto": missing, "nsamples": n, "seqlen": s, "windows_supplied": caps, "tokens": tokens, "message": message}


def _cache_path(key: str) -> Path:
    return cache_dir("calibration") / f"{key}.safetensors"


def _save_cached(path: Path, calib: CalibrationSet) -> None:
    from safetensors.torch import save_file

    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        save_file({"input_ids": calib.input_ids.contiguous()}, tmp, metadata={"provenance": json.dumps(calib.provenance())})
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _load_cached(path: Path) -> CalibrationSet | None:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            meta = json.loads(handle.metadata()["provenance"])
            ids = handle.get_tensor("input_ids")
    except Exception:  # a corrupt cache entry is rebuilt, never trusted
        return None
    for key in ("nsamples", "num_tokens"):
        meta.pop(key, None)
    return CalibrationSet(input_ids=ids, **meta)


def _tokenize(tokenizer, text_set, conventions: str) -> list[list[int]]:
    """prunekit: plain tokens (BOS and EOS are added by the window builder); study: the tokenizer's
    own special tokens, as the reference calls it."""
    return tokenizer([d.text for d in text_set.documents], add_special_tokens=conventions == STUDY)["input_ids"]


def build_calibration_set(
    tokenizer,
    calib: str,
    source: str = "embedded",
    nsamples: int | None = 128,
    seqlen: int | None = 2048,
    seed: int = 0,
    use_cache: bool = True,
    conventions: str = "prunekit",
    max_seqlen: int | None = None,
) -> CalibrationSet:
    """Sample a calibration set for ``calib`` (``en``, ``en+de`` or ``all``) from ``source``: the
    :class:`~prunekit.recipe.CalibrationSpec` these arguments make, by :func:`sample_calibration_set`."""
    spec = CalibrationSpec(calib, source, nsamples, seqlen, seed, conventions)
    return sample_calibration_set(tokenizer, spec, use_cache=use_cache, max_seqlen=max_seqlen)


def sample_calibration_set(tokenizer, spec: CalibrationSpec, *, use_cache: bool = True, max_seqlen: int | None = None) -> CalibrationSet:
    """Sample the calibration set ``spec`` chooses (its languages given).

    ``spec.nsamples`` / ``spec.seqlen`` None: sized by :func:`choose_size` (``max_seqlen``: the model's
    context); the choice is in ``CalibrationSet.sizing`` with a one-line message."""
    if spec.languages is None:
        raise ValueError("the calibration spec names no languages; fill in the method's default with spec.for_method(...)")
    source, nsamples, seqlen, seed, conventions = spec.source, spec.nsamples, spec.seqlen, spec.seed, spec.conventions
    languages = [lang.code for lang in parse_languages(spec.languages)]
    budget_shares = split_budget(nsamples if nsamples is not None else STUDY_NSAMPLES, languages)
    budget_seqlen = seqlen if seqlen is not None else min(STUDY_SEQLEN, max_seqlen or STUDY_SEQLEN)
    texts = {
        lang: load_texts(source, lang, "calibration", char_budget=budget_shares[lang] * budget_seqlen * CHARS_PER_TOKEN_BUDGET)
        for lang in languages
        if budget_shares[lang] > 0
    }
    tok_hash = tokenizer_fingerprint(tokenizer)
    bos = tokenizer.bos_token_id
    separator = tokenizer.eos_token_id
    encoded: dict[str, list[list[int]]] = {}
    sizing = None
    if nsamples is None or seqlen is None:
        encoded = {lang: _tokenize(tokenizer, t, conventions) for lang, t in texts.items()}
        where = source if source in ("embedded", "mc4") else "the text at " + source
        nsamples, seqlen, sizing = choose_size(encoded, nsamples, seqlen, conventions, separator, bos, max_seqlen, f"the {where} text")
    shares = split_budget(nsamples, languages)
    key_payload = {
        "v": 1,
        "texts": {lang: t.content_hash for lang, t in texts.items() if shares[lang] > 0},
        "tokenizer": tok_hash,
        "shares": shares,
        "seqlen": seqlen,
        "seed": seed,
    } | ({"conventions": conventions} if conventions == STUDY else {})
    key = hashlib.sha256(json.dumps(key_payload, sort_keys=True).encode()).hexdigest()[:24]
    if use_cache and (cached := _load_cached(_cache_path(key))) is not None:
        cached.sizing = sizing
        return cached
    rows: list[list[int]] = []
    document_ids: list[list[str]] = []
    offsets: list[int] = []
    for lang, text_set in texts.items():
        if shares[lang] == 0:
            continue
        docs = encoded.get(lang) or _tokenize(tokenizer, text_set, conventions)
        doc_ids = [d.id for d in text_set.documents]
        try:
            if conventions == STUDY:
                windows, ids, starts = sample_study_windows(docs, doc_ids, shares[lang], seqlen, seed)
                offsets.extend(starts)
            else:
                windows, ids = sample_windows(docs, doc_ids, shares[lang], seqlen, _language_seed(seed, lang), separator, bos)
        except DataError as err:
            raise DataError(f"language '{lang}' ({text_set.location}): {err}") from None
        rows.extend(windows)
        document_ids.extend(ids)
    calib_set = CalibrationSet(
        input_ids=torch.tensor(rows, dtype=torch.long),
        languages=languages,
        source=source,
        seed=seed,
        seqlen=seqlen,
        samples_per_language=shares,
        document_ids=document_ids,
        tokenizer=f"{getattr(tokenizer, 'name_or_path', '')}#{tok_hash}",
        locations={lang: t.location for lang, t in texts.items()},
        bos=bos is not None and conventions != STUDY,
        content_hash=key,
        conventions=conventions,
        offsets=offsets,
    )
    if use_cache:
        _save_cached(_cache_path(key), calib_set)
    calib_set.sizing = sizing
    return calib_set
