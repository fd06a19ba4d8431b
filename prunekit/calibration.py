"""Calibration sets: n seeded windows of seqlen tokens in one language or an equal-share mix."""

from __future__ import annotations

import bisect
import hashlib
import json
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from prunekit.errors import ConfigError, DataError
from prunekit.io import cache_dir
from prunekit.languages import parse_languages
from prunekit.models import tokenizer_fingerprint
from prunekit.textsources import load_texts

CHARS_PER_TOKEN_BUDGET = 8  # how much text to stream from mC4 per token needed (generous for every script)


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


def build_calibration_set(
    tokenizer,
    calib: str,
    source: str = "embedded",
    nsamples: int = 128,
    seqlen: int = 2048,
    seed: int = 0,
    use_cache: bool = True,
) -> CalibrationSet:
    """Sample a calibration set for ``calib`` (``en``, ``en+de`` or ``all``) from ``source``."""
    if nsamples < 1:
        raise ConfigError(f"--nsamples must be at least 1, got {nsamples}")
    if seqlen < 2:
        raise ConfigError(f"--seqlen must be at least 2, got {seqlen}")
    languages = [lang.code for lang in parse_languages(calib)]
    shares = split_budget(nsamples, languages)
    texts = {
        lang: load_texts(source, lang, "calibration", char_budget=shares[lang] * seqlen * CHARS_PER_TOKEN_BUDGET)
        for lang in languages
        if shares[lang] > 0
    }
    tok_hash = tokenizer_fingerprint(tokenizer)
    bos = tokenizer.bos_token_id
    separator = tokenizer.eos_token_id
    key_payload = {
        "v": 1,
        "texts": {lang: t.content_hash for lang, t in texts.items()},
        "tokenizer": tok_hash,
        "shares": shares,
        "seqlen": seqlen,
        "seed": seed,
    }
    key = hashlib.sha256(json.dumps(key_payload, sort_keys=True).encode()).hexdigest()[:24]
    if use_cache and (cached := _load_cached(_cache_path(key))) is not None:
        return cached
    rows: list[list[int]] = []
    document_ids: list[list[str]] = []
    for lang, text_set in texts.items():
        encoded = tokenizer([d.text for d in text_set.documents], add_special_tokens=False)["input_ids"]
        try:
            windows, ids = sample_windows(
                encoded, [d.id for d in text_set.documents], shares[lang], seqlen, _language_seed(seed, lang), separator, bos
            )
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
        bos=bos is not None,
        content_hash=key,
    )
    if use_cache:
        _save_cached(_cache_path(key), calib_set)
    return calib_set
