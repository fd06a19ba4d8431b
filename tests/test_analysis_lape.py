"""LAPE (Tang et al. 2024; study App. D.4; analysis-spec §4): scores, bins, Tang's selection, the
activation-counting hooks and the neuron-deactivation pass."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch

from prunekit.analysis import lape as L
from prunekit.analysis.activations import PassSettings, prepare_texts, run_pass
from prunekit.models import find_decoder_layers, load_model
from tests.conftest import TATOEBA

QUIET = PassSettings(progress=False)

# ---------------------------------------------------------------------------------- the score


def test_neuron_active_for_one_language_only_has_lape_zero_and_uniform_has_ln_k():
    langs = ["de", "en", "sw", "zh"]
    tokens = [100, 200, 50, 400]
    counts = np.zeros((4, 1, 4), dtype=np.int64)  # [K, layers, F]
    counts[1, 0, 0] = 37  # neuron 0: English only
    for k, n in enumerate(tokens):
        counts[k, 0, 1] = n // 2  # neuron 1: active on half of the tokens of every language
    # neuron 2: never active; neuron 3: twice as likely in de as in each other language
    counts[:, 0, 3] = [40, 40, 5, 40]
    stats = L.LapeStats.from_counts(langs, counts, np.zeros(counts.shape), tokens)
    assert stats.scores[0, 0] == 0.0
    assert stats.scores[0, 1] == pytest.approx(math.log(4), rel=1e-15)
    assert stats.scores[0, 2] == 0.0
    p = np.array([40 / 100, 40 / 200, 5 / 50, 40 / 400])
    q = p / p.sum()
    assert stats.scores[0, 3] == pytest.approx(-(q * np.log(q)).sum(), rel=1e-14)
    assert stats.probs.shape == (1, 4, 4)
    assert stats.probs[0, 1].tolist() == [0.5] * 4
    assert L.summary(stats)["never_active"] == 1


def test_lape_is_float64_and_zero_for_probabilities_that_are_all_zero():
    probs = np.array([[0.0, 0.0], [0.25, 0.25]], dtype=np.float32)
    scores = L.lape(probs)
    assert scores.dtype == np.float64
    assert scores.tolist() == [0.0, pytest.approx(math.log(2))]


def test_kth_value_matches_torch_kthvalue_and_works_beyond_the_torch_quantile_limit():
    values = torch.rand(10_001, generator=torch.Generator().manual_seed(0))
    for fraction in (0.01, 0.5, 0.95):
        k = round(len(values) * fraction)
        assert L.kth_value(values.numpy(), fraction) == values.kthvalue(k).values.item()
    big = np.random.default_rng(0).random(2**24 + 3, dtype=np.float32)  # torch.quantile refuses this size
    assert L.kth_value(big, 0.95) == pytest.approx(0.95, abs=1e-3)


# ---------------------------------------------------------------------------------- Tang's selection


def tang_reference(over_zero: torch.Tensor, n: torch.Tensor, top_rate, filter_rate, bar_ratio):
    """Tang et al.'s identify.py selection, restated in torch (over_zero: layers × F × K counts)."""
    activation_probs = over_zero / n
    normed = activation_probs / activation_probs.sum(dim=-1, keepdim=True)
    normed[torch.isnan(normed)] = 0
    log_probs = torch.where(normed > 0, normed.log(), 0)
    entropy = -torch.sum(normed * log_probs, dim=-1)
    flat_probs = activation_probs.flatten()
    top_prob_value = flat_probs.kthvalue(round(len(flat_probs) * filter_rate)).values.item()
    top_position = (activation_probs > top_prob_value).sum(dim=-1)
    entropy[top_position == 0] = torch.inf
    flat_entropy = entropy.flatten()
    _, index = flat_entropy.topk(round(len(flat_entropy) * top_rate), largest=False)
    rows, cols = index // entropy.size(1), index % entropy.size(1)
    selected = activation_probs[rows, cols].transpose(0, 1)
    bar = flat_probs.kthvalue(round(len(flat_probs) * bar_ratio)).values.item()
    lang, which = torch.where(selected > bar)
    out = {}
    for k in range(over_zero.shape[-1]):
        pick = which[lang == k]
        out[k] = sorted(zip(rows[pick].tolist(), cols[pick].tolist()))
    return out


def random_stats(seed=0, layers=4, width=300, langs=("de", "en", "sw", "zh", "ru")):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(500, 1000, size=len(langs))
    rate = rng.beta(0.5, 2.0, size=(len(langs), layers, width)) * rng.random((1, layers, width))
    counts = rng.binomial(tokens[:, None, None], rate)
    return L.LapeStats.from_counts(list(langs), counts, np.zeros(counts.shape), tokens), counts, tokens


