"""The evaluation on the real embedded Gemma-3-270M: local XCOPA and embedded-text perplexity / SNR."""

from __future__ import annotations

import math

import pytest

from prunekit.evaluation import DenseReference, EvaluationSpec, evaluate_loaded
from prunekit.models import load_model
from tests.conftest import TEST_DATA

pytestmark = pytest.mark.gemma


def test_gemma_local_xcopa_and_perplexity_against_itself(embedded_gemma):
    # One loaded model serves as checkpoint and as dense reference (the sweep's way of reusing models).
    model, tokenizer, source = load_model(str(embedded_gemma))
    dense = DenseReference.from_loaded(model, tokenizer, source)
    res = evaluate_loaded(model, tokenizer, EvaluationSpec(langs="sw", ppl_source="embedded", seqlen=128, max_windows=2, snr_tokens=128, tasks="xcopa_local_sw", task_data=TEST_DATA, limit=20, device="cpu", bootstrap_iters=1, batch_size=8), source=source, dense=dense, progress=False)
    xcopa = res["tasks"]["xcopa_local_sw"]
    assert xcopa["status"] == "ok" and xcopa["samples"] == 20
    assert 0.0 <= xcopa["metrics"]["acc"] <= 1.0
    assert 0.0 < xcopa["stderr"]["acc"] < 0.5
    assert res["settings"]["chat_template"] is False  # the base model has no chat template

    ppl = res["perplexity"]["sw"]
    assert ppl["windows"] == 2 and ppl["tokens"] == 2 * 127 and ppl["source"] == "embedded"
    assert 1.0 < ppl["ppl"] < 1e4 and math.isfinite(ppl["nll"])
    hidden = res["hidden_states"]["sw"]
    assert hidden["pruning_error"] == 0.0 and hidden["snr_db"] == math.inf
    assert len(hidden["per_layer"]["snr_db"]) == 18 and hidden["tokens"] == 127
