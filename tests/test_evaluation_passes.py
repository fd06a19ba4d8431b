"""One pass for all languages (issue 25 §2), results written as they finish (§7), packed checkpoints streamed (§4)."""

from __future__ import annotations

import json
import logging
from collections import Counter
from pathlib import Path

import pytest
import torch

from prunekit.evaluation import COUNTERS, DenseReference, EvaluationSpec, evaluate, forward
from prunekit.models import load_model
from tests.conftest import TATOEBA

LANGS = ("en", "de", "sw")


@pytest.fixture(scope="module")
def texts(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("pass-texts")
    for lang in (*LANGS, "es", "zh"):
        lines = (TATOEBA / f"{lang}.txt").read_text(encoding="utf-8").splitlines()[:10]
        (root / f"{lang}.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return root


@pytest.fixture(scope="module")
def pruned(tiny_llama, tmp_path_factory) -> Path:
    """tiny_llama with every other weight of each layer's MLP down projection zeroed (written as shards)."""
    model, tok, _ = load_model(str(tiny_llama))
    with torch.no_grad():
        for layer in model.model.layers:
            weight = layer.mlp.down_proj.weight
            weight.mul_((torch.arange(weight.numel()).reshape(weight.shape) % 2).to(weight.dtype))
    out = tmp_path_factory.mktemp("pruned") / "llama-half"
    model.save_pretrained(out, max_shard_size="200KB")  # several shards
    tok.save_pretrained(out)
    return out


def _count_layer_reads(monkeypatch) -> Counter:
    reads: Counter = Counter()
    original = forward.ShardWeights.load_layer

    def load_layer(self, index, device):
        reads[(Path(self.path).name, index)] += 1
        return original(self, index, device)

    monkeypatch.setattr(forward.ShardWeights, "load_layer", load_layer)
    return reads


def test_three_languages_read_each_layer_of_each_model_once(tiny_llama, pruned, texts, monkeypatch, tmp_path):
    assert len(list(pruned.glob("*.safetensors"))) > 1
    spec = EvaluationSpec(langs=",".join(LANGS), ppl_source=str(texts), seqlen=32, snr_tokens=80, device="cpu")
    reads = _count_layer_reads(monkeypatch)
    before = COUNTERS["dense_passes"]
    res = evaluate(pruned, spec, dense=str(tiny_llama), progress=False)
    n_layers = 3
    assert COUNTERS["dense_passes"] == before + 1
    assert {lang: res["hidden_states"][lang]["dense_cache"]["status"] for lang in LANGS} == dict.fromkeys(LANGS, "computed")
    assert reads == Counter({(name, i): 1 for name in (pruned.name, tiny_llama.name) for i in range(n_layers)})

    # The dense states are cached now: the dense model is not read at all, the checkpoint once.
    reads.clear()
    again = evaluate(pruned, spec, dense=str(tiny_llama), progress=False)
    assert reads == Counter({(pruned.name, i): 1 for i in range(n_layers)})
    assert again["hidden_states"]["sw"]["per_layer"] == res["hidden_states"]["sw"]["per_layer"]

    # The dense model evaluated against itself collects its states in its own pass: read once.
    reads.clear()
    own = evaluate(tiny_llama, spec.for_languages(["es"]), dense=str(tiny_llama), progress=False)
    assert reads == Counter({(tiny_llama.name, i): 1 for i in range(n_layers)})
    assert own["hidden_states"]["es"]["dense_cache"]["status"] == "computed" and own["hidden_states"]["es"]["pruning_error"] == 0.0


def test_one_pass_gives_the_numbers_of_separate_passes_per_language(tiny_llama, pruned, texts):
    """Reference: the per-language functions (one perplexity pass and one hidden-state pass per language)."""
    from prunekit.evaluation import hidden_state_errors, make_windows, perplexity

    everything = 10_000  # SNR on every position, so the per-language reference scores the same windows
    spec = EvaluationSpec(langs=",".join(LANGS), ppl_source=str(texts), seqlen=32, snr_tokens=everything,
                          batch_size=2, device="cpu")
    res = evaluate(pruned, spec, dense=str(tiny_llama), progress=False)
    model, tok, _ = load_model(str(pruned))
    dense = DenseReference.from_spec(str(tiny_llama))
    for lang in LANGS:
        text = (texts / f"{lang}.txt").read_text(encoding="utf-8").splitlines()
        windows = make_windows(tok, text, 32)
        ppl = perplexity(model, windows, 2, progress=False, device="cpu")
        assert res["perplexity"][lang]["ppl"] == pytest.approx(ppl.ppl, rel=1e-6)
        assert res["perplexity"][lang]["tokens"] == ppl.tokens and res["perplexity"][lang]["windows"] == ppl.windows
        separate = hidden_state_errors(model, dense, windows, device=torch.device("cpu"), batch_size=2, progress=False)
        mine = res["hidden_states"][lang]
        assert mine["tokens"] == separate["tokens"] and mine["windows"] == separate["windows"]
        for key in ("pruning_error", "snr_db", "mu"):
            assert mine["per_layer"][key] == pytest.approx(separate["per_layer"][key], rel=1e-5)
    # Each language alone gives exactly the numbers it gets among three.
    alone = evaluate(pruned, spec.for_languages(["de"]), dense=str(tiny_llama), progress=False)
    assert alone["perplexity"]["de"]["ppl"] == res["perplexity"]["de"]["ppl"]
    assert alone["hidden_states"]["de"]["per_layer"] == res["hidden_states"]["de"]["per_layer"]


def test_perplexity_is_saved_before_the_tasks_each_task_as_it_ends_and_a_rerun_skips_them(
        tiny_llama, texts, tmp_path, monkeypatch, caplog):
    """§7: an error in the second task keeps the perplexity and the first task in results.json; run again,
    neither is computed again, and it says so."""
    import lm_eval

    from prunekit.evaluation import harness, suite
    from tests.conftest import TEST_DATA

    ran: list[str] = []
    fail = [True]

    def simple_evaluate(model, tasks, **kwargs):
        name = tasks[0].config.task
        if name == "xcopa_local_zh" and fail[0]:
            fail[0] = False
            raise MemoryError("out of memory in the second task")
        ran.append(name)
        return {"results": {name: {"alias": name, "acc,none": 0.5, "acc_stderr,none": 0.25}},
                "n-samples": {name: {"original": 4, "effective": 4}}, "versions": {name: 1.0}, "lm_eval_version": "t"}

    monkeypatch.setattr(lm_eval, "simple_evaluate", simple_evaluate)
    monkeypatch.setattr(harness, "make_lm", lambda plan, model, tokenizer: "lm")
    out = tmp_path / "results.json"
    spec = EvaluationSpec(langs="sw,zh", ppl_source=str(texts), seqlen=32, tasks="xcopa", task_data=TEST_DATA, limit=4,
                          device="cpu")
    with pytest.raises(MemoryError):
        evaluate(tiny_llama, spec, out=out, progress=False)
    saved = json.loads(out.read_text())
    assert saved["perplexity"]["sw"]["ppl"] > 1 and saved["perplexity"]["zh"]["ppl"] > 1
    assert list(saved["tasks"]) == ["xcopa_local_sw"] and saved["tasks"]["xcopa_local_sw"]["status"] == "ok"

    measured, real = [], suite.measure
    monkeypatch.setattr(suite, "measure", lambda *a, **k: measured.append(1) or real(*a, **k))
    with caplog.at_level(logging.WARNING, logger="prunekit.evaluation"):
        res = evaluate(tiny_llama, spec, out=out, progress=False)
    assert measured == [] and "perplexity of sw,zh already in" in caplog.text
    assert "task xcopa_local_sw already done" in caplog.text and ran == ["xcopa_local_sw", "xcopa_local_zh"]
    assert res["perplexity"] == saved["perplexity"]
    final = json.loads(out.read_text())
    assert {name: cell["status"] for name, cell in final["tasks"].items()} == {"xcopa_local_sw": "ok", "xcopa_local_zh": "ok"}

    # Another setting that changes the numbers (here the window length) measures again.
    evaluate(tiny_llama, EvaluationSpec(**(spec.to_settings() | {"seqlen": 24})), out=out, progress=False)
    assert measured == [1]


def test_a_packed_checkpoint_is_evaluated_streamed_in_its_own_dtype(tiny_llama, texts, tmp_path, monkeypatch):
    """§4: each packed Linear is unpacked as its layer is read (never a whole-model load, never a silent
    float32); the numbers are those of the model transformers loads whole (the reference)."""
    from prunekit.evaluation import perplexity, make_windows
    from prunekit.models import load_model as load_whole
    from prunekit.pipeline import prune
    from prunekit.recipe import OutputSpec, Quantization

    out = tmp_path / "w4"
    prune(str(tiny_llama), "rtn", quantization=Quantization(4, 32), output=OutputSpec(out, "bfloat16"), progress=False)
    assert "quantization_config" in json.loads((out / "config.json").read_text())
    monkeypatch.setattr("prunekit.evaluation.forward.load_model", lambda *a, **k: pytest.fail("loaded whole"), raising=False)
    monkeypatch.setattr("prunekit.models.load_model", lambda *a, **k: pytest.fail("loaded whole"))
    reads = _count_layer_reads(monkeypatch)
    res = evaluate(out, EvaluationSpec(langs="de", ppl_source=str(texts), seqlen=32, device="cpu"), progress=False)
    assert res["settings"]["dtype"] == "bfloat16"
    assert reads == Counter({(out.name, i): 1 for i in range(3)})
    monkeypatch.undo()
    model, tok, _ = load_whole(str(out), "bfloat16")
    assert model.model.layers[0].mlp.up_proj.weight.dtype == torch.bfloat16
    text = (texts / "de.txt").read_text(encoding="utf-8").splitlines()
    reference = perplexity(model, make_windows(tok, text, 32), 4, progress=False, device="cpu")
    assert res["perplexity"]["de"]["ppl"] == pytest.approx(reference.ppl, rel=1e-3)
