"""The layer-wise engine on tiny random models of every supported architecture."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import prunekit
from prunekit.calibration import build_calibration_set
from prunekit.engine import capture_layer_inputs, parse_skip_layers, run_layer
from prunekit.errors import ConfigError
from prunekit.models import find_decoder_layers, load_model
from tests.conftest import ARCHS, TATOEBA, build_tiny_model


def layer_outputs(model, input_ids):
    """Residual-stream outputs of every decoder layer from the model's own forward."""
    _, layers = find_decoder_layers(model)
    outputs = []
    handles = [layer.register_forward_hook(lambda m, a, o: outputs.append(o[0] if isinstance(o, tuple) else o)) for layer in layers]
    with torch.no_grad():
        model(input_ids=input_ids, use_cache=False)
    for h in handles:
        h.remove()
    return outputs


@pytest.mark.parametrize("arch", ARCHS)
def test_captured_kwargs_replay_reproduces_hidden_states(arch, tiny_models, tokenizer):
    model, tok, _ = load_model(str(tiny_models[arch]))
    ids = build_calibration_set(tok, "de", str(TATOEBA), nsamples=4, seqlen=24, seed=0).input_ids
    expected = layer_outputs(model, ids)
    inputs, kwargs = capture_layer_inputs(model, ids, batch_size=3)  # micro-batches of 3 and 1
    _, layers = find_decoder_layers(model)
    hidden = inputs
    with torch.no_grad():
        for index, layer in enumerate(layers):
            hidden = [run_layer(layer, h, kwargs[index]) for h in hidden]
            assert torch.allclose(torch.cat(hidden), expected[index], atol=1e-5), f"layer {index}"


