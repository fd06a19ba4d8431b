"""Layer streaming (issue 16 §1-3): --dtype auto, the skeleton on the meta device, layers read from and written
into the base's safetensors shards, bit-identical to the in-memory path; activation placement."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from prunekit.engine import Engine
from prunekit.errors import ConfigError
from prunekit.methods import get_method
from prunekit.models import find_decoder_layers, load_model
from prunekit.artifacts import read_record
from prunekit.models import checkpoint_dtype
from prunekit.pipeline import prune
from prunekit.recipe import CalibrationSpec, EngineSpec, OutputSpec, Quantization, Recipe, parse_pattern
from prunekit.streaming import (
    INDEX_FILE, SafetensorsCheckpoint, StreamedLayers, build_skeleton, layer_reserve, plan_activations,
)
from tests.conftest import TATOEBA, build_tiny_model

GB = 1e9
CALIBRATION = CalibrationSpec("en", str(TATOEBA), nsamples=4, seqlen=24)
RUN = dict(calibration=CALIBRATION, engine=EngineSpec("cpu"), progress=False)
UNCALIBRATED = RUN | {"calibration": CalibrationSpec()}


def written(out: Path, **fields) -> OutputSpec:
    return OutputSpec(out, overwrite=True, **fields)


def tiny(tokenizer, root: Path, arch: str, dtype: torch.dtype = torch.float32, shard: str | None = None, **overrides) -> Path:
    """A tiny random model saved in ``dtype`` (one file, or shards of at most ``shard``)."""
    from transformers import AutoModelForCausalLM

    name = f"{arch}-{str(dtype).split('.')[-1]}-{shard or 'one'}-{'-'.join(f'{k}{v}' for k, v in overrides.items())}"
    path = root / name
    if not path.exists():
        build_tiny_model(arch, tokenizer, path, **overrides)
        if dtype != torch.float32 or shard:
            model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
            for file in path.glob("*.safetensors"):
                file.unlink()
            model.save_pretrained(path, **({"max_shard_size": shard} if shard else {}))
    return path


@pytest.fixture(scope="module")
def models_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("stream-models")


def weights(directory: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for file in sorted(directory.glob("*.safetensors")):
        tensors.update(load_file(file))
    return tensors


def both_paths(base: Path, tmp_path: Path, checkpoint_format: str = "packed", **kwargs):
    streamed = prune(str(base), output=written(tmp_path / "streamed", checkpoint_format=checkpoint_format, stream=True),
                     **(RUN | kwargs))
    in_memory = prune(str(base), output=written(tmp_path / "memory", checkpoint_format=checkpoint_format, stream=False),
                      **(RUN | kwargs))
    assert streamed.record["streamed"] and not in_memory.record["streamed"]
    return streamed, in_memory


CASES = [
    ("llama", torch.float32, dict(method="wanda", sparsity=0.5)),
    ("llama", torch.bfloat16, dict(method="sparsegpt", pattern="2:4")),
    ("gemma3", torch.bfloat16, dict(method="wanda", pattern="4:8")),
    ("gemma3", torch.float32, dict(method="sparsegpt", sparsity=0.6)),
    ("qwen2", torch.bfloat16, dict(method="magnitude", sparsity=0.5, calibration=CalibrationSpec())),
    ("qwen2", torch.float32, dict(method="sparsegpt", sparsity=0.5)),
    ("llama", torch.bfloat16, dict(method="gptq", quantization=Quantization(bits=4, group_size=32), checkpoint_format="dense")),
    ("gemma3", torch.float32, dict(method="gptq", quantization=Quantization(bits=3, group_size=16, act_order=True), checkpoint_format="dense")),
]


@pytest.mark.parametrize("arch,dtype,kwargs", CASES, ids=[f"{a}-{str(d)[6:]}-{k['method']}" for a, d, k in CASES])
def test_streamed_weights_are_bit_identical_to_the_in_memory_path(arch, dtype, kwargs, tokenizer, models_root, tmp_path):
    base = tiny(tokenizer, models_root, arch, dtype, tie_word_embeddings=arch == "gemma3")
    streamed, in_memory = both_paths(base, tmp_path, **kwargs)
    a, b, dense = weights(streamed.out), weights(in_memory.out), weights(base)
    assert set(a) == set(dense)  # exactly the base's names (a tied lm_head stays absent)
    for name, tensor in a.items():
        assert tensor.dtype == dense[name].dtype == dtype and tensor.shape == dense[name].shape, name
        assert torch.equal(tensor, b[name]), name
    changed = {name for name in a if not torch.equal(a[name], dense[name])}
    assert changed and all(name.endswith("proj.weight") for name in changed)
    assert streamed.record["base_model"]["dtype"] == str(dtype).split(".")[-1]
    if "quantization" in kwargs:  # a quantization record carries its own section
        assert streamed.record["quantization"]["relative_error_per_module"] == in_memory.record["quantization"]["relative_error_per_module"]
    else:
        assert streamed.record["sparsity"]["overall"] == pytest.approx(in_memory.record["sparsity"]["overall"])
        assert streamed.record["sparsity"]["per_layer"][0]["modules"][0]["relative_error"] == (
            in_memory.record["sparsity"]["per_layer"][0]["modules"][0]["relative_error"])


def test_sharded_base_stays_sharded_and_non_linear_tensors_are_bit_identical(tokenizer, models_root, tmp_path):
    base = tiny(tokenizer, models_root, "llama", torch.bfloat16, shard="60KB")
    assert (base / INDEX_FILE).exists() and len(list(base.glob("*.safetensors"))) > 2
    result = prune(str(base), "wanda", sparsity=0.5, output=written(tmp_path / "out"), **(RUN | {"engine": EngineSpec("cpu", "last")}))
    assert result.record["skip_layers"] == [2]
    assert result.record["streamed"]
    out = result.out
    assert json.loads((out / INDEX_FILE).read_text()) == json.loads((base / INDEX_FILE).read_text())
    assert sorted(p.name for p in out.glob("*.safetensors")) == sorted(p.name for p in base.glob("*.safetensors"))
    for file in base.glob("*.safetensors"):
        with safe_open(file, "pt") as dense, safe_open(out / file.name, "pt") as pruned:
            assert list(dense.keys()) == list(pruned.keys()) and dense.metadata() == pruned.metadata()
            for name in dense.keys():
                d, p = dense.get_tensor(name), pruned.get_tensor(name)
                assert d.dtype == p.dtype == torch.bfloat16 and d.shape == p.shape
                linear = name.endswith("proj.weight") and ".layers.2." not in name  # layer 2 (last) is skipped
                assert torch.equal(d, p) != linear, name
    assert sum(f.stat().st_size for f in out.glob("*.safetensors")) == sum(f.stat().st_size for f in base.glob("*.safetensors"))
    assert read_record(out)["base_model"]["dtype"] == "bfloat16"
    model, _, _ = load_model(str(out))  # plain transformers loads it, in its own dtype
    assert next(model.parameters()).dtype == torch.bfloat16


def test_lm_head_and_final_norm_are_never_read_and_the_embedding_once(tokenizer, models_root, tmp_path, monkeypatch):
    base = tiny(tokenizer, models_root, "llama", torch.bfloat16)
    read: list[str] = []
    original = SafetensorsCheckpoint.read

    def spy(self, names, **kwargs):
        read.extend(names)
        return original(self, names, **kwargs)

    monkeypatch.setattr(SafetensorsCheckpoint, "read", spy)
    prune(str(base), "sparsegpt", sparsity=0.5, output=written(tmp_path / "out", stream=True), **RUN)
    assert read.count("model.embed_tokens.weight") == 1
    assert not [n for n in read if n.startswith("lm_head") or n == "model.norm.weight"]
    assert len(read) == len(set(read)) == len(weights(base)) - 2  # every layer tensor once


def test_skeleton_buffers_are_the_models_own_on_the_cpu(tokenizer, models_root):
    from transformers import AutoModelForCausalLM

    base = tiny(tokenizer, models_root, "gemma3", torch.bfloat16, tie_word_embeddings=True)
    skeleton = build_skeleton(base, torch.bfloat16)
    full = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
    assert {p.device.type for p in skeleton.parameters()} == {"meta"}
    buffers = dict(skeleton.named_buffers())
    assert any("sliding_attention_inv_freq" in n for n in buffers) and any("full_attention_inv_freq" in n for n in buffers)
    for name, buffer in full.named_buffers():
        assert buffers[name].device.type == "cpu" and torch.equal(buffers[name], buffer), name
    streamed = StreamedLayers(skeleton, SafetensorsCheckpoint.find(base), None)
    assert streamed.missing() == []
    streamed.close()


def test_dtype_auto_reads_the_checkpoint_and_explicit_dtype_loads_in_memory(tokenizer, models_root, tmp_path):
    base = tiny(tokenizer, models_root, "qwen2", torch.bfloat16)
    assert checkpoint_dtype(base) == "bfloat16"
    config = json.loads((base / "config.json").read_text())
    for key in ("dtype", "torch_dtype"):
        config.pop(key, None)
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "config.json").write_text(json.dumps(config))
    (bare / "model.safetensors").symlink_to(base / "model.safetensors")
    assert checkpoint_dtype(bare) == "bfloat16"  # from the tensors
    result = prune(str(base), "magnitude", sparsity=0.5, output=written(tmp_path / "fp32", dtype="float32"), **UNCALIBRATED)
    assert not result.record["streamed"] and result.record["base_model"]["dtype"] == "float32"
    assert {t.dtype for t in weights(result.out).values()} == {torch.float32}
    with pytest.raises(ConfigError, match="differs from the checkpoint"):
        prune(str(base), "magnitude", sparsity=0.5, output=written(tmp_path / "x", dtype="float32", stream=True), **UNCALIBRATED)


def test_a_failed_streamed_run_leaves_no_output(tokenizer, models_root, tmp_path, monkeypatch):
    base = tiny(tokenizer, models_root, "llama", torch.bfloat16)
    calls = []

    def fail(self, index, layer):
        calls.append(index)
        if index == 1:
            raise RuntimeError("killed")
        StreamedLayers._done(self, index, layer)

    monkeypatch.setattr(StreamedLayers, "_done", StreamedLayers.done, raising=False)
    monkeypatch.setattr(StreamedLayers, "done", fail)
    with pytest.raises(RuntimeError, match="killed"):
        prune(str(base), "wanda", sparsity=0.5, output=written(tmp_path / "out"), **RUN)
    assert calls == [0, 1]
    # no output; only the resumable staging (tests/test_resume.py), which names its finished layer
    assert not (tmp_path / "out").exists() and [p.name for p in tmp_path.glob(".out.*")] == [".out.partial"]
    assert json.loads((tmp_path / ".out.partial" / ".prunekit-staging.json").read_text())["next_layer"] == 1


class RecordingSource:
    def __init__(self):
        self.events = []

    def inputs(self):
        from contextlib import nullcontext

        return nullcontext()

    def load(self, index, layer, device):
        self.events.append(("load", index, device.type))
        layer.to(device)

    def done(self, index, layer):
        self.events.append(("done", index, next(layer.parameters()).device.type))


def test_data_free_methods_move_each_layer_to_the_compute_device(tiny_llama):
    model, _, _ = load_model(str(tiny_llama))
    source = RecordingSource()
    Engine(get_method("magnitude"), Recipe("magnitude", pattern=parse_pattern(0.5, None)), "cpu", {1}).run(model, None, source)
    assert source.events == [("load", 0, "cpu"), ("done", 0, "cpu"), ("load", 2, "cpu"), ("done", 2, "cpu")]
    assert len(find_decoder_layers(model)[1]) == 3


# --- activation placement: the numbers of the study's models -----------------------------------------

def reserve(hidden: int, ffn: int, kv: int, bytes_per: int) -> int:
    """One decoder layer of a Llama-architecture model (GQA attention, gated MLP) at 8192-token micro-batches."""
    params = 2 * hidden * hidden + 2 * hidden * kv + 3 * hidden * ffn
    return layer_reserve(params, ffn, ffn, 8192, bytes_per, statistics=True)


GPU_80GB, GPU_48GB = 79 * 2**30, 47 * 2**30  # what mem_get_info reports free on an 80 GB H100/A100 and a 48 GB L40S
LLAMA3_8B = (4096, 14336, 1024)  # hidden, FFN, KV width
AYA23_35B = (8192, 22528, 1024)


def test_llama3_8b_at_128_x_8192_fits_an_80_gb_gpu_in_bf16_and_fp32():
    for bytes_per, per_buffer in ((2, 8.6), (4, 17.2)):
        plan = plan_activations(128, 8192, 4096, bytes_per, "cuda", GPU_80GB, 100 * GB, reserve(*LLAMA3_8B, bytes_per))
        assert plan.where == "device" and plan.per_buffer / GB == pytest.approx(per_buffer, abs=0.05)
    assert "128 × 8192 tokens × 4096 × 2 B = 8.6 GB per buffer, on the CUDA device" in plan_activations(
        128, 8192, 4096, 2, "cuda", GPU_80GB, None).describe()


def test_aya23_35b_activations_go_to_pinned_host_memory_when_the_gpu_is_too_small():
    for gpu in (GPU_80GB, GPU_48GB):  # bf16: 2 × 17.2 GB
        assert plan_activations(128, 8192, 8192, 2, "cuda", gpu, 200 * GB, reserve(*AYA23_35B, 2)).where == "device"
    fp32 = reserve(*AYA23_35B, 4)
    assert plan_activations(128, 8192, 8192, 4, "cuda", GPU_80GB, 200 * GB, fp32).where == "device"  # 68.7 GB + a layer
    plan = plan_activations(128, 8192, 8192, 4, "cuda", GPU_48GB, 200 * GB, fp32)
    assert plan.where == "host" and plan.describe() == (
        "calibration activations: 128 × 8192 tokens × 8192 × 4 B = 34.4 GB per buffer, "
        "in pinned host RAM, streamed to the CUDA device per micro-batch")
    with pytest.raises(ConfigError, match=r"fit neither the 50.5 GB free on the GPU nor the 64.0 GB of available host RAM; "
                                          r"lower --nsamples or --seqlen, or use --dtype bfloat16"):
        plan_activations(128, 8192, 8192, 4, "cuda", GPU_48GB, 64 * GB, fp32)


def test_cpu_activations_must_fit_host_memory():
    assert plan_activations(128, 2048, 4096, 2, "cpu", None, 24 * GB).where == "host"
    with pytest.raises(ConfigError, match="fit not the 8.0 GB of available host RAM; lower --nsamples or --seqlen$"):
        plan_activations(128, 8192, 4096, 2, "cpu", None, 8 * GB)


def test_prune_prints_the_activation_plan(tokenizer, models_root, tmp_path, capsys):
    base = tiny(tokenizer, models_root, "llama", torch.bfloat16)
    prune(str(base), "wanda", sparsity=0.5, output=written(tmp_path / "out"), **(RUN | {"progress": True}))
    assert "calibration activations: 4 × 24 tokens × 64 × 2 B" in capsys.readouterr().err


def test_a_checkpoint_that_does_not_hold_what_the_skeleton_needs_is_not_streamed(tokenizer, models_root, tmp_path):
    from safetensors.torch import save_file

    base = tiny(tokenizer, models_root, "llama", torch.bfloat16)
    odd = tmp_path / "odd"
    odd.mkdir()
    for file in base.iterdir():
        if file.suffix != ".safetensors":
            (odd / file.name).write_bytes(file.read_bytes())
    tensors = weights(base)
    tensors["model.layers.0.mlp.up_proj.weight"] = tensors["model.layers.0.mlp.up_proj.weight"][:, :32].contiguous()
    save_file(tensors, odd / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ConfigError, match="does not hold model.layers.0.mlp.up_proj.weight"):
        prune(str(odd), "magnitude", sparsity=0.5, output=written(tmp_path / "out", stream=True), **UNCALIBRATED)
    assert not (tmp_path / "out").exists()
