"""The one layer-by-layer forward (evaluation and analysis): equal to the model's own whole forward,
in memory and streamed from safetensors shards a layer at a time."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from prunekit.evaluation.forward import Batch, Consumer, ModelWeights, ShardWeights, open_weights, run_forward
from prunekit.models import find_decoder_layers, layer_hooks, load_model, resolve_model
from tests.conftest import build_tiny_model

REL = 1e-5


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, tokenizer) -> dict[str, Path]:
    """Tiny Llama (untied head, one shard file per ~40 kB: an index with several shards) and Gemma-3
    (tied embeddings, sliding and full attention layers, single file)."""
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("forward")
    llama = build_tiny_model("llama", tokenizer, root / "llama", seed=3)
    sharded = root / "llama-sharded"
    AutoModelForCausalLM.from_pretrained(llama).save_pretrained(sharded, max_shard_size="40KB")
    tokenizer.save_pretrained(sharded)
    gemma = build_tiny_model("gemma3", tokenizer, root / "gemma3", seed=4, tie_word_embeddings=True,
                             num_hidden_layers=4, final_logit_softcapping=5.0)
    return {"llama": llama, "llama-sharded": sharded, "gemma3": gemma}


class Recorder(Consumer):
    wants_scores = True

    def __init__(self, weights=None):
        self.states: dict[int, list[torch.Tensor]] = {}
        self.nll, self.count = 0.0, 0
        self.weights = weights
        self.materialized: list[int] = []

    def layer(self, index, hidden, batch):
        self.states.setdefault(index, []).append(hidden.clone())
        if self.weights is not None:  # which layers hold real weights while this one runs
            real = [i for i, layer in enumerate(self.weights.layers)
                    if any(p.device.type != "meta" for p in layer.parameters())]
            self.materialized.append(real)

    def final(self, batch, scores):
        nll, n = scores.nll()
        self.nll += nll
        self.count += n


def _whole_model(model, batches):
    """The reference: the model's own forward per batch, layer outputs by forward hooks, loss by transformers."""
    states: dict[int, list[torch.Tensor]] = {}
    nll, count = 0.0, 0
    with layer_hooks(model, lambda i, h: states.setdefault(i, []).append(h.clone())), torch.no_grad():
        for batch in batches:
            ids = batch.input_ids
            out = model(input_ids=ids, labels=ids)
            n = ids.shape[0] * (ids.shape[1] - 1)
            nll += out.loss.item() * n
            count += n
    return states, nll, count


def _batches(seed: int = 0) -> list[Batch]:
    torch.manual_seed(seed)
    return [Batch(torch.randint(3, 500, (2, 24))), Batch(torch.randint(3, 500, (2, 24))), Batch(torch.randint(3, 500, (1, 11)))]


def _assert_close(got: dict[int, list[torch.Tensor]], want: dict[int, list[torch.Tensor]]) -> None:
    assert sorted(got) == sorted(want)
    for index in want:
        for g, w in zip(got[index], want[index], strict=True):
            assert g.shape == w.shape
            assert ((g - w).abs().max() / w.abs().max()).item() <= REL, f"layer {index}"


@pytest.mark.parametrize("name", ["llama", "llama-sharded", "gemma3"])
def test_layer_states_and_nll_equal_the_whole_model_forward_in_memory_and_streamed(checkpoints, name):
    model, _, _ = load_model(str(checkpoints[name]))
    batches = _batches()
    want_states, want_nll, want_count = _whole_model(model, batches)

    in_memory = Recorder()
    assert run_forward(model, batches, [in_memory], "cpu", progress=False) == len(want_states)
    _assert_close(in_memory.states, want_states)
    assert in_memory.count == want_count and in_memory.nll == pytest.approx(want_nll, rel=REL)

    weights = ShardWeights.open(checkpoints[name], torch.float32)
    assert weights is not None
    streamed = Recorder(weights)
    run_forward(weights, batches, [streamed], "cpu", progress=False)
    _assert_close(streamed.states, want_states)
    assert streamed.nll == pytest.approx(want_nll, rel=REL)
    # One decoder layer holds weights at a time, and nothing is left behind.
    n_layers = len(want_states)
    assert streamed.materialized == [[i] for i in range(n_layers) for _ in batches]
    assert all(t.device.type == "meta" for t in weights.model.state_dict().values())


def test_streamed_gemma_keeps_ties_and_builds_its_buffers_itself(checkpoints):
    from safetensors import safe_open

    path = checkpoints["gemma3"]
    weights = ShardWeights.open(path, torch.float32)
    model = weights.model
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tied on the skeleton
    with safe_open(str(path / "model.safetensors"), framework="pt") as handle:
        stored = set(handle.keys())
    assert "lm_head.weight" not in stored and weights.names["lm_head.weight"] == "model.embed_tokens.weight"
    assert not any("inv_freq" in n or "embed_scale" in n for n in weights.names)  # never read from the shards
    dense, _, _ = load_model(str(path))
    real = dict(dense.named_buffers())
    for name, buffer in model.named_buffers():
        assert buffer.device.type == "cpu" and torch.equal(buffer, real[name]), name  # the model's own __init__
    # Every stored tensor is read once per forward that needs it: the embedding twice (input, tied head).
    run_forward(weights, _batches(), [Recorder()], "cpu", progress=False)
    sizes = {}
    with safe_open(str(path / "model.safetensors"), framework="pt") as handle:
        for key in stored:
            t = handle.get_tensor(key)
            sizes[key] = t.numel() * 4
    assert weights.tensors_read == sum(sizes.values()) + sizes["model.embed_tokens.weight"]


