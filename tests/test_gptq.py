"""GPTQ: grids, error feedback, equality with a plain reference implementation, and `prunekit quantize`."""

from __future__ import annotations

import json

import pytest
import torch

from prunekit.errors import ConfigError
from prunekit.methods import get_method
from prunekit.methods.hessian import HessianStats
from prunekit.recipe import Quantization, Recipe, parse_quantization, quantization_from_name, split_method_name

from tests.conftest import TATOEBA


# --------------------------------------------------------------------------------------------
# Independent references, written from the definitions (GPTQ paper, Algorithm 1; min-max grid)
# --------------------------------------------------------------------------------------------


def ref_grid(w: torch.Tensor, bits: int, symmetric: bool):
    """Min-max grid per row of w [rows, k]: returns (scale, zero) with values scale·(q − zero), q ∈ [0, 2^b − 1]."""
    levels = 2**bits - 1
    lo = w.min(dim=1).values.clamp(max=0)
    hi = w.max(dim=1).values.clamp(min=0)
    if symmetric:
        hi = torch.max(lo.abs(), hi)
        lo = -hi
    degenerate = (lo == 0) & (hi == 0)
    lo[degenerate], hi[degenerate] = -1.0, 1.0
    scale = (hi - lo) / levels
    zero = torch.full_like(scale, (levels + 1) / 2) if symmetric else torch.round(-lo / scale)
    return scale, zero


def ref_quant(w: torch.Tensor, scale, zero, bits: int) -> torch.Tensor:
    q = torch.round(w / scale) + zero
    q = torch.minimum(torch.maximum(q, torch.zeros_like(q)), torch.full_like(q, 2**bits - 1))
    return scale * (q - zero)


def ref_rtn(W: torch.Tensor, q: Quantization) -> torch.Tensor:
    """Round-to-nearest on the same per-group min-max grids, no error feedback."""
    out = torch.empty_like(W)
    size = W.shape[1] if q.group_size == -1 else q.group_size
    for start in range(0, W.shape[1], size):
        block = W[:, start : start + size]
        scale, zero = ref_grid(block, q.bits, q.symmetric)
        out[:, start : start + size] = ref_quant(block, scale[:, None], zero[:, None], q.bits)
    return out


