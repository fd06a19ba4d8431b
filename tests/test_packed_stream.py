"""Packed quantization streams (issue 25 §3): a streamed packed run writes, layer by layer, the very bytes the
whole-model path (``stream=False``, ``packing.save_packed``) writes: same files, same tensors, same headers."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch

from prunekit import packing
from prunekit.packed_writer import PARTS_DIR, safetensors_header
from prunekit.pipeline import prune
from prunekit.recipe import CalibrationSpec, EngineSpec, OutputSpec, Quantization
from tests.conftest import TATOEBA
from tests.test_streaming import tiny

CALIBRATION = CalibrationSpec("en", str(TATOEBA), nsamples=4, seqlen=24)


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("packed-stream-models")


def both_paths(base: Path, tmp_path: Path, method: str, quantization: Quantization, skip_layers: str | None = None):
    run = dict(quantization=quantization, engine=EngineSpec("cpu", skip_layers), progress=False,
               calibration=CALIBRATION if method == "gptq" else CalibrationSpec())
    streamed = prune(str(base), method, output=OutputSpec(tmp_path / "streamed", stream=True), **run)
    whole = prune(str(base), method, output=OutputSpec(tmp_path / "whole", stream=False), **run)
    assert streamed.record["streamed"] and not whole.record["streamed"]
    return streamed, whole


def assert_same_files(a: Path, b: Path) -> list[str]:
    """Every file but the run record byte for byte the same; the record's quantization section equal (but
    the seconds each layer took)."""
    names = sorted(p.name for p in a.iterdir())
    assert names == sorted(p.name for p in b.iterdir())
    for name in names:
        if name != "prunekit.json":
            assert (a / name).read_bytes() == (b / name).read_bytes(), name
    sections = []
    for directory in (a, b):
        section = json.loads((directory / "prunekit.json").read_text())["quantization"]
        for layer in section["per_layer"]:
            layer.pop("seconds")
        sections.append(section)
    assert sections[0] == sections[1]
    return names


CASES = [
    ("rtn", Quantization(bits=4, group_size=32), torch.bfloat16),
    ("rtn", Quantization(bits=8, group_size=64), torch.float32),
    ("gptq", Quantization(bits=4, group_size=32, act_order=True, symmetric=True), torch.bfloat16),
    ("gptq", Quantization(bits=8, group_size=-1), torch.bfloat16),
]


@pytest.mark.parametrize("method,quantization,dtype", CASES, ids=[f"{m}-{q.bits}bit-{str(d)[6:]}" for m, q, d in CASES])
def test_streamed_packed_checkpoint_is_byte_identical_to_the_whole_model_path(method, quantization, dtype, tokenizer, root, tmp_path):
    base = tiny(tokenizer, root, "llama", dtype)
    streamed, whole = both_paths(base, tmp_path, method, quantization)
    names = assert_same_files(streamed.out, whole.out)
    assert "model.safetensors" in names and "config.json" in names and PARTS_DIR not in names
    config = json.loads((streamed.out / "config.json").read_text())
    assert config["quantization_config"]["format"] == "pack-quantized"
    assert streamed.record["quantization"]["packed_linears"] == 3 * 7


def test_tied_embeddings_skipped_layer_and_unpackable_widths(tokenizer, root, tmp_path):
    """Gemma 3 with tied embeddings (the LM head is not written), a skipped layer (kept dense from the base) and
    an MLP width the group size does not divide (down_proj kept dense, fake-quantized)."""
    base = tiny(tokenizer, root, "gemma3", torch.bfloat16, tie_word_embeddings=True, intermediate_size=96)
    streamed, whole = both_paths(base, tmp_path, "rtn", Quantization(bits=4, group_size=64), skip_layers="last")
    assert_same_files(streamed.out, whole.out)
    kept = {entry["name"] for entry in streamed.record["quantization"]["kept_dense"]}
    assert "model.layers.0.mlp.down_proj" in kept and "model.layers.2.self_attn.q_proj" in kept


def test_sharded_base_and_sharded_output(tokenizer, root, tmp_path, monkeypatch):
    """A base in shards, an output over the shard size: the same shards and index as save_pretrained's."""
    base = tiny(tokenizer, root, "llama", torch.bfloat16, shard="60KB")
    monkeypatch.setattr(packing, "MAX_SHARD_SIZE", "40KB")
    streamed, whole = both_paths(base, tmp_path, "rtn", Quantization(bits=4, group_size=32))
    names = assert_same_files(streamed.out, whole.out)
    assert "model.safetensors.index.json" in names and len([n for n in names if n.endswith(".safetensors")]) > 2


def test_header_is_the_one_safetensors_writes():
    """The header made from names, dtypes and shapes alone equals safetensors' own for the same tensors."""
    from safetensors.torch import save

    tensors = {"b.weight_packed": torch.zeros(3, 2, dtype=torch.int32), "a.weight_scale": torch.ones(3, 1, dtype=torch.bfloat16),
               "a.weight_shape": torch.tensor([3, 16]), "norm": torch.ones(5), "z": torch.ones(7, dtype=torch.float16),
               "scalar": torch.tensor(1.0), "u8": torch.zeros(3, dtype=torch.uint8), "big": torch.zeros(10, 10, dtype=torch.int8)}
    data = save(tensors, metadata={"format": "pt"})
    header, order = safetensors_header({k: torch.empty(v.shape, dtype=v.dtype, device="meta") for k, v in tensors.items()},
                                       {"format": "pt"})
    (length,) = struct.unpack("<Q", data[:8])
    assert header == data[: 8 + length]
    assert order == [name for name in json.loads(data[8 : 8 + length]) if name != "__metadata__"]


def test_streamed_packed_run_holds_one_layer(tokenizer, root, tmp_path, monkeypatch):
    """Each Linear is packed and written when its layer is done: at the time a layer is loaded, every earlier
    layer's parts are on disk and no later layer's are."""
    from prunekit.streaming import StreamedLayers

    base = tiny(tokenizer, root, "llama", torch.bfloat16)
    seen = []
    original = StreamedLayers.load

    def load(self, index, layer, device):
        parts = tmp_path.glob(f"*/{PARTS_DIR}/*.safetensors")
        seen.append((index, sorted({int(p.name.split(".")[2]) for p in parts})))
        return original(self, index, layer, device)

    monkeypatch.setattr(StreamedLayers, "load", load)
    prune(str(base), "rtn", quantization=Quantization(bits=4, group_size=32), engine=EngineSpec("cpu"),
          progress=False, output=OutputSpec(tmp_path / "out", stream=True))
    assert seen == [(0, []), (1, [0]), (2, [0, 1])]
