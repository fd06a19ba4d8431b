"""Perplexity: windowing, and agreement with a direct transformers forward per window."""

from __future__ import annotations

import importlib
import math

import pytest
import torch
from tests.conftest import TATOEBA, build_tiny_model

from prunekit.evaluation.perplexity import make_windows, perplexity
from prunekit.models import load_model

forward_module = importlib.import_module("prunekit.evaluation.forward")


def _texts(lang: str, n: int = 40) -> list[str]:
    return (TATOEBA / f"{lang}.txt").read_text(encoding="utf-8").splitlines()[:n]


def reference_ppl(model, windows: list[list[int]]) -> tuple[float, int]:
    """Straight from transformers: mean loss of model(ids, labels=ids) per window, weighted by its tokens."""
    total, count = 0.0, 0
    with torch.no_grad():
        for window in windows:
            ids = torch.tensor([window])
            loss = model(input_ids=ids, labels=ids).loss.item()
            total += loss * (len(window) - 1)
            count += len(window) - 1
    return math.exp(total / count), count


def test_windows_prefix_bos_and_score_every_content_token_once(tokenizer):
    texts = _texts("de", 30)
    windows = make_windows(tokenizer, texts, seqlen=32)
    stream = tokenizer("\n\n".join(texts), add_special_tokens=False)["input_ids"]
    assert all(w[0] == tokenizer.bos_token_id for w in windows.windows)
    assert all(len(w) == 32 for w in windows.windows[:-1])
    assert 2 <= len(windows.windows[-1]) <= 32
    assert [t for w in windows.windows for t in w[1:]] == stream  # non-overlapping, nothing dropped
    assert windows.scored_tokens == len(stream)


def test_windows_without_bos_use_full_seqlen_and_max_windows(tokenizer):
    class NoBos:
        bos_token_id = None

        def __call__(self, text, **kwargs):
            return tokenizer(text, **kwargs)

    texts = _texts("en", 30)
    windows = make_windows(NoBos(), texts, seqlen=16, max_windows=3)
    assert len(windows.windows) == 3 and all(len(w) == 16 for w in windows.windows)
    assert windows.scored_tokens == 3 * 15


@pytest.mark.parametrize("arch", ["llama", "cohere", "gemma3"])
def test_perplexity_equals_direct_transformers_forward(tiny_models, tokenizer, arch):
    model, tok, _ = load_model(str(tiny_models[arch]))
    windows = make_windows(tok, _texts("es", 16), seqlen=40)
    assert len(windows.windows) >= 3 and len(windows.windows[-1]) < 40  # full and partial windows batched
    result = perplexity(model, windows, batch_size=2, progress=False)
    expected, count = reference_ppl(model, windows.windows)
    assert result.tokens == count
    assert result.windows == len(windows.windows)
    assert result.ppl == pytest.approx(expected, rel=1e-4)
    assert result.nll == pytest.approx(math.log(expected), rel=1e-4)


def test_chunked_head_with_softcapping_and_tiny_chunks_matches_reference(tmp_path, tokenizer, monkeypatch):
    path = build_tiny_model("gemma3", tokenizer, tmp_path / "capped", final_logit_softcapping=2.0)
    model, tok, _ = load_model(str(path))
    monkeypatch.setattr(forward_module, "LOGIT_CHUNK_ELEMENTS", 7 * len(tok))  # 7 tokens per head chunk
    windows = make_windows(tok, _texts("ru", 12), seqlen=40)
    result = perplexity(model, windows, batch_size=3, progress=False)
    assert result.ppl == pytest.approx(reference_ppl(model, windows.windows)[0], rel=1e-4)


def test_unknown_logit_transform_falls_back_to_the_models_own_forward(tiny_models, monkeypatch):
    model, tok, _ = load_model(str(tiny_models["cohere"]))
    monkeypatch.setattr(forward_module, "logit_transform", lambda m: (lambda logits: logits))  # forget logit_scale
    windows = make_windows(tok, _texts("zh", 12), seqlen=32)
    probed = []
    original = forward_module.Head.probe

    def probe(self, *args):
        original(self, *args)
        probed.append(self.chunked)

    monkeypatch.setattr(forward_module.Head, "probe", probe)
    result = perplexity(model, windows, batch_size=2, progress=False)
    assert probed == [False]
    assert result.ppl == pytest.approx(reference_ppl(model, windows.windows)[0], rel=1e-4)
