"""prunekit.checkpoint_files: the one reader of a checkpoint's safetensors shards, checked against the files
written here with safetensors' own save_file and read back independently (the raw bytes of the format)."""

from __future__ import annotations

import json
import struct

import pytest
import safetensors
import torch
from safetensors.torch import save_file

from prunekit.artifacts import INDEX_FILE
from prunekit.checkpoint_files import SafetensorsCheckpoint, check_safetensors, empty_model
from prunekit.errors import ModelError


def _tensors() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    tensors = {"model.embed_tokens.weight": torch.randn(16, 8, generator=gen, dtype=torch.float32)}
    for layer in range(3):
        tensors[f"model.layers.{layer}.mlp.up_proj.weight"] = torch.randn(12, 8, generator=gen).to(torch.bfloat16)
        tensors[f"model.layers.{layer}.input_layernorm.weight"] = torch.randn(8, generator=gen).to(torch.float16)
    tensors["model.norm.weight"] = torch.ones(8)
    return tensors


@pytest.fixture
def single(tmp_path):
    save_file(_tensors(), tmp_path / "model.safetensors")
    return tmp_path


@pytest.fixture
def sharded(tmp_path):
    tensors = _tensors()
    shards = {"model-00001-of-00002.safetensors": [], "model-00002-of-00002.safetensors": []}
    for name in tensors:  # layers 0 and 1 in the first shard, the rest in the second
        first = name.startswith(("model.embed", "model.layers.0.", "model.layers.1."))
        shards[sorted(shards)[0 if first else 1]].append(name)
    weight_map = {}
    for file, names in shards.items():
        save_file({n: tensors[n] for n in names}, tmp_path / file)
        weight_map.update(dict.fromkeys(names, file))
    (tmp_path / INDEX_FILE).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return tmp_path


def _raw_bytes(file, name) -> bytes:
    """A tensor's bytes read straight from the file by the format's specification (the independent reference)."""
    data = file.read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    begin, end = json.loads(data[8: 8 + length])[name]["data_offsets"]
    return data[8 + length + begin: 8 + length + end]


class Opens:
    """Counts safe_open calls and the tensors read through them."""

    def __init__(self, monkeypatch):
        self.files: list[str] = []
        self.tensors: list[str] = []
        original = safetensors.safe_open
        outer = self

        class Spy:
            def __init__(self, file, *args, **kwargs):
                outer.files.append(str(file))
                self.handle = original(file, *args, **kwargs)

            def __enter__(self):
                self.handle.__enter__()
                return self

            def __exit__(self, *exc):
                return self.handle.__exit__(*exc)

            def get_tensor(self, name):
                outer.tensors.append(name)
                return self.handle.get_tensor(name)

            def get_slice(self, name):
                outer.tensors.append(name)
                return self.handle.get_slice(name)

        monkeypatch.setattr(safetensors, "safe_open", Spy)


@pytest.mark.parametrize("layout", ["single", "sharded"])
def test_inventory_from_the_headers_and_reads_equal_the_file(layout, request, monkeypatch):
    path = request.getfixturevalue(layout)
    tensors = _tensors()
    opens = Opens(monkeypatch)
    checkpoint = SafetensorsCheckpoint.open(path)
    assert sorted(checkpoint.names) == sorted(tensors)
    assert checkpoint.files == (["model.safetensors"] if layout == "single"
                                else ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"])
    assert (checkpoint.index_file is None) == (layout == "single")
    codes = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}
    assert checkpoint.tensor_info() == {n: (codes[t.dtype], tuple(t.shape)) for n, t in tensors.items()}
    assert checkpoint.dtype("model.layers.2.mlp.up_proj.weight") == "BF16"
    assert checkpoint.shape("model.embed_tokens.weight") == (16, 8)
    assert opens.files == []  # the inventory reads headers, never a tensor
    for materialise in (True, False):
        read = checkpoint.read(sorted(tensors), materialise=materialise)
        assert list(read) == sorted(tensors)
        for name, tensor in read.items():
            assert tensor.dtype == tensors[name].dtype and torch.equal(tensor, tensors[name])
            assert tensor.contiguous().view(torch.uint8).numpy().tobytes() == _raw_bytes(checkpoint.path(name), name)
    ranges = checkpoint.byte_ranges(["model.norm.weight"])
    ((file, [(begin, end)]),) = ranges.items()
    assert (path / file).read_bytes()[begin:end] == _raw_bytes(path / file, "model.norm.weight")


def test_reading_one_layer_reads_no_other(sharded, monkeypatch):
    checkpoint = SafetensorsCheckpoint.find(sharded)
    opens = Opens(monkeypatch)
    layer = checkpoint.read([n for n in checkpoint.names if n.startswith("model.layers.1.")])
    assert sorted(layer) == ["model.layers.1.input_layernorm.weight", "model.layers.1.mlp.up_proj.weight"]
    assert sorted(opens.tensors) == sorted(layer)
    assert set(opens.files) == {str(sharded / "model-00001-of-00002.safetensors")}
    assert len(opens.files) == 2  # materialised: one open per tensor, its pages given back at once
    opens.files.clear(), opens.tensors.clear()
    checkpoint.read([n for n in checkpoint.names if n.startswith("model.layers.2.")], materialise=False)
    assert opens.files == [str(sharded / "model-00002-of-00002.safetensors")]  # views: one open per file
    assert sorted(opens.tensors) == ["model.layers.2.input_layernorm.weight", "model.layers.2.mlp.up_proj.weight"]


def test_row_blocks_read_only_the_rows_asked(single, monkeypatch):
    checkpoint = SafetensorsCheckpoint.find(single)
    opens = Opens(monkeypatch)
    with checkpoint.open_shards() as shards:
        rows = shards.slice("model.embed_tokens.weight")[3:5]
        bf16 = shards.slice("model.layers.0.mlp.up_proj.weight", "pt")[0:2]
        again = shards.slice("model.norm.weight")[:]
    assert (rows == _tensors()["model.embed_tokens.weight"][3:5].numpy()).all()
    assert torch.equal(bf16, _tensors()["model.layers.0.mlp.up_proj.weight"][0:2])
    assert (again == 1).all()
    assert len(opens.files) == 2  # one handle per file and framework, kept open until closed


def test_a_missing_shard_or_no_weights_is_a_model_error(sharded, tmp_path_factory):
    (sharded / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(ModelError, match="'my-model': shard model-00002-of-00002.safetensors named in the index is missing"):
        SafetensorsCheckpoint.find(sharded, "my-model")
    empty = tmp_path_factory.mktemp("empty")
    assert SafetensorsCheckpoint.find(empty) is None
    with pytest.raises(ModelError, match=f"has no model.safetensors or {INDEX_FILE}"):
        SafetensorsCheckpoint.open(empty)


def test_a_damaged_file_is_named(single):
    file = single / "model.safetensors"
    check_safetensors(file)
    file.write_bytes(file.read_bytes()[:6])
    with pytest.raises(ModelError, match="is damaged"):
        check_safetensors(file)
    with pytest.raises(ModelError, match="is damaged"):
        SafetensorsCheckpoint.find(single)


def test_empty_model_has_meta_parameters_and_real_buffers():
    from transformers import LlamaConfig

    config = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1)
    model = empty_model(config, torch.bfloat16)
    assert {p.device.type for p in model.parameters()} == {"meta"}
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    buffers = dict(model.named_buffers())
    assert buffers and all(b.device.type == "cpu" for b in buffers.values())  # rotary inv_freq, made by the model