def test_gemma3_sliding_and_full_layers_get_their_own_kwargs(tmp_path, tokenizer):
    path = build_tiny_model("gemma3", tokenizer, tmp_path / "g", num_hidden_layers=4,
                            layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"])
    model, tok, _ = load_model(str(path))
    ids = build_calibration_set(tok, "en", str(TATOEBA), nsamples=2, seqlen=40, seed=0).input_ids
    _, kwargs = capture_layer_inputs(model, ids, batch_size=2)
    cos0, _ = kwargs[0]["position_embeddings"]
    cos1, _ = kwargs[1]["position_embeddings"]
    assert not torch.equal(cos0, cos1) or model.config.rope_parameters is None
    expected = layer_outputs(model, ids)
    _, layers = find_decoder_layers(model)
    hidden = capture_layer_inputs(model, ids, batch_size=2)[0]
    with torch.no_grad():
        for index, layer in enumerate(layers):
            hidden = [run_layer(layer, h, kwargs[index]) for h in hidden]
            assert torch.allclose(torch.cat(hidden), expected[index], atol=1e-5)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_every_architecture_prunes_and_still_generates(arch, method, tiny_models):
    result = prunekit.prune(str(tiny_models[arch]), method,
                            calibration=prunekit.CalibrationSpec("de+sw", source=str(TATOEBA), nsamples=4, seqlen=32),
                            progress=False)
    _, layers = find_decoder_layers(result.model)
    for layer in layers:
        for name, module in layer.named_modules():
            if isinstance(module, torch.nn.Linear):
                assert abs(float((module.weight == 0).float().mean()) - 0.5) < 1e-9, name
    prompt = result.tokenizer("Hallo", return_tensors="pt")
    generated = result.model.generate(**prompt, max_new_tokens=4, do_sample=False)
    assert generated.shape[1] == prompt.input_ids.shape[1] + 4
    assert torch.isfinite(result.model(**prompt).logits).all()


def test_embeddings_norms_and_lm_head_are_never_pruned(tiny_llama):
    original = AutoModelForCausalLM.from_pretrained(str(tiny_llama)).state_dict()
    pruned = prunekit.prune(str(tiny_llama), "wanda",
                            calibration=prunekit.CalibrationSpec("en", source=str(TATOEBA), nsamples=4, seqlen=32),
                            progress=False).model.state_dict()
    for name, tensor in original.items():
        if "embed" in name or "norm" in name or "lm_head" in name:
            assert torch.equal(tensor, pruned[name]), name


def test_skipped_layers_stay_byte_identical(tiny_llama, tmp_path):
    out = tmp_path / "skip"
    prunekit.prune(str(tiny_llama), "sparsegpt",
                   calibration=prunekit.CalibrationSpec("en", source=str(TATOEBA), nsamples=4, seqlen=32),
                   output=prunekit.OutputSpec(out), engine=prunekit.EngineSpec(skip_layers="first,last"),
                   progress=False)
    dense = load_file(str(tiny_llama / "model.safetensors"))
    pruned = load_file(str(out / "model.safetensors"))
    for name, tensor in dense.items():
        same = torch.equal(tensor.view(torch.uint8), pruned[name].view(torch.uint8))
        if ".layers.0." in name or ".layers.2." in name:
            assert same, name
        elif ".layers.1." in name and name.endswith("proj.weight"):
            assert not same, name
    record = json.loads((out / "prunekit.json").read_text())
    assert record["skip_layers"] == [0, 2]
    assert [layer["skipped"] for layer in record["sparsity"]["per_layer"]] == [True, False, True]


def test_engine_mask_matches_wanda_reference_on_captured_layer_inputs(tiny_llama):
    from tests.test_methods import reference_wanda_mask

    model, tok, _ = load_model(str(tiny_llama))
    ids = build_calibration_set(tok, "es", str(TATOEBA), nsamples=4, seqlen=32, seed=1).input_ids
    captured = []
    _, layers = find_decoder_layers(model)
    handle = layers[0].self_attn.q_proj.register_forward_pre_hook(lambda m, a: captured.append(a[0].detach()))
    with torch.no_grad():
        model(input_ids=ids, use_cache=False)
    handle.remove()
    dense_q = layers[0].self_attn.q_proj.weight.detach().clone()
    result = prunekit.prune(str(tiny_llama), "wanda",
                            calibration=prunekit.CalibrationSpec("es", source=str(TATOEBA), nsamples=4, seqlen=32, seed=1),
                            progress=False)
    pruned_q = find_decoder_layers(result.model)[1][0].self_attn.q_proj.weight
    assert torch.equal(pruned_q == 0, reference_wanda_mask(dense_q, torch.cat(captured), 0.5))


def test_same_seed_gives_bit_identical_checkpoints(tiny_llama):
    a = prunekit.prune(str(tiny_llama), "sparsegpt",
                       calibration=prunekit.CalibrationSpec("ru", source=str(TATOEBA), nsamples=4, seqlen=32, seed=3),
                       progress=False)
    b = prunekit.prune(str(tiny_llama), "sparsegpt",
                       calibration=prunekit.CalibrationSpec("ru", source=str(TATOEBA), nsamples=4, seqlen=32, seed=3),
                       progress=False)
    for (name, ta), tb in zip(a.model.state_dict().items(), b.model.state_dict().values()):
        assert torch.equal(ta, tb), name


def test_parse_skip_layers():
    assert parse_skip_layers("first,last", 4) == {0, 3}
    assert parse_skip_layers("1, -1", 4) == {1, 3}
    with pytest.raises(ConfigError, match="does not exist"):
        parse_skip_layers("7", 4)
    with pytest.raises(ConfigError, match="not 'first'"):
        parse_skip_layers("middle", 4)


@pytest.mark.gemma
def test_real_gemma_kwargs_replay_reproduces_hidden_states(embedded_gemma):
    model, tok, _ = load_model(str(embedded_gemma))
    ids = build_calibration_set(tok, "de", str(TATOEBA), nsamples=2, seqlen=48, seed=0).input_ids
    expected = layer_outputs(model, ids)
    inputs, kwargs = capture_layer_inputs(model, ids, batch_size=2)
    _, layers = find_decoder_layers(model)
    hidden = inputs
    with torch.no_grad():
        for index, layer in enumerate(layers):
            hidden = [run_layer(layer, h, kwargs[index]) for h in hidden]
            scale = expected[index].abs().max()
            assert (torch.cat(hidden) - expected[index]).abs().max() <= 1e-4 * scale, f"layer {index}"