def plain_gptq(W: torch.Tensor, H: torch.Tensor, q: Quantization, percdamp: float = 0.01) -> torch.Tensor:
    """GPTQ one column at a time: quantize column j, spread its error over all later columns at once."""
    W = W.clone().float()
    H = H.clone().float()
    cols = W.shape[1]
    if q.group_size == -1:
        row_scale, row_zero = ref_grid(W, q.bits, q.symmetric)  # fitted on the weights as given
    for d in range(cols):
        if H[d, d] == 0:
            H[d, d] = 1.0
            W[:, d] = 0.0
    static = q.act_order and q.static_groups and q.group_size != -1
    if static:
        grids = [ref_grid(W[:, s : s + q.group_size], q.bits, q.symmetric) for s in range(0, cols, q.group_size)]
    order = torch.arange(cols)
    if q.act_order:
        order = torch.argsort(torch.diag(H), descending=True, stable=True)
    W = W[:, order]
    H = H[order][:, order]
    damped = H + percdamp * torch.diag(H).mean() * torch.eye(cols)
    U = torch.linalg.cholesky(torch.linalg.inv(damped), upper=True)  # H⁻¹ = UᵀU
    Q = torch.zeros_like(W)
    for j in range(cols):
        if q.group_size == -1:
            scale, zero = row_scale, row_zero
        elif static:
            scale, zero = grids[int(order[j]) // q.group_size]
        elif j % q.group_size == 0:
            scale, zero = ref_grid(W[:, j : j + q.group_size], q.bits, q.symmetric)
        Q[:, j] = ref_quant(W[:, j], scale, zero, q.bits)
        err = (W[:, j] - Q[:, j]) / U[j, j]
        W[:, j:] -= torch.outer(err, U[j, j:])
    return Q[:, torch.argsort(order)]


def problem(rows: int, cols: int, seed: int = 0, dead: tuple[int, ...] = ()):
    """Weights and correlated, scale-varying calibration inputs (like real activations)."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(cols, cols, generator=g) / cols**0.5 + torch.eye(cols)
    X = (torch.randn(6, 40, cols, generator=g) @ mix) * (0.2 + 3 * torch.rand(cols, generator=g))
    X[..., list(dead)] = 0.0
    W = torch.randn(rows, cols, generator=g) * 0.05
    stats = HessianStats(cols)
    for batch in X.split(2):
        stats.update(batch)
    return W, X.reshape(-1, cols), stats


def gptq(W, stats, q: Quantization, blocksize: int = 128):
    return get_method("gptq").solve(W, stats, Recipe("gptq", quantization=q, blocksize=blocksize))


def output_error(W, Wq, X) -> float:
    return float(((W - Wq).double() @ X.double().T).square().sum())


def check_groups_on_grid(Wq: torch.Tensor, columns_of_groups: list[torch.Tensor], bits: int) -> None:
    """Every group of every row: at most 2^bits distinct values, all on one uniform grid of 2^bits levels."""
    for cols in columns_of_groups:
        for row in Wq[:, cols]:
            levels = torch.unique(row)
            assert levels.numel() <= 2**bits
            if levels.numel() < 2:
                continue
            # the grid step divides every gap; the smallest gap present may span several steps
            gaps = levels - levels[0]
            smallest = torch.diff(levels).min()
            for k in range(1, 2**bits):
                units = gaps / (smallest / k)
                if torch.allclose(units, units.round(), atol=1e-2):
                    break
            else:
                raise AssertionError(f"values {levels.tolist()} are not on a uniform grid")
            assert units.max().round() <= 2**bits - 1, "more than 2^bits levels between the extremes"


# --------------------------------------------------------------------------------------------
# The quantizer
# --------------------------------------------------------------------------------------------

CASES = [
    pytest.param(Quantization(4, 128), id="w4g128"),
    pytest.param(Quantization(4, 128, act_order=True, static_groups=True), id="w4g128-act"),
    pytest.param(Quantization(8, 512), id="w8g512"),
    pytest.param(Quantization(8, 512, act_order=True, static_groups=True), id="w8g512-act"),
]


@pytest.mark.parametrize("quantization", CASES)
def test_each_group_of_each_row_holds_at_most_two_to_the_bits_values(quantization):
    W, _, stats = problem(rows=12, cols=1024, seed=1)
    Wq = gptq(W, stats, quantization).weight
    groups = [torch.arange(s, s + quantization.group_size) for s in range(0, 1024, quantization.group_size)]
    check_groups_on_grid(Wq, groups, quantization.bits)
    # the test can fail: the dense weights hold a distinct value per column
    assert torch.unique(W[0, :512]).numel() > 2**quantization.bits


def test_act_order_with_dynamic_groups_fits_groups_in_processing_order():
    W, _, stats = problem(rows=12, cols=256, seed=2)
    q = Quantization(4, 64, act_order=True, static_groups=False)
    Wq = gptq(W, stats, q).weight
    order = torch.argsort(torch.diag(stats.hessian), descending=True, stable=True)
    check_groups_on_grid(Wq, [order[s : s + 64] for s in range(0, 256, 64)], 4)


@pytest.mark.parametrize(
    "quantization",
    CASES + [pytest.param(Quantization(4, -1), id="w4-per-channel"), pytest.param(Quantization(4, 128, symmetric=True), id="w4g128-sym")],
)
def test_gptq_output_error_is_at_most_round_to_nearest(quantization):
    W, X, stats = problem(rows=16, cols=1024, seed=3)
    solution = gptq(W, stats, quantization)
    gptq_error = output_error(W, solution.weight, X)
    rtn_error = output_error(W, ref_rtn(W, quantization), X)
    assert gptq_error <= rtn_error
    assert gptq_error < 0.8 * rtn_error  # error feedback helps by a clear margin on correlated inputs
    assert solution.mask is None and torch.isfinite(solution.weight).all()


REFERENCE_CASES = [
    pytest.param(Quantization(4, 128), 128, id="w4g128"),
    pytest.param(Quantization(8, 128), 128, id="w8g128"),
    pytest.param(Quantization(4, 64, symmetric=True), 32, id="w4g64-sym-block32"),
    pytest.param(Quantization(4, 128, act_order=True, static_groups=True), 32, id="w4g128-act-block32"),
    pytest.param(Quantization(8, 64, act_order=True, static_groups=True), 128, id="w8g64-act"),
    pytest.param(Quantization(4, 64, act_order=True, static_groups=False), 64, id="w4g64-actdyn"),
    pytest.param(Quantization(3, -1, act_order=True), 128, id="w3-per-channel-act"),
]


@pytest.mark.parametrize("quantization, blocksize", REFERENCE_CASES)
def test_weights_equal_plain_column_by_column_gptq(quantization, blocksize):
    W, _, stats = problem(rows=16, cols=256, seed=4, dead=(5, 77))
    solution = gptq(W, stats, quantization, blocksize=blocksize)
    expected = plain_gptq(W, stats.hessian, quantization)
    assert not torch.equal(expected, ref_rtn(W, quantization))  # the reference does feed errors back
    torch.testing.assert_close(solution.weight, expected, rtol=1e-5, atol=1e-5 * float(expected.abs().max()))
    assert (solution.weight[:, [5, 77]] == 0).all()  # dead inputs: weights zeroed
    info = solution.info
    assert info["bits"] == quantization.bits and info["group_size"] == quantization.group_size
    assert info["dead_columns"] == 2 and info["damping"] == 0.01 and info["loss"] > 0
    json.dumps(info)  # small and JSON-serializable


def test_singular_hessian_retries_with_more_damping_and_stays_finite():
    W, _, _ = problem(rows=8, cols=128, seed=5)
    stats = HessianStats(128)
    stats.update(torch.randn(1, 4, 128))  # rank 4
    stats.xxt[0, 1] = stats.xxt[1, 0] = stats.xxt[0, 0] * 10  # and indefinite: 1 % damping is not enough
    solution = gptq(W, stats, Quantization(4, 64))
    assert torch.isfinite(solution.weight).all()
    assert solution.info["damping"] > 0.01


# --------------------------------------------------------------------------------------------
# Options and names
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bits, group_size, message", [(5, 128, "--bits"), (4, 0, "--group-size"), (4, -2, "--group-size")])
def test_bad_quantization_options_raise_config_errors(bits, group_size, message):
    with pytest.raises(ConfigError, match=message):
        parse_quantization(bits, group_size)


def test_sweep_method_names_round_trip_to_quantizations():
    assert quantization_from_name("gptq-w4g128") == Quantization(4, 128)
    assert quantization_from_name("gptq-w8g128") == Quantization(8, 128)
    assert quantization_from_name("gptq-w8") == Quantization(8, -1)
    assert quantization_from_name("gptq") == Quantization()
    assert quantization_from_name("wanda") is None
    assert split_method_name("gptq-w4g128-act-sym") == ("gptq", Quantization(4, 128, True, True, True))
    assert split_method_name("sparsegpt") == ("sparsegpt", None)
    for q in [Quantization(4, 128), Quantization(8, -1, symmetric=True), Quantization(3, 64, True, False)]:
        assert quantization_from_name(f"gptq-{q.slug}") == q
    with pytest.raises(ConfigError):
        quantization_from_name("gptq-w5g128")
    with pytest.raises(ConfigError):
        quantization_from_name("gptq-4bit")


# --------------------------------------------------------------------------------------------
# Real layer inputs through the engine, and `prunekit quantize`
# --------------------------------------------------------------------------------------------


def test_gptq_beats_rtn_on_every_linear_of_a_real_decoder_layer(tiny_llama):
    from prunekit.calibration import build_calibration_set
    from prunekit.engine import capture_layer_inputs, run_layer
    from prunekit.models import find_decoder_layers, linear_sublayers, load_model

    model, tokenizer, _ = load_model(str(tiny_llama))
    calib = build_calibration_set(tokenizer, "de", str(TATOEBA), nsamples=4, seqlen=32, seed=0)
    hidden, kwargs = capture_layer_inputs(model, calib.input_ids, batch_size=4)
    layer = find_decoder_layers(model)[1][0]
    inputs: dict[str, list[torch.Tensor]] = {}
    handles = [
        m.register_forward_pre_hook(lambda mod, args, name=name: inputs.setdefault(name, []).append(args[0].detach()))
        for name, m in linear_sublayers(layer).items()
    ]
    with torch.no_grad():
        for h in hidden:
            run_layer(layer, h, kwargs[0])
    for handle in handles:
        handle.remove()
    q = Quantization(4, 32)
    for name, module in linear_sublayers(layer).items():
        X = torch.cat(inputs[name]).reshape(-1, module.in_features)
        stats = HessianStats(module.in_features)
        for x in inputs[name]:
            stats.update(x)
        W = module.weight.detach()
        Wq = gptq(W, stats, q).weight
        assert output_error(W, Wq, X) <= output_error(W, ref_rtn(W, q), X), name


def _invoke(args):
    from typer.testing import CliRunner

    import prunekit.cli.quantize  # noqa: F401  (registers the command)
    from prunekit.cli.app import app

    return CliRunner().invoke(app, args)


def test_quantize_cli_dense_format_writes_fake_quantized_weights_transformers_loads(tiny_llama, tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "w4g32"
    result = _invoke([
        "quantize", str(tiny_llama), "--bits", "4", "--group-size", "32", "--calib", "en",
        "--calib-source", str(TATOEBA), "--nsamples", "4", "--seqlen", "32", "--out", str(out), "--format", "dense",
    ])
    assert result.exit_code == 0, result.output
    assert "relative output error" in result.output
    record = json.loads((out / "prunekit.json").read_text())
    assert record["recipe"]["method"] == "gptq" and record["recipe"]["kind"] == "quantize"
    assert record["recipe"]["quantization"]["bits"] == 4 and record["recipe"]["quantization"]["group_size"] == 32
    assert record["command"].startswith("prunekit quantize") and "--bits 4 --group-size 32" in record["command"]
    assert "--format dense" in record["command"]
    assert record["calibration"]["nsamples"] == 4 and record["calibration"]["seqlen"] == 32
    assert "sparsity" not in record and "prune_s" not in record["timings"] and record["timings"]["quantize_s"] > 0
    summary = record["quantization"]
    assert summary["format"] == "dense" and summary["bits"] == 4 and summary["group_size"] == 32
    module = summary["per_layer"][0]["modules"][0]
    assert module["info"]["bits"] == 4 and 0 < module["relative_error"] < 0.1
    assert "grid" not in module["info"]
    assert set(summary["relative_error_per_module"]) == {"q", "k", "v", "attn.out", "ffn.gate", "ffn.up", "ffn.down"}
    assert "quantization_config" not in json.loads((out / "config.json").read_text())

    model = AutoModelForCausalLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    ids = tok("Das ist", return_tensors="pt").input_ids
    generated = model.generate(ids, max_new_tokens=5, do_sample=False)
    assert generated.shape[1] == ids.shape[1] + 5

    saved = load_file(out / "model.safetensors")
    dense = load_file(tiny_llama / "model.safetensors")
    for key in ["model.layers.0.self_attn.q_proj.weight", "model.layers.2.mlp.down_proj.weight"]:
        weight = saved[key]
        assert not torch.equal(weight, dense[key])
        check_groups_on_grid(weight, [torch.arange(s, s + 32) for s in range(0, weight.shape[1], 32)], 4)
    torch.testing.assert_close(saved["model.embed_tokens.weight"], dense["model.embed_tokens.weight"])


@pytest.mark.parametrize("args, message", [
    (["--bits", "5"], "--bits"), (["--group-size", "0"], "--group-size"), (["--format", "gguf"], "--format"),
    (["--act-order", "--dynamic-groups"], "--format dense"),
])
def test_quantize_cli_rejects_bad_options_with_one_line_and_no_output(tiny_llama, tmp_path, args, message):
    out = tmp_path / "never"
    result = _invoke(["quantize", str(tiny_llama), "--calib-source", str(TATOEBA), "--out", str(out), *args])
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0]
    assert not out.exists()


@pytest.mark.parametrize("quantization, blocksize", REFERENCE_CASES)
def test_solution_grid_is_the_grid_the_weights_lie_on(quantization, blocksize):
    """GPTQ returns its grids (for the packed checkpoint): every weight is scale·(q − zero) of its
    column's group, with an integer q in [0, 2^bits − 1]."""
    W, _, stats = problem(rows=16, cols=256, seed=4, dead=(5, 77))
    solution = gptq(W, stats, quantization, blocksize=blocksize)
    grid = solution.grid
    assert (grid.bits, grid.group_size, grid.symmetric) == (quantization.bits, quantization.group_size, quantization.symmetric)
    if quantization.group_size == -1:
        index = torch.zeros(256, dtype=torch.long)
    elif grid.g_idx is not None:
        assert quantization.act_order and not quantization.static_groups
        index = grid.g_idx.long()
        assert torch.bincount(index).tolist() == [quantization.group_size] * (256 // quantization.group_size)
    else:
        index = torch.arange(256) // quantization.group_size
    q = solution.weight / grid.scale[:, index] + grid.zero[:, index]
    torch.testing.assert_close(q, q.round(), rtol=0, atol=1e-3)
    assert q.round().min() >= 0 and q.round().max() <= 2**quantization.bits - 1


def test_rtn_grid_is_the_reference_min_max_grid_and_bf16_scales_are_bf16_values():
    W = problem(rows=8, cols=128, seed=2)[0]
    q = Quantization(4, 32, symmetric=False)  # the asymmetric min-max grid (--asymmetric)
    solution = get_method("rtn").solve(W, None, Recipe("rtn", quantization=q))
    for g in range(4):
        scale, zero = ref_grid(W[:, g * 32 : (g + 1) * 32], 4, False)
        torch.testing.assert_close(solution.grid.scale[:, g], scale, rtol=0, atol=0)
        torch.testing.assert_close(solution.grid.zero[:, g], zero, rtol=0, atol=0)
    half = get_method("rtn").solve(W.bfloat16(), None, Recipe("rtn", quantization=q))
    assert torch.equal(half.grid.scale.bfloat16().float(), half.grid.scale)  # representable in the checkpoint's dtype
    torch.testing.assert_close(half.grid.scale, solution.grid.scale, rtol=2**-7, atol=0)