def test_tang_thresholds_select_the_same_neurons_as_tang_et_al():
    stats, counts, tokens = random_stats()
    ours = L.select_language_neurons(stats, L.normalize_thresholds("tang"))
    over_zero = torch.from_numpy(np.moveaxis(counts, 0, -1)).double()
    ref = tang_reference(over_zero, torch.from_numpy(tokens).double(), 0.01, 0.95, 0.95)
    assert sum(map(len, ours.values())) > 0
    for k, lang in enumerate(stats.langs):
        assert ours[lang] == ref[k]


def test_relaxed_default_takes_the_lowest_lape_neurons_by_their_top_language():
    stats, _, _ = random_stats(seed=1)
    assert L.normalize_thresholds(None) == {"top_rate": 0.01, "filter_rate": None, "activation_bar_ratio": None}
    chosen = L.select_language_neurons(stats, L.normalize_thresholds(None))
    flat = np.where(stats.probs.sum(axis=-1) > 0, stats.scores, np.inf).reshape(-1)  # dead neurons never count
    count = round(flat.size * 0.01)
    lowest = set(np.argsort(flat)[:count].tolist())
    width = stats.scores.shape[1]
    picked = {layer * width + neuron for pairs in chosen.values() for layer, neuron in pairs}
    assert picked == lowest
    for k, lang in enumerate(stats.langs):
        for layer, neuron in chosen[lang]:
            assert stats.probs[layer, neuron].argmax() == k


def test_never_active_neurons_are_not_selected_as_language_specific():
    stats, counts, tokens = random_stats(seed=4)
    counts[:, 0, :50] = 0  # 50 dead neurons in layer 0: LAPE 0, the lowest scores of all
    stats = L.LapeStats.from_counts(stats.langs, counts, np.zeros(counts.shape), tokens)
    assert (stats.scores[0, :50] == 0).all() and L.summary(stats)["never_active"] >= 50
    for thresholds in (None, "tang"):
        chosen = L.select_language_neurons(stats, L.normalize_thresholds(thresholds))
        assert not any(layer == 0 and neuron < 50 for pairs in chosen.values() for layer, neuron in pairs)
    assert sum(len(v) for v in L.select_language_neurons(stats, L.normalize_thresholds(None)).values()) == 12


def test_bad_thresholds_are_rejected():
    from prunekit.errors import ConfigError

    with pytest.raises(ConfigError, match="unknown LAPE thresholds"):
        L.normalize_thresholds("strict")
    with pytest.raises(ConfigError, match="filter_rate must be in"):
        L.normalize_thresholds({"filter_rate": 1.5})


# ---------------------------------------------------------------------------------- bins (study Fig. 3)


def test_bins_follow_the_reference_order_in_two_percent_groups():
    ref, _, _ = random_stats(seed=2, layers=2, width=500)
    other, _, _ = random_stats(seed=3, layers=2, width=500)
    bins = L.binned(ref, {"b": other})
    assert bins["bins"] == 50
    rows = bins["global"]["reference"]
    assert len(rows) == 50
    medians = [r["lape"]["median"] for r in rows]
    assert medians == sorted(medians)  # the reference is sorted by its own score
    order = np.argsort(ref.scores.reshape(-1), kind="stable")
    first = order[:20]  # 1000 neurons, 2 % = 20 per bin
    assert bins["global"]["b"][0]["lape"]["mean"] == pytest.approx(other.scores.reshape(-1)[first].mean())
    assert bins["global"]["b"][0]["activation_probability"]["de"] == pytest.approx(
        other.probs.reshape(-1, 5)[first, 0].mean())
    assert len(bins["per_layer"]) == 2 and len(bins["per_layer"][0]["b"]) == 50


def test_box_stats_use_tukey_whiskers():
    values = np.array([1, 2, 3, 4, 5, 6, 7, 8, 100.0])
    box = L.box_stats(values)
    assert box["median"] == 5 and box["q1"] == 3 and box["q3"] == 7
    assert box["whisker_high"] == 8 and box["max"] == 100


# ---------------------------------------------------------------------------------- hooks on real models


