"""SNR and pruning error of hidden states (study D.1), the dense cache, and model pairing errors."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from prunekit.errors import ModelError
from prunekit.evaluation import COUNTERS, DenseReference, EvaluationSpec, evaluate, pruning_error_and_snr
from prunekit.evaluation.hidden_states import summarize
from prunekit.models import load_model
from tests.conftest import TATOEBA, train_tokenizer


@pytest.fixture(scope="module")
def texts_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("eval-texts")
    for lang in ("en", "de"):
        lines = (TATOEBA / f"{lang}.txt").read_text(encoding="utf-8").splitlines()[:12]
        (root / f"{lang}.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return root


@pytest.fixture(scope="module")
def perturbed_llama(tiny_llama, tmp_path_factory) -> Path:
    """tiny_llama with only decoder layer 1 changed (its MLP down projection)."""
    model, tok, _ = load_model(str(tiny_llama))
    with torch.no_grad():
        weight = model.model.layers[1].mlp.down_proj.weight
        weight.mul_((torch.arange(weight.numel()).reshape(weight.shape) % 2).float())  # prune every other weight
    out = tmp_path_factory.mktemp("perturbed") / "llama-l1"
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def _reference(h: torch.Tensor, p: torch.Tensor) -> tuple[float, float]:
    """D.1 written out element by element in plain Python."""
    n, d = len(h), len(h[0])
    mu = sum(math.sqrt(sum(float(x) ** 2 for x in row)) for row in h) / n
    pe = sum(((float(h[i][j]) - float(p[i][j])) / mu) ** 2 for i in range(n) for j in range(d)) / (n * d)
    energy = sum((float(h[i][j]) / mu) ** 2 for i in range(n) for j in range(d)) / (n * d)
    return pe, 10 * math.log10(energy / pe)


def test_pe_and_snr_match_hand_computed_values():
    h = torch.tensor([[3.0, 4.0], [0.0, 2.0]])  # norms 5 and 2 -> mu = 3.5
    p = torch.tensor([[3.0, 3.0], [1.0, 2.0]])  # squared differences sum to 2
    got = pruning_error_and_snr(h, p)
    assert got["mu"] == pytest.approx(3.5)
    assert got["pruning_error"] == pytest.approx(2 / (2 * 2 * 3.5**2))  # 1/(Nd) Σ (Δ/μ)²
    assert got["energy"] == pytest.approx(29 / (2 * 2 * 3.5**2))
    assert got["snr_db"] == pytest.approx(10 * math.log10(29 / 2))
    torch.manual_seed(0)
    h, p = torch.randn(7, 5), torch.randn(7, 5)
    pe, snr = _reference(h, p)
    got = pruning_error_and_snr(h, p)
    assert got["pruning_error"] == pytest.approx(pe, rel=1e-12)
    assert got["snr_db"] == pytest.approx(snr, rel=1e-12)


def test_identical_states_give_zero_error_and_infinite_snr():
    h = torch.randn(4, 3)
    got = pruning_error_and_snr(h, h.clone())
    assert got["pruning_error"] == 0.0 and got["snr_db"] == math.inf
    summary = summarize([got, {"snr_db": 10.0, "pruning_error": 0.5}])
    assert summary["snr_db"] == math.inf and summary["pruning_error"] == 0.25
    assert summary["snr_db_finite_layers"] == 10.0 and summary["identical_layers"] == 1


def test_dense_model_against_itself_has_pe_zero_and_snr_inf(tiny_llama, texts_dir):
    res = evaluate(tiny_llama, EvaluationSpec(langs="en", ppl_source=str(texts_dir), seqlen=32, device="cpu", snr_tokens=96), dense=str(tiny_llama), progress=False)
    hidden = res["hidden_states"]["en"]
    assert hidden["pruning_error"] == 0.0 and hidden["snr_db"] == math.inf
    assert hidden["per_layer"]["pruning_error"] == [0.0, 0.0, 0.0]
    assert hidden["exclude_bos"] is True and hidden["tokens"] == 96 - 3  # 3 windows of 32, BOS not counted


def test_perturbing_layer_one_leaves_layer_zero_exact_and_the_dense_pass_is_cached(
    tiny_llama, perturbed_llama, texts_dir, monkeypatch
):
    kwargs = dict(dense=str(tiny_llama), progress=False,
                  spec=EvaluationSpec(langs="en,de", ppl_source=str(texts_dir), seqlen=32, device="cpu", snr_tokens=64))
    before = COUNTERS["dense_passes"]
    first = evaluate(perturbed_llama, **kwargs)
    assert COUNTERS["dense_passes"] == before + 1  # one dense pass for both languages
    for lang in ("en", "de"):
        layers = first["hidden_states"][lang]["per_layer"]
        assert layers["pruning_error"][0] == 0.0 and layers["snr_db"][0] == math.inf
        assert layers["pruning_error"][1] > 0 and math.isfinite(layers["snr_db"][1])
        assert layers["pruning_error"][2] > 0
        assert first["hidden_states"][lang]["dense_cache"]["status"] == "computed"

    # A second checkpoint against the same dense model: no dense forward, the dense weights are not even loaded.
    monkeypatch.setattr(DenseReference, "weights", lambda self: pytest.fail("the dense model was loaded again"))
    second = evaluate(tiny_llama, **kwargs)
    assert COUNTERS["dense_passes"] == before + 1
    assert {second["hidden_states"][lang]["dense_cache"]["status"] for lang in ("en", "de")} == {"hit"}
    assert second["hidden_states"]["en"]["pruning_error"] == 0.0
    again = evaluate(perturbed_llama, **kwargs)
    assert again["hidden_states"]["de"]["per_layer"] == first["hidden_states"]["de"]["per_layer"]


def test_including_bos_is_recorded_and_counts_the_bos_positions(tiny_llama, perturbed_llama, texts_dir):
    res = evaluate(perturbed_llama, EvaluationSpec(langs="de", ppl_source=str(texts_dir), seqlen=32, device="cpu", snr_tokens=64, include_bos=True), dense=str(tiny_llama), progress=False)
    hidden = res["hidden_states"]["de"]
    assert hidden["exclude_bos"] is False and hidden["tokens"] == 64
    assert res["settings"]["exclude_bos"] is False


def test_results_without_dense_have_empty_hidden_states(tiny_llama, texts_dir):
    res = evaluate(tiny_llama, EvaluationSpec(langs="en", ppl_source=str(texts_dir), seqlen=32, device="cpu"), progress=False)
    assert res["hidden_states"] == {} and res["dense"] is None


def test_different_architecture_or_tokenizer_is_a_clear_model_error(tiny_models, tmp_path, texts_dir):
    with pytest.raises(ModelError, match="different architectures"):
        evaluate(tiny_models["llama"], EvaluationSpec(langs="en", ppl_source=str(texts_dir), seqlen=32, device="cpu"), dense=str(tiny_models["qwen2"]), progress=False)
    # Same architecture and vocabulary size, different tokenizer content.
    model, tok, _ = load_model(str(tiny_models["llama"]))
    alt_tok = train_tokenizer(vocab_size=512)
    alt_tok.add_tokens(["zzzz-prunekit"])  # changes the tokenizer, not the model shape
    alt = tmp_path / "alt-tok"
    model.save_pretrained(alt)
    alt_tok.save_pretrained(alt)
    with pytest.raises(ModelError, match="different tokenizers"):
        evaluate(alt, EvaluationSpec(langs="en", ppl_source=str(texts_dir), seqlen=32, device="cpu"), dense=str(tiny_models["llama"]), progress=False)


def test_cli_refuses_a_dense_model_of_another_architecture(tiny_models, texts_dir):
    from prunekit.cli.main import app

    result = CliRunner().invoke(app, ["eval", str(tiny_models["llama"]), "--dense", str(tiny_models["gemma3"]),
                                      "--langs", "en", "--ppl-source", str(texts_dir), "--device", "cpu", "-q"])
    assert result.exit_code == 2
    assert "different architectures" in result.output and "Traceback" not in result.output


def test_pruned_checkpoint_carries_its_record_and_errs_in_every_layer(tiny_llama, texts_dir, tmp_path):
    from prunekit.pipeline import prune
    from prunekit.recipe import CalibrationSpec, EngineSpec, OutputSpec

    out = tmp_path / "wanda-de"
    prune(str(tiny_llama), "wanda", sparsity=0.5, calibration=CalibrationSpec("de", str(texts_dir), nsamples=2, seqlen=32),
          output=OutputSpec(out), engine=EngineSpec("cpu"), progress=False)
    res = evaluate(out, EvaluationSpec(langs="de", ppl_source=str(texts_dir), seqlen=32, device="cpu", snr_tokens=64), dense=str(tiny_llama), progress=False)
    assert res["model"]["record"]["kind"] == "prunekit-checkpoint"
    assert res["model"]["record"]["recipe"]["method"] == "wanda" and res["model"]["kind"] == "local"
    layers = res["hidden_states"]["de"]["per_layer"]
    assert all(pe > 0 for pe in layers["pruning_error"]) and all(math.isfinite(s) for s in layers["snr_db"])
    assert res["hidden_states"]["de"]["snr_db"] == pytest.approx(sum(layers["snr_db"]) / 3)


def test_one_scoring_pass_gives_exactly_the_numbers_of_separate_perplexity_and_hidden_state_passes(
    tiny_llama, perturbed_llama, texts_dir, tmp_path, monkeypatch
):
    """evaluate's one pass (perplexity and SNR / PE together, ``passes.measure``) against the separate
    per-language reference passes: ``perplexity``, ``collect_states`` and ``hidden_state_errors``."""
    from safetensors.torch import load_file

    from prunekit.evaluation import hidden_state_errors, make_windows, perplexity
    from prunekit.evaluation.hidden_states import collect_states
    from prunekit.textsources import load_texts

    monkeypatch.setenv("PRUNEKIT_CACHE", str(tmp_path / "cache"))
    cpu = torch.device("cpu")
    dense_model, tok, source = load_model(str(tiny_llama))
    dense = DenseReference.from_loaded(dense_model, tok, source)
    documents = [d.text for d in load_texts(str(texts_dir), "en", "evaluation").documents]
    windows = make_windows(tok, documents, 32, 3)
    assert len(windows.windows) == 3
    everything = sum(len(w) for w in windows.windows)
    spec = EvaluationSpec(langs="en", ppl_source=str(texts_dir), seqlen=32, max_windows=3, snr_tokens=everything,
                          batch_size=2, device="cpu")

    # The dense model evaluating itself collects its states while it scores: the cache holds exactly
    # what a separate dense pass computes, and its perplexity is the plain one.
    before = COUNTERS["dense_passes"]
    res = evaluate(tiny_llama, spec, dense=str(tiny_llama), progress=False)
    own, ppl = res["hidden_states"]["en"], res["perplexity"]["en"]
    assert COUNTERS["dense_passes"] == before + 1
    assert own["dense_cache"]["status"] == "computed" and own["pruning_error"] == 0.0 and own["snr_db"] == math.inf
    reference = perplexity(dense_model, windows, 2, progress=False, device=cpu)
    assert ppl["ppl"] == pytest.approx(reference.ppl, rel=1e-6) and ppl["tokens"] == reference.tokens
    cached = load_file(own["dense_cache"]["file"])
    separate_states = collect_states(dense_model, windows, 2, True, torch.float32, progress=False)
    assert all(torch.allclose(cached[f"layer.{i}"], s, rtol=1e-5, atol=1e-6) for i, s in enumerate(separate_states))
    separate_own = hidden_state_errors(dense_model, dense, windows, device=cpu, batch_size=2, progress=False)
    assert own["per_layer"]["mu"] == pytest.approx(separate_own["per_layer"]["mu"], rel=1e-5)

    # A pruned model: one pass against the cache gives the perplexity and D.1 numbers of separate passes.
    pruned, _, _ = load_model(str(perturbed_llama))
    merged = evaluate(perturbed_llama, spec, dense=str(tiny_llama), progress=False)
    separate = hidden_state_errors(pruned, dense, windows, device=cpu, batch_size=2, progress=False, lang="en")
    assert merged["perplexity"]["en"]["ppl"] == pytest.approx(perplexity(pruned, windows, 2, progress=False).ppl, rel=1e-6)
    mine = merged["hidden_states"]["en"]
    assert mine["dense_cache"]["status"] == "hit" and mine["tokens"] == separate["tokens"]
    for key in ("pruning_error", "snr_db", "mu"):
        assert mine["per_layer"][key] == pytest.approx(separate["per_layer"][key], rel=1e-5)
    assert mine["per_layer"]["pruning_error"][0] == 0.0 and mine["per_layer"]["pruning_error"][1] > 0

    # Fewer SNR positions than the windows hold: SNR on the prefix only, the perplexity unchanged.
    short = evaluate(perturbed_llama, EvaluationSpec(**(spec.to_settings() | {"snr_tokens": 40})), dense=str(tiny_llama),
                     progress=False)
    assert short["perplexity"]["en"]["ppl"] == merged["perplexity"]["en"]["ppl"]
    assert short["hidden_states"]["en"]["tokens"] == 40 - 2 and short["hidden_states"]["en"]["windows"] == 2  # 32 + 8, BOS excluded


def test_dense_cache_is_keyed_by_the_gpu_model_not_only_cuda(tiny_llama, texts_dir, monkeypatch):
    """Issue 20 item 5: states computed on one GPU model are not served to another."""
    from prunekit.evaluation import make_windows
    from prunekit.evaluation.hidden_states import cache_entry

    dense = DenseReference.from_spec(str(tiny_llama))
    windows = make_windows(dense.tokenizer, [(texts_dir / "en.txt").read_text(encoding="utf-8")], 32, 2)
    names = iter(["NVIDIA H100 80GB HBM3", "NVIDIA A100-SXM4-80GB"])
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: next(names))
    options = dict(dtype=torch.bfloat16, batch_size=4, exclude_bos=True)
    h100 = cache_entry(dense, windows, device=torch.device("cuda:0"), **options)
    a100 = cache_entry(dense, windows, device=torch.device("cuda:0"), **options)
    cpu = cache_entry(dense, windows, device=torch.device("cpu"), **options)
    assert len({h100.path, a100.path, cpu.path}) == 3
    assert h100.settings["device"] == "cuda:NVIDIA H100 80GB HBM3"


def test_a_dense_cache_miss_never_has_both_models_on_the_device(tiny_llama, perturbed_llama, texts_dir, tmp_path,
                                                                 monkeypatch):
    """Issue 20 item 5: the evaluated model is not moved to the device before (or while) the dense
    states are computed, and the dense model visits the device one layer at a time."""
    from prunekit.evaluation import evaluate_loaded
    from prunekit.evaluation import forward

    monkeypatch.setenv("PRUNEKIT_CACHE", str(tmp_path / "cache"))
    model, tok, source = load_model(str(perturbed_llama))
    moved = []
    monkeypatch.setattr(model, "to", lambda *a, **k: moved.append((a, k)) or model)
    dense = DenseReference.from_spec(str(tiny_llama))
    loads = []
    original = forward.ShardWeights.load_layer

    def load_layer(self, index, device):
        real = [i for i, layer in enumerate(self.layers) if any(p.device.type != "meta" for p in layer.parameters())]
        loads.append(real)
        return original(self, index, device)

    monkeypatch.setattr(forward.ShardWeights, "load_layer", load_layer)
    res = evaluate_loaded(model, tok, EvaluationSpec(langs="en", ppl_source=str(texts_dir), seqlen=32, device="cpu", snr_tokens=64), source=source, dense=dense, progress=False)
    assert res["hidden_states"]["en"]["dense_cache"]["status"] == "computed"
    assert moved == []  # the whole model was never moved
    assert loads and all(real == [] for real in loads)  # no other dense layer was on the device
