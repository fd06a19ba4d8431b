"""Pack-quantized checkpoints (compressed-tensors): layout, codes, round trip through transformers and
prunekit's own readers, widths the format cannot hold."""

from __future__ import annotations

import json
from pathlib import Path
import math
import os

import pytest
import torch

from prunekit.errors import ConfigError
from prunekit.recipe import Quantization

from tests.conftest import TATOEBA, build_tiny_model

ATTN_MLP = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]


def quantize(model_dir, out, quantization: Quantization, method: str = "rtn", dtype: str = "float32", skip_layers=None):
    from prunekit.pipeline import prune
    from prunekit.recipe import CalibrationSpec, EngineSpec, OutputSpec

    calibration = CalibrationSpec("en", str(TATOEBA), nsamples=4, seqlen=32) if method == "gptq" else CalibrationSpec()
    return prune(str(model_dir), method, quantization=quantization, calibration=calibration, output=OutputSpec(out, dtype),
                 engine=EngineSpec(skip_layers=skip_layers), progress=False)


def tensors(path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(path / "model.safetensors")


def unpack_reference(packed: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """Codes of one packed row, read bit by bit from the definition: value i occupies bits
    [i·b, (i+1)·b) of the little-endian int32 stream, stored as code + 2^(b−1)."""
    words = [int(w) & 0xFFFFFFFF for w in packed.tolist()]
    stream = sum(w << (32 * k) for k, w in enumerate(words))
    return torch.tensor([((stream >> (i * bits)) & ((1 << bits) - 1)) - (1 << (bits - 1)) for i in range(count)])


@pytest.fixture(scope="module")
def llama128(tokenizer, tmp_path_factory):
    """A tiny Llama with hidden 128 (the model the layout in shared/reference/quantized-format.md was verified on)."""
    return build_tiny_model("llama", tokenizer, tmp_path_factory.mktemp("llama128") / "m", hidden_size=128, intermediate_size=256, num_hidden_layers=2)


def test_layout_is_what_llm_compressor_writes_for_w4a16(llama128, tmp_path):
    """W4A16 (int4, symmetric, group 128, act-order static), bf16: the names, dtypes and shapes of the
    reference checkpoint llm-compressor 0.14 wrote, and its quantization_config."""
    out = tmp_path / "w4a16"
    quantize(llama128, out, Quantization(4, 128, act_order=True, symmetric=True), method="gptq", dtype="bfloat16")
    saved = tensors(out)
    for layer in range(2):
        for name in ATTN_MLP:
            prefix = f"model.layers.{layer}.{name}"
            rows, cols = {"mlp.down_proj": (128, 256), "mlp.gate_proj": (256, 128), "mlp.up_proj": (256, 128),
                          "self_attn.k_proj": (64, 128), "self_attn.v_proj": (64, 128)}.get(name, (128, 128))  # 2 KV heads of 32
            assert f"{prefix}.weight" not in saved and f"{prefix}.weight_zero_point" not in saved  # symmetric: no zero point
            assert saved[f"{prefix}.weight_packed"].dtype == torch.int32 and saved[f"{prefix}.weight_packed"].shape == (rows, cols // 8)
            assert saved[f"{prefix}.weight_scale"].dtype == torch.bfloat16 and saved[f"{prefix}.weight_scale"].shape == (rows, cols // 128)
            assert saved[f"{prefix}.weight_shape"].dtype == torch.int64 and saved[f"{prefix}.weight_shape"].tolist() == [rows, cols]
    assert saved["lm_head.weight"].dtype == torch.bfloat16 and saved["model.embed_tokens.weight"].dtype == torch.bfloat16

    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "compressed-tensors" and config["format"] == "pack-quantized"
    assert config["quantization_status"] == "compressed" and config["sparsity_config"] == {} and config["version"]
    assert config["ignore"] == ["lm_head"]
    group = config["config_groups"]["group_0"]
    assert group["targets"] == ["Linear"] and group["format"] == "pack-quantized"
    assert group["input_activations"] is None and group["output_activations"] is None
    weights = group["weights"]
    assert {k: weights[k] for k in ("num_bits", "type", "symmetric", "strategy", "group_size", "actorder", "dynamic")} == {
        "num_bits": 4, "type": "int", "symmetric": True, "strategy": "group", "group_size": 128, "actorder": "static", "dynamic": False,
    }


def test_asymmetric_grid_adds_zero_points_packed_along_the_rows(llama128, tmp_path):
    out = tmp_path / "w8g64"
    quantize(llama128, out, Quantization(8, 64, symmetric=False), dtype="bfloat16")
    saved = tensors(out)
    prefix = "model.layers.0.mlp.down_proj"  # 128 × 256
    assert saved[f"{prefix}.weight_packed"].shape == (128, 256 // 4)
    assert saved[f"{prefix}.weight_scale"].shape == (128, 4)
    assert saved[f"{prefix}.weight_zero_point"].dtype == torch.int32 and saved[f"{prefix}.weight_zero_point"].shape == (128 // 4, 4)
    weights = json.loads((out / "config.json").read_text())["quantization_config"]["config_groups"]["group_0"]["weights"]
    assert weights["num_bits"] == 8 and weights["symmetric"] is False and weights.get("actorder") is None  # compressed-tensors 0.20 omits None fields


@pytest.mark.parametrize("quantization", [
    pytest.param(Quantization(4, 32), id="w4g32"),
    pytest.param(Quantization(8, -1, symmetric=True), id="w8-per-channel-sym"),
    pytest.param(Quantization(3, 64), id="w3g64", marks=pytest.mark.skipif(
        tuple(int(p) for p in __import__("compressed_tensors").__version__.split(".")[:2]) < (0, 19),
        reason="compressed-tensors before 0.19 (vLLM's pin, 0.17) packs whole 3-bit codes per int32, not a bit stream")),
])
def test_packed_codes_scales_and_zero_points_are_the_solvers_grid(tiny_llama, tmp_path, quantization):
    """Each stored code, read back from the bits, times the stored scale gives the fake-quantized weight;
    scales and zero points are the ones the solver returned."""
    out = tmp_path / "ckpt"
    result = quantize(tiny_llama, out, quantization, method="gptq")
    saved = tensors(out)
    bits = quantization.bits
    module = result.model.model.layers[1].mlp.up_proj  # 128 × 64
    weight = module.weight.detach()
    prefix = "model.layers.1.mlp.up_proj"
    scale = saved[f"{prefix}.weight_scale"].float()
    groups = 1 if quantization.group_size == -1 else 64 // quantization.group_size
    assert scale.shape == (128, groups)
    if quantization.symmetric:
        zero = torch.zeros_like(scale)
    else:
        zp = saved[f"{prefix}.weight_zero_point"]
        zero = torch.stack([unpack_reference(zp[:, g], bits, 128) for g in range(groups)], dim=1).float()
    packed = saved[f"{prefix}.weight_packed"]
    assert packed.shape == (128, math.ceil(64 * bits / 32))
    for row in (0, 57, 127):
        codes = unpack_reference(packed[row], bits, 64).float()
        assert codes.min() >= -(2 ** (bits - 1)) and codes.max() <= 2 ** (bits - 1) - 1
        index = torch.arange(64) // (64 if quantization.group_size == -1 else quantization.group_size)
        torch.testing.assert_close((codes - zero[row, index]) * scale[row, index], weight[row], rtol=0, atol=0)


@pytest.mark.parametrize("quantization, method, dtype", [
    pytest.param(Quantization(4, 32), "gptq", "float32", id="gptq-w4g32-fp32"),
    pytest.param(Quantization(4, 32, act_order=True, symmetric=True), "gptq", "bfloat16", id="gptq-w4g32-act-sym-bf16"),
    pytest.param(Quantization(8, -1), "rtn", "bfloat16", id="rtn-w8-bf16"),
])
def test_transformers_loads_the_packed_checkpoint_with_the_fake_quantized_logits(tiny_llama, tokenizer, tmp_path, quantization, method, dtype):
    from transformers import AutoModelForCausalLM

    from prunekit.packing import enable_loading

    out = tmp_path / "ckpt"
    result = quantize(tiny_llama, out, quantization, method=method, dtype=dtype)
    enable_loading()  # asymmetric zero points: compressed-tensors' loading shape (see prunekit.packing)
    loaded = AutoModelForCausalLM.from_pretrained(out)
    assert loaded.dtype == getattr(torch, dtype)
    ids = tokenizer("Das ist ein Haus. The cat sleeps.", return_tensors="pt").input_ids
    with torch.no_grad():  # the first forward decompresses the model (compressed-tensors' hook)
        expected, got = result.model(ids).logits.float(), loaded(ids).logits.float()
    assert torch.isfinite(got).all()
    assert float((got - expected).abs().max() / expected.abs().max()) <= 1e-4
    fake = dict(result.model.named_parameters())
    loaded_params = dict(loaded.named_parameters())
    for name, param in fake.items():  # the checkpoint dequantizes to the fake-quantized weights
        assert torch.equal(loaded_params[name], param), name


def test_linear_whose_width_is_not_a_multiple_of_the_group_size_stays_dense_and_is_listed(tokenizer, tmp_path):
    """compressed-tensors has no partial groups: down_proj (input 96) with groups of 64 keeps its weight."""
    from transformers import AutoModelForCausalLM

    model_dir = build_tiny_model("llama", tokenizer, tmp_path / "m", intermediate_size=96, num_hidden_layers=2)
    out = tmp_path / "w4g64"
    result = quantize(model_dir, out, Quantization(4, 64, symmetric=True))
    saved = tensors(out)
    for layer in range(2):
        assert saved[f"model.layers.{layer}.mlp.down_proj.weight"].dtype == torch.float32
        assert f"model.layers.{layer}.mlp.up_proj.weight_packed" in saved
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert config["ignore"] == ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj", "lm_head"]
    record = json.loads((out / "prunekit.json").read_text())
    kept = {entry["name"]: entry["reason"] for entry in record["quantization"]["kept_dense"]}
    assert "not a multiple of the group size 64" in kept["model.layers.1.mlp.down_proj"]
    assert record["quantization"]["packed_linears"] == 12
    # the dense down_proj holds the fake-quantized weights (partial last group quantized on its own grid)
    torch.testing.assert_close(saved["model.layers.0.mlp.down_proj.weight"], result.model.model.layers[0].mlp.down_proj.weight)
    loaded = AutoModelForCausalLM.from_pretrained(out)
    ids = tokenizer("Hola mundo", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, result.model(ids).logits)


def test_skipped_layers_stay_dense_and_the_record_has_quantization_fields(tiny_llama, tmp_path):
    out = tmp_path / "skip"
    result = quantize(tiny_llama, out, Quantization(4, 32, symmetric=True), skip_layers="first")
    record = result.record
    assert "sparsity" not in record and {"quantize_s", "load_s"} <= set(record["timings"]) and "prune_s" not in record["timings"]
    summary = record["quantization"]
    assert summary["format"] == "pack-quantized" and summary["bits"] == 4 and summary["group_size"] == 32
    assert [entry["name"] for entry in summary["kept_dense"]] == [f"model.layers.0.{n}" for n in ATTN_MLP] + ["lm_head"]
    assert summary["bytes"]["ratio_to_bf16"] == pytest.approx((4 / 8 + 4 / 32) / 2)  # int4 codes + an fp32 scale per 32
    saved = tensors(out)
    assert "model.layers.0.self_attn.q_proj.weight" in saved and "model.layers.1.self_attn.q_proj.weight_packed" in saved
    assert summary["relative_error_per_module"] == {}  # RTN without calibration text: no output error measured


def test_dynamic_act_order_groups_are_refused_for_the_packed_format(tiny_llama, tmp_path):
    with pytest.raises(ConfigError, match="--format dense"):
        quantize(tiny_llama, tmp_path / "never", Quantization(4, 32, act_order=True, static_groups=False), method="gptq")
    assert not (tmp_path / "never").exists()


def test_prunekit_load_eval_and_compare_read_the_packed_checkpoint(tiny_llama, tmp_path):
    from typer.testing import CliRunner

    import prunekit.cli.evaluate  # noqa: F401  (registers the command)
    from prunekit.cli.app import app
    from prunekit.models import load_model

    out = tmp_path / "ckpt"
    result = quantize(tiny_llama, out, Quantization(4, 32))  # asymmetric: zero points
    model, tok, _ = load_model(str(out), "float32")
    ids = tok("Guten Morgen", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(model(ids).logits, result.model(ids).logits)
    assert torch.equal(model.model.layers[2].mlp.down_proj.weight, result.model.model.layers[2].mlp.down_proj.weight)
    res = CliRunner().invoke(app, [
        "eval", str(out), "--dense", str(tiny_llama), "--langs", "en", "--ppl-source", str(TATOEBA), "--seqlen", "32",
        "--max-windows", "2", "--snr-tokens", "64", "--batch-size", "2", "--out", str(tmp_path / "results.json"), "--quiet",
    ])
    assert res.exit_code == 0, res.output
    results = json.loads((tmp_path / "results.json").read_text())
    assert math.isfinite(results["perplexity"]["en"]["ppl"])

    import prunekit.cli.compare  # noqa: F401  (registers the command)

    other = tmp_path / "w8"
    quantize(tiny_llama, other, Quantization(8, 32, symmetric=True))
    res = CliRunner().invoke(app, [
        "compare", str(out), str(other), "--dense", str(tiny_llama), "--only", "drift", "--langs", "de,en",
        "--text-source", str(TATOEBA), "--max-tokens", "64", "--out", str(tmp_path / "cmp"),
    ])
    assert res.exit_code == 0, res.output
    drift = json.loads((tmp_path / "cmp" / "compare.json").read_text())["drift"]
    assert drift  # both packed checkpoints were read and run


def test_cards_state_the_format_tags_and_serve_command(tiny_llama, tmp_path):
    import copy
    import re

    import yaml

    from prunekit.hub import render_model_card
    from prunekit.pipeline import prune
    from prunekit.recipe import OutputSpec

    def front_matter(card: str) -> dict:
        return yaml.safe_load(re.match(r"^---\n(.*?)\n---\n", card, re.DOTALL).group(1))

    record = quantize(tiny_llama, tmp_path / "q", Quantization(4, 32, symmetric=False)).record
    card = render_model_card(record, repo_id="org/q")
    assert front_matter(card)["tags"] == ["quantized", "4-bit", "rtn", "compressed-tensors", "prunekit"]
    assert "**pack-quantized** format (W4A16" in card and "vllm serve org/q" in card and "packed zero points" in card
    assert "pip install compressed-tensors" in card and "exact zeros" not in card

    gptq8 = copy.deepcopy(record)
    gptq8["recipe"]["method"] = "gptq"
    gptq8["recipe"]["quantization"].update(bits=8, symmetric=True)
    card = render_model_card(gptq8, repo_id="org/q8")
    assert front_matter(card)["tags"][:4] == ["quantized", "8-bit", "gptq", "compressed-tensors"]
    assert "W8A16" in card and "zero points" not in card

    pruned = prune(str(tiny_llama), "magnitude", sparsity=0.5, output=OutputSpec(tmp_path / "p"), progress=False).record
    card = render_model_card(pruned, repo_id="org/p")
    assert "compressed-tensors" not in front_matter(card)["tags"]
    assert "stored dense (safetensors, float32) with exact zeros" in card and "vllm serve org/p" in card


@pytest.mark.gemma
@pytest.mark.parametrize("slug, bound", [("w4g128", 0.3), ("w8g128", 0.55)])
def test_embedded_gemma_packed_round_trip_and_size(embedded_gemma, tmp_path, slug, bound):
    """The real Gemma-3-270M in bf16: transformers reads the packed checkpoint back to the fake-quantized
    logits, and the quantized Linears take at most ``bound`` × their bf16 bytes."""
    from transformers import AutoModelForCausalLM

    from prunekit.packing import enable_loading
    from prunekit.recipe import quantization_from_name

    out = tmp_path / slug
    result = quantize("embedded:gemma-3-270m", out, quantization_from_name(f"rtn-{slug}"), dtype="bfloat16")
    summary = result.record["quantization"]
    assert summary["packed_linears"] == 18 * 7 and [e["name"] for e in summary["kept_dense"]] == ["lm_head"]
    packed = sum(t.numel() * t.element_size() for k, t in tensors(out).items() if k.endswith(("weight_packed", "weight_scale", "weight_zero_point")))
    assert packed == summary["bytes"]["packed"] <= bound * summary["bytes"]["bf16"]
    enable_loading()
    loaded = AutoModelForCausalLM.from_pretrained(out)
    ids = result.tokenizer("Die Katze schläft. Paka analala.", return_tensors="pt").input_ids
    with torch.no_grad():
        expected, got = result.model(ids).logits.float(), loaded(ids).logits.float()
    assert torch.isfinite(got).all()
    assert float((got - expected).abs().max() / expected.abs().max()) <= 1e-4


def test_without_compressed_tensors_writing_and_loading_say_what_to_install(monkeypatch):
    import sys

    from prunekit.packing import check_format, prepare_loading

    monkeypatch.setitem(sys.modules, "compressed_tensors", None)  # makes `import compressed_tensors` fail
    with pytest.raises(ConfigError, match="pip install compressed-tensors"):
        check_format("packed", Quantization())
    assert check_format("dense", Quantization()) == "dense"
    with pytest.raises(ConfigError, match="'ckpt' is a compressed-tensors .*pip install compressed-tensors"):
        prepare_loading({"quant_method": "compressed-tensors", "format": "pack-quantized"}, "ckpt")
    prepare_loading({"quant_method": "gptq"}, "other")  # another library's quantization: left to transformers
    with pytest.raises(ConfigError, match="--format must be one of packed, dense"):
        check_format("gguf", Quantization())


def test_quantize_cli_writes_packed_by_default_and_says_how_to_serve_it(tiny_llama, tmp_path):
    from typer.testing import CliRunner

    import prunekit.cli.quantize  # noqa: F401  (registers the command)
    from prunekit.cli.app import app

    out = tmp_path / "cli"
    result = CliRunner().invoke(app, ["quantize", str(tiny_llama), "--method", "rtn",
                                      "--calib-source", str(TATOEBA), "--nsamples", "4", "--seqlen", "32", "--bits", "8", "--group-size", "64", "--out", str(out)])
    assert result.exit_code == 0, result.output
    said = " ".join(result.output.split())  # the console wraps long lines
    assert "21 Linears packed (pack-quantized, 8-bit codes); scales and the other tensors in float32" in said, said
    written = sum(os.path.getsize(out / name) for name in os.listdir(out) if name.endswith(".safetensors"))
    base = sum(os.path.getsize(tiny_llama / name) for name in os.listdir(tiny_llama) if name.endswith(".safetensors"))
    assert (f"weight files written: {written / 2**20:.2f} MiB on disk (packed, the rest in float32), "
            f"{written / base:.3f}× the base's weight files ({base / 2**20:.2f} MiB)") in said, said
    assert "vllm serve" in result.output and "kept in the base dtype: lm_head" in result.output
    record = json.loads((out / "prunekit.json").read_text())
    assert record["quantization"]["format"] == "pack-quantized" and "--format" not in record["command"]
    assert "model.layers.0.mlp.down_proj.weight_packed" in tensors(out)


def test_quantize_cli_states_the_size_of_the_dense_files_it_wrote(tiny_llama, tmp_path):
    """Issue 30 §8: the size printed is the written weight files' bytes on disk (os.path.getsize), their dtype
    and their ratio to the base's weight files on disk; not a ratio of the packed Linears to bf16."""
    from typer.testing import CliRunner

    import prunekit.cli.quantize  # noqa: F401  (registers the command)
    from prunekit.cli.app import app

    out = tmp_path / "dense"
    result = CliRunner().invoke(app, ["quantize", str(tiny_llama), "--method", "rtn", "--format", "dense",
                                      "--dtype", "bfloat16", "--group-size", "64", "--out", str(out)])
    assert result.exit_code == 0, result.output
    written = sum(os.path.getsize(out / name) for name in os.listdir(out) if name.endswith(".safetensors"))
    base = sum(os.path.getsize(tiny_llama / name) for name in os.listdir(tiny_llama) if name.endswith(".safetensors"))
    assert 0.4 < written / base < 0.6  # bf16 from an fp32 base: about half
    said = " ".join(result.output.split())
    assert (f"weight files written: {written / 2**20:.2f} MiB on disk (fake-quantized weights in bfloat16), "
            f"{written / base:.3f}× the base's weight files ({base / 2**20:.2f} MiB)") in said, said
    assert "bf16 size" not in said and "Linears packed" not in said


@pytest.mark.parametrize("stream", [True, False])
def test_a_quantized_checkpoint_is_readable_by_others(stream, tiny_llama, tmp_path):
    """Issue 30 §9: mode 0644 under umask 022 for every file, the packed safetensors included (the
    whole-model path's writer left it 0600)."""
    import os
    import stat

    import prunekit

    old = os.umask(0o022)
    try:
        out = tmp_path / "q"
        prunekit.prune(str(tiny_llama), "rtn", output=prunekit.OutputSpec(out, checkpoint_format="packed", stream=stream),
                       engine=prunekit.EngineSpec("cpu"), progress=False)
    finally:
        os.umask(old)
    modes = {f.name: oct(stat.S_IMODE(f.stat().st_mode)) for f in out.iterdir() if f.is_file()}
    assert "model.safetensors" in modes and set(modes.values()) == {"0o644"}, modes