@pytest.fixture(scope="module")
def texts(tokenizer):
    return prepare_texts(tokenizer, ["de", "sw"], str(TATOEBA), max_tokens=120)


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_activation_counts_and_outputs_match_hooks_on_act_fn(arch, tiny_models, texts):
    model, _, _ = load_model(str(tiny_models[arch]))
    _, layers = find_decoder_layers(model)
    assert len({id(layer.mlp.act_fn) for layer in layers}) == len(layers)  # one act_fn module per layer
    counts = np.zeros((2, len(layers), layers[0].mlp.gate_proj.out_features), dtype=np.int64)
    outputs = np.zeros(counts.shape)
    current = {}
    handles = []
    for i, layer in enumerate(layers):
        def act_hook(module, args, out, i=i):
            if not current.get("inside"):
                counts[current["k"], i] += (out[0] > 0).sum(dim=0).numpy()

        def mlp_hook(module, args, i=i):
            x = args[0][0]
            current["inside"] = True  # our own act_fn call below must not count
            neuron = module.act_fn(module.gate_proj(x)) * module.up_proj(x)
            current["inside"] = False
            outputs[current["k"], i] += neuron.abs().double().sum(dim=0).numpy()

        handles.append(layer.mlp.act_fn.register_forward_hook(act_hook))
        handles.append(layer.mlp.register_forward_pre_hook(mlp_hook))
    with torch.no_grad():
        for k, lang in enumerate(texts.langs):
            current["k"] = k
            for s in texts.samples[lang]:
                assert bool(s.valid.all())  # this tokenizer adds no special tokens
                model(input_ids=s.input_ids[None])
    for h in handles:
        h.remove()
    result = run_pass(model, texts, label="test", lape=True, settings=QUIET)
    assert np.array_equal(result.active_counts, counts)
    assert np.allclose(result.abs_output_sum, outputs, rtol=1e-5)
    assert result.valid_tokens == {"de": 120, "sw": 120}


def test_batched_right_padded_passes_equal_one_sample_at_a_time(tiny_llama, texts):
    model, _, _ = load_model(str(tiny_llama))
    one = run_pass(model, texts, label="test", lape=True, nll=True, embeddings=True, settings=QUIET)
    many = run_pass(model, texts, label="test", lape=True, nll=True, embeddings=True, settings=PassSettings(batch_size=4, progress=False))
    assert np.array_equal(one.active_counts, many.active_counts)
    for lang in texts.langs:
        assert one.nll(lang) == pytest.approx(many.nll(lang), rel=1e-5)
        assert np.allclose(one.embeddings[lang], many.embeddings[lang], atol=1e-5)


def test_pass_nll_equals_the_models_own_loss(tiny_llama, texts):
    model, _, _ = load_model(str(tiny_llama))
    result = run_pass(model, texts, label="test", nll=True, settings=QUIET)
    total = count = 0
    with torch.no_grad():
        for s in texts.samples["de"]:
            n = len(s.input_ids) - 1
            if n == 0:
                continue
            loss = model(input_ids=s.input_ids[None], labels=s.input_ids[None]).loss.item()
            total += loss * n
            count += n
    assert result.nll_tokens["de"] == count
    assert result.nll("de") == pytest.approx(total / count, rel=1e-5)


def test_deactivating_neurons_equals_zeroing_their_down_proj_columns(tiny_llama, texts):
    model, _, _ = load_model(str(tiny_llama))
    columns = torch.tensor([3, 7, 50])
    off = run_pass(model, texts, label="test", nll=True, lape=True, deactivate={1: columns}, settings=QUIET)
    edited = copy.deepcopy(model)
    with torch.no_grad():
        find_decoder_layers(edited)[1][1].mlp.down_proj.weight[:, columns] = 0
    ref = run_pass(edited, texts, label="test", nll=True, settings=QUIET)
    base = run_pass(model, texts, label="test", nll=True, settings=QUIET)
    for lang in texts.langs:
        assert off.nll(lang) == pytest.approx(ref.nll(lang), rel=1e-6)
        assert off.nll(lang) != pytest.approx(base.nll(lang), rel=1e-9)
    assert (off.abs_output_sum[:, 1, columns] == 0).all()  # the output statistics see the zeros


def test_a_pass_streamed_from_the_checkpoint_equals_the_pass_in_memory(tiny_llama, texts):
    from prunekit.evaluation.forward import ShardWeights

    model, _, _ = load_model(str(tiny_llama))
    columns = torch.tensor([1, 9])
    options = dict(label="test", lape=True, nll=True, embeddings=True, deactivate={2: columns},
                   settings=PassSettings(batch_size=3, progress=False))
    memory = run_pass(model, texts, **options)
    streamed = run_pass(ShardWeights.open(tiny_llama, torch.float32), texts, **options)
    assert np.array_equal(memory.active_counts, streamed.active_counts)
    assert np.allclose(memory.abs_output_sum, streamed.abs_output_sum, rtol=1e-5)
    for lang in texts.langs:
        assert streamed.nll(lang) == pytest.approx(memory.nll(lang), rel=1e-5)
        assert np.allclose(memory.embeddings[lang], streamed.embeddings[lang], rtol=1e-5, atol=1e-7)
    assert memory.valid_tokens == streamed.valid_tokens
