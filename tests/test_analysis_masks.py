"""Mask IoU / IoMin / seeds / streaming of prunekit.analysis (analysis-spec §2, study App. D.3)."""

from __future__ import annotations

import json
import shutil
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch
from tests.conftest import build_tiny_model
from safetensors.torch import load_file, save_file

from prunekit.analysis import masks as M
from prunekit.analysis.checkpoints import TensorReader, linear_key, open_checkpoint
from prunekit.errors import ConfigError, ModelError

LINEAR_SUFFIXES = ("q_proj.weight", "k_proj.weight", "v_proj.weight", "o_proj.weight",
                   "gate_proj.weight", "up_proj.weight", "down_proj.weight")


def copy_model(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def edit_weights(model_dir: Path, edit) -> dict[str, torch.Tensor]:
    """Apply ``edit(name, tensor) -> tensor`` to the decoder linears of a saved model; return the new linears."""
    file = model_dir / "model.safetensors"
    state = load_file(file)
    for name in list(state):
        if name.endswith(LINEAR_SUFFIXES):
            state[name] = edit(name, state[name].clone()).contiguous()
    save_file(state, file, metadata={"format": "pt"})
    return {n: t for n, t in state.items() if n.endswith(LINEAR_SUFFIXES)}


def random_mask(name: str, shape, density: float, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed * 1000 + sum(map(ord, name)))
    return torch.rand(shape, generator=gen) < density


@pytest.fixture(scope="module")
def base(tmp_path_factory, tokenizer) -> Path:
    return build_tiny_model("llama", tokenizer, tmp_path_factory.mktemp("masks") / "base", seed=3)


def pruned_copy(base: Path, dst: Path, seed: int, density: float = 0.5) -> dict[str, np.ndarray]:
    """A copy of ``base`` with a random ``density`` of every linear set to zero; returns the masks."""
    copy_model(base, dst)
    masks = {}

    def edit(name, w):
        m = random_mask(name, w.shape, density, seed)
        masks[name] = m.numpy()
        w[m] = 0.0
        return w

    edit_weights(dst, edit)
    return masks


# ---------------------------------------------------------------- constructed masks, known answers


def test_iou_iomin_and_chance_of_constructed_masks_match_hand_counts():
    a = np.array([1, 1, 0, 0, 1, 0, 1, 0], dtype=bool)
    b = np.array([1, 0, 1, 0, 1, 0, 0, 0], dtype=bool)
    stats = M.overlap_of_bools([a, b])
    assert stats["intersection"] == 2 and stats["union"] == 5
    assert stats["iou"] == pytest.approx(2 / 5)
    assert stats["iomin"] == pytest.approx(2 / 3)
    assert stats["densities"] == [0.5, 3 / 8]
    rho, rho2 = 0.5, 3 / 8
    assert stats["chance"] == pytest.approx(rho * rho2 / (rho + rho2 - rho * rho2))


def test_chance_level_is_one_third_at_half_sparsity_and_random_masks_reach_it():
    assert M.chance_level([0.5, 0.5]) == pytest.approx(1 / 3)
    rng = np.random.default_rng(0)
    a, b = rng.random(200_000) < 0.5, rng.random(200_000) < 0.5
    assert M.overlap_of_bools([a, b])["iou"] == pytest.approx(1 / 3, abs=0.01)


def test_empty_masks_have_iou_one_and_undefined_iomin():
    empty = np.zeros(13, dtype=bool)
    stats = M.overlap_of_bools([empty, empty])
    assert stats["iou"] == 1.0 and stats["iomin"] is None and stats["chance"] is None


def test_hf_tensor_names_map_to_the_study_module_names():
    assert linear_key("model.layers.12.self_attn.o_proj.weight").module == "attn.out"
    assert linear_key("model.language_model.layers.3.mlp.gate_proj.weight").layer == 3
    assert linear_key("model.layers.0.mlp.down_proj.weight").module == "ffn.down"
    assert linear_key("model.layers.0.input_layernorm.weight") is None


# ---------------------------------------------------------------- checkpoints


def test_checkpoint_against_itself_gives_one_and_against_its_complement_zero(base, tmp_path):
    masks = pruned_copy(base, tmp_path / "a", seed=1)
    comp = copy_model(base, tmp_path / "complement")
    edit_weights(comp, lambda name, w: torch.where(torch.from_numpy(masks[name]), w, torch.zeros_like(w)))

    same = M.compare_masks(tmp_path / "a", tmp_path / "a", progress=False)["comparisons"]["between"]
    assert same["global"]["iou"] == 1.0
    assert all(cell["iou"] == 1.0 for cell in same["per_layer"])
    assert len(same["per_layer"]) == 3 * 7
    assert same["global"]["chance"] == pytest.approx(1 / 3, abs=0.01)

    other = M.compare_masks(tmp_path / "a", comp, progress=False)["comparisons"]["between"]
    assert other["global"]["iou"] == 0.0 and other["global"]["intersection"] == 0
    assert other["global"]["union"] == other["global"]["numel"]


def test_pairwise_counts_equal_a_numpy_reference_per_layer_and_module(base, tmp_path):
    ma = pruned_copy(base, tmp_path / "a", seed=1)
    mb = pruned_copy(base, tmp_path / "b", seed=2, density=0.3)
    result = M.compare_masks(tmp_path / "a", tmp_path / "b", progress=False)
    between = result["comparisons"]["between"]
    for cell in between["per_layer"]:
        a, b = ma[cell["tensor"]].ravel(), mb[cell["tensor"]].ravel()
        # a random weight is never exactly zero before pruning, so [W == 0] is the planted mask
        assert cell["intersection"] == int((a & b).sum())
        assert cell["union"] == int((a | b).sum())
        assert cell["iou"] == pytest.approx((a & b).sum() / (a | b).sum())
        assert cell["iomin"] == pytest.approx((a & b).sum() / min(a.sum(), b.sum()))
    # micro aggregate per module = Σ∩ / Σ∪ over layers
    for module, agg in between["per_module"].items():
        cells = [c for c in between["per_layer"] if c["module"] == module]
        assert agg["iou"] == pytest.approx(sum(c["intersection"] for c in cells) / sum(c["union"] for c in cells))
        assert agg["iou_layer_mean"] == pytest.approx(np.mean([c["iou"] for c in cells]))
    assert result["checkpoints"]["b"]["measured_sparsity"] == pytest.approx(0.3, abs=0.02)
    assert "within_a" not in result["comparisons"]


def test_seed_intersections_and_unions_match_constructed_masks(base, tmp_path):
    side_a = [pruned_copy(base, tmp_path / f"a{s}", seed=s) for s in (1, 2, 3)]
    side_b = [pruned_copy(base, tmp_path / f"b{s}", seed=s) for s in (7, 8)]
    result = M.compare_masks(
        tmp_path / "a1", tmp_path / "b7", seeds_a=[tmp_path / "a2", tmp_path / "a3"], seeds_b=[tmp_path / "b8"],
        progress=False,
    )
    comps = result["comparisons"]
    assert set(comps) == {"between", "within_a", "within_b"}
    for cell_a, cell_b, cell in zip(comps["within_a"]["per_layer"], comps["within_b"]["per_layer"],
                                    comps["between"]["per_layer"]):
        name = cell["tensor"]
        ia = side_a[0][name] & side_a[1][name] & side_a[2][name]
        ua = side_a[0][name] | side_a[1][name] | side_a[2][name]
        ib = side_b[0][name] & side_b[1][name]
        assert cell_a["intersection"] == ia.sum() and cell_a["union"] == ua.sum()
        assert cell_a["iou"] == pytest.approx(ia.sum() / ua.sum())
        assert cell_b["intersection"] == ib.sum()
        # between languages: IoU of the two seed intersections
        assert cell["intersection"] == (ia & ib).sum() and cell["union"] == (ia | ib).sum()
    # three independent 50 % masks: chance |∩|/|∪| = 1/8 / (7/8) = 1/7
    assert comps["within_a"]["global"]["chance"] == pytest.approx(1 / 7, abs=0.01)
    assert comps["within_a"]["global"]["iou"] == pytest.approx(1 / 7, abs=0.01)

    # The public compare takes each side as a list of its seeds (A first) and gives the same mask analysis.
    from prunekit.analysis import CompareSpec, compare

    public = compare([tmp_path / "a1", tmp_path / "a2", tmp_path / "a3"], [tmp_path / "b7", tmp_path / "b8"],
                     CompareSpec(only="masks"), progress=False)
    assert public["masks"]["comparisons"] == comps
    assert set(public["models"]) == {"a", "a#2", "a#3", "b", "b#2"}
    with pytest.raises(ConfigError, match="side A names no checkpoint"):
        compare([], tmp_path / "b7", CompareSpec(only="masks"), progress=False)


def test_dense_aware_masks_exclude_and_count_natively_zero_weights(base, tmp_path):
    dense = copy_model(base, tmp_path / "dense")
    native = {}

    def zero_some(name, w):
        native[name] = random_mask(name, w.shape, 0.1, seed=99).numpy()
        w[torch.from_numpy(native[name])] = 0.0
        return w

    edit_weights(dense, zero_some)
    planted = {}
    for label, seed in (("a", 1), ("b", 2)):
        pruned = copy_model(dense, tmp_path / label)

        def prune(name, w, seed=seed, label=label):
            m = random_mask(name, w.shape, 0.5, seed)
            planted[(label, name)] = m.numpy()
            w[m] = 0.0
            return w

        edit_weights(pruned, prune)
    result = M.compare_masks(tmp_path / "a", tmp_path / "b", dense=dense, progress=False)
    assert result["dense_aware"]
    assert result["natively_zero"]["total"] == sum(int(m.sum()) for m in native.values())
    for cell in result["comparisons"]["between"]["per_layer"]:
        name = cell["tensor"]
        keep = ~native[name]
        a, b = planted[("a", name)] & keep, planted[("b", name)] & keep
        assert cell["natively_zero"] == native[name].sum()
        assert cell["counts"] == [a.sum(), b.sum()]
        assert cell["intersection"] == (a & b).sum() and cell["union"] == (a | b).sum()
    # without the dense model the natively-zero weights count as pruned in both: a higher IoU
    plain = M.compare_masks(tmp_path / "a", tmp_path / "b", progress=False)["comparisons"]["between"]["global"]
    assert plain["iou"] > result["comparisons"]["between"]["global"]["iou"]


def test_sharded_safetensors_read_like_a_single_file(base, tmp_path, tokenizer):
    masks = pruned_copy(base, tmp_path / "single", seed=4)
    state = load_file(tmp_path / "single" / "model.safetensors")
    names = sorted(state)
    halves = [names[: len(names) // 2], names[len(names) // 2:]]
    out = tmp_path / "sharded"
    out.mkdir()
    shutil.copy(tmp_path / "single" / "config.json", out / "config.json")
    weight_map = {}
    for i, part in enumerate(halves):
        file = f"model-{i + 1:05d}-of-00002.safetensors"
        save_file({n: state[n] for n in part}, out / file, metadata={"format": "pt"})
        weight_map.update({n: file for n in part})
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    ckpt = open_checkpoint(out, "sharded")
    assert ckpt.fmt == "safetensors" and len(set(ckpt.files.values())) == 2
    result = M.compare_masks(tmp_path / "single", out, progress=False)
    assert result["comparisons"]["between"]["global"]["iou"] == 1.0
    expected = sum(int(m.sum()) for m in masks.values())
    assert result["checkpoints"]["b"]["zeros"] == expected


@pytest.mark.parametrize("sharded", [False, True])
def test_pickle_only_checkpoints_are_refused_without_unpickling(sharded, base, tmp_path, monkeypatch):
    """prunekit loads no pickle (issue 26 §2): a .bin-only checkpoint is refused with how to convert it,
    before anything is read, and never with the advice to turn weights_only off."""
    out = tmp_path / "bin"
    out.mkdir()
    shutil.copy(base / "config.json", out / "config.json")
    state = load_file(base / "model.safetensors")
    if sharded:
        torch.save(state, out / "pytorch_model-00001-of-00001.bin")
        index = {"metadata": {}, "weight_map": {n: "pytorch_model-00001-of-00001.bin" for n in state}}
        (out / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    else:
        torch.save(state, out / "pytorch_model.bin")
    calls = []
    monkeypatch.setattr(torch, "load", lambda *args, **kwargs: calls.append(kwargs))
    with pytest.raises(ModelError, match="only as PyTorch pickle files") as caught:
        M.compare_masks(out, base, progress=False)
    assert "safe_serialization=True" in str(caught.value) and "weights_only=False" not in str(caught.value)
    assert calls == []


# ---------------------------------------------------------------- streaming


class _PeakMemory:
    def __enter__(self):
        tracemalloc.start()
        tracemalloc.reset_peak()
        self.base = tracemalloc.get_traced_memory()[0]
        return self

    def __exit__(self, *exc):
        self.peak = tracemalloc.get_traced_memory()[1] - self.base
        tracemalloc.stop()


def test_mask_comparison_streams_tensors_and_adds_less_than_one_and_a_half_largest_tensors(tmp_path, tokenizer):
    big = build_tiny_model("llama", tokenizer, tmp_path / "big", seed=5, intermediate_size=8192)
    pruned_copy(big, tmp_path / "a", seed=1)
    pruned_copy(big, tmp_path / "b", seed=2)
    a, b = open_checkpoint(tmp_path / "a", "a"), open_checkpoint(tmp_path / "b", "b")
    largest = max(int(np.prod(s)) * 4 for s in a.shapes.values())  # fp32
    assert largest == 8192 * 64 * 4
    whole_model = sum(int(np.prod(s)) * 4 for s in a.shapes.values())
    assert whole_model > 8 * largest  # loading a whole model would fail the bound by far

    # tracemalloc sees every numpy buffer: row blocks read from safetensors, bool and packed masks
    with _PeakMemory() as mem:
        result = M.compare_masks(a, b, progress=False)
    assert result["comparisons"]["between"]["global"]["iou"] == pytest.approx(1 / 3, abs=0.01)
    print(f"peak {mem.peak / largest:.3f} x largest tensor")
    assert 0.5 * largest < mem.peak < 1.5 * largest, (mem.peak, largest)

    # with small row blocks the peak shrinks far below one tensor
    with _PeakMemory() as small:
        again = M.compare_masks(a, b, chunk_elements=8192, progress=False)
    assert again["comparisons"]["between"]["global"] == result["comparisons"]["between"]["global"]
    print(f"peak with 8192-element blocks {small.peak / largest:.3f} x largest tensor")
    assert small.peak < 0.4 * largest, (small.peak, largest)


def test_reader_blocks_reassemble_the_tensor_mask(base, tmp_path):
    masks = pruned_copy(base, tmp_path / "a", seed=6)
    ckpt = open_checkpoint(tmp_path / "a", "a")
    name = "model.layers.1.mlp.down_proj.weight"
    with TensorReader(ckpt) as reader:
        for chunk in (1, 7, 64, 10**7):
            packed = M.packed_zero_mask(reader, name, chunk)
            assert np.array_equal(np.unpackbits(packed)[: masks[name].size], masks[name].ravel())


# ---------------------------------------------------------------- bad input


def test_different_shapes_raise_an_error_naming_the_first_mismatching_tensor(base, tmp_path, tokenizer):
    wide = build_tiny_model("llama", tokenizer, tmp_path / "wide", seed=3, intermediate_size=256)
    with pytest.raises(ModelError, match=r"model\.layers\.0\.mlp\.down_proj\.weight.*\[64, 128\].*\[64, 256\]"):
        M.compare_masks(base, wide, progress=False)


def test_different_architectures_raise_an_error_naming_the_first_mismatching_tensor(base, tmp_path, tokenizer):
    gemma = build_tiny_model("gemma3", tokenizer, tmp_path / "gemma", seed=3)
    with pytest.raises(ModelError, match=r"model_type 'llama' vs 'gemma3_text'.*first mismatching tensor 'model\.layers\.0\."):
        M.compare_masks(base, gemma, progress=False)


def test_a_dense_model_passed_as_pruned_warns_with_its_measured_sparsity(base, tmp_path):
    pruned_copy(base, tmp_path / "a", seed=1)
    with pytest.warns(M.DenseCheckpointWarning, match=r"'.*base'\) looks dense: measured sparsity 0\.0000"):
        result = M.compare_masks(tmp_path / "a", base, progress=False)
    assert any("looks dense" in w for w in result["warnings"])
    assert result["checkpoints"]["b"]["measured_sparsity"] == 0.0


def test_bfloat16_and_float16_checkpoints_give_the_same_masks_as_float32(base, tmp_path):
    masks = pruned_copy(base, tmp_path / "fp32", seed=8)
    for dtype in (torch.bfloat16, torch.float16):
        out = copy_model(tmp_path / "fp32", tmp_path / str(dtype).split(".")[-1])
        state = load_file(out / "model.safetensors")
        save_file({k: v.to(dtype) for k, v in state.items()}, out / "model.safetensors", metadata={"format": "pt"})
        result = M.compare_masks(tmp_path / "fp32", out, progress=False)
        assert result["comparisons"]["between"]["global"]["iou"] == 1.0
        assert result["checkpoints"]["b"]["zeros"] == sum(int(m.sum()) for m in masks.values())