def test_padded_batches_with_attention_masks_match_the_model(checkpoints):
    model, _, _ = load_model(str(checkpoints["gemma3"]))
    torch.manual_seed(1)
    ids = torch.randint(3, 500, (3, 20))
    mask = torch.ones_like(ids)
    mask[1, 14:] = 0
    mask[2, 5:] = 0
    want = {}
    with layer_hooks(model, lambda i, h: want.setdefault(i, []).append(h.clone())), torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
    got = Recorder()
    got.wants_scores = False
    run_forward(ShardWeights.open(checkpoints["gemma3"], torch.float32), [Batch(ids, mask)], [got], "cpu", progress=False)
    for index in want:  # padded positions are not compared: their states are whatever the kernel leaves
        for g, w in zip(got.states[index], want[index]):
            keep = mask.bool()
            assert ((g[keep] - w[keep]).abs().max() / w[keep].abs().max()).item() <= REL


def test_open_weights_streams_safetensors_and_otherwise_falls_back(checkpoints, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    assert isinstance(open_weights(resolve_model(str(checkpoints["llama"])), None), ShardWeights)
    no_weights = tmp_path / "config-only"
    no_weights.mkdir()
    shutil.copy(checkpoints["llama"] / "config.json", no_weights)
    assert ShardWeights.open(no_weights, None) is None  # not safetensors: the caller loads the model whole
    renamed = tmp_path / "renamed"
    shutil.copytree(checkpoints["llama"], renamed)
    tensors = load_file(renamed / "model.safetensors")
    tensors["other.name"] = tensors.pop("model.norm.weight")
    save_file(tensors, renamed / "model.safetensors", metadata={"format": "pt"})
    assert ShardWeights.open(renamed, None) is None  # names the model does not use as they are


def test_streamed_dtype_defaults_to_the_checkpoints_own(checkpoints, tmp_path, tokenizer):
    path = build_tiny_model("llama", tokenizer, tmp_path / "bf16", seed=5)
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).save_pretrained(path)
    weights = ShardWeights.open(path, None)
    assert {p.dtype for p in weights.model.parameters()} == {torch.bfloat16}
    run_forward(weights, _batches(), [Recorder()], "cpu", progress=False)
    assert find_decoder_layers(weights.model)[1][0].mlp.down_proj.weight.device.type == "meta"


def _out_of_memory_above_one_row(model, monkeypatch) -> list[int]:
    """Every decoder layer of ``model`` runs out of memory on more than one sequence; returns the row counts tried."""
    tried: list[int] = []
    cls = type(find_decoder_layers(model)[1][0])
    original = cls.forward

    def forward(self, hidden_states, *args, **kwargs):
        tried.append(hidden_states.shape[0])
        if hidden_states.shape[0] > 1:
            raise torch.OutOfMemoryError("CUDA out of memory (injected)")
        return original(self, hidden_states, *args, **kwargs)

    monkeypatch.setattr(cls, "forward", forward)
    return tried


@pytest.mark.parametrize("name", ["llama", "gemma3"])
def test_a_layer_out_of_memory_retries_with_half_the_batch_and_gives_the_same_states(checkpoints, name, monkeypatch, caplog):
    """Issue 29 §3: an OOM in the forward retries at half the batch, down to one sequence, then succeeds; the
    size that fit is kept for the layers after; padded rows and their masks are cut with the batch."""
    model, _, _ = load_model(str(checkpoints[name]))
    torch.manual_seed(1)
    ids = torch.randint(3, 500, (4, 20))
    mask = torch.ones_like(ids)
    mask[1, 14:] = 0
    mask[3, 6:] = 0
    want = {}
    with layer_hooks(model, lambda i, h: want.setdefault(i, []).append(h.clone())), torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
    tried = _out_of_memory_above_one_row(model, monkeypatch)
    got = Recorder()
    got.wants_scores = False
    with caplog.at_level("WARNING"):
        run_forward(model, [Batch(ids, mask)], [got], "cpu", progress=False)
    layers = len(want)
    assert tried == [4, 2, 1, 1, 1, 1] + [1] * 4 * (layers - 1)  # halved twice on layer 0, then one row at a time
    assert "retrying with 2" in caplog.text and "retrying with 1" in caplog.text
    keep = mask.bool()
    for index in want:
        for g, w in zip(got.states[index], want[index], strict=True):
            assert ((g[keep] - w[keep]).abs().max() / w[keep].abs().max()).item() <= REL


def test_an_out_of_memory_on_one_sequence_reaches_the_user(checkpoints, monkeypatch):
    model, _, _ = load_model(str(checkpoints["llama"]))
    cls = type(find_decoder_layers(model)[1][0])
    monkeypatch.setattr(cls, "forward", lambda *a, **k: (_ for _ in ()).throw(torch.OutOfMemoryError("injected")))
    with pytest.raises(torch.OutOfMemoryError):
        run_forward(model, [Batch(torch.randint(3, 500, (2, 8)))], [Recorder()], "cpu", progress=False)
