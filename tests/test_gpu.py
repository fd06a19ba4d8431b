"""GPU behaviour: full-fp32 statistics and solves whatever the user's TF32 setting (these tests run on
the CPU too: they check the precision in force when each product is issued), and CPU/CUDA agreement of
a tiny-model prune and evaluation (skipped without CUDA).

The rest of the suite runs on the CPU (tests/conftest.py sets PRUNEKIT_DEVICE=cpu, which every
``device="auto"`` resolves to); the tests here ask for ``cuda`` explicitly."""

from __future__ import annotations

import math

import pytest
import torch
from torch.overrides import TorchFunctionMode

from prunekit.methods.hessian import HessianStats, damped_inverse_cholesky, full_fp32_matmul
from prunekit.recipe import Recipe
from tests.conftest import TATOEBA

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
MATMULS = {"addmm", "addmm_", "mm", "matmul", "__matmul__", "bmm", "baddbmm", "baddbmm_", "linalg_solve_triangular", "solve_triangular"}


def _precisions() -> dict[str, str]:
    return {"cuda": torch.backends.cuda.matmul.fp32_precision, "mkldnn": torch.backends.mkldnn.matmul.fp32_precision}


class PrecisionSpy(TorchFunctionMode):
    """Records the fp32 matmul precision in force at every matrix product issued while active."""

    def __init__(self):
        super().__init__()
        self.seen: list[tuple[str, dict[str, str]]] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in MATMULS:
            self.seen.append((name, _precisions()))
        return func(*args, **(kwargs or {}))


@pytest.fixture
def user_tf32():
    """A user who turned TF32 on with torch's new per-backend API (the legacy getter raises after that)."""
    before = _precisions()
    torch.backends.cuda.matmul.fp32_precision = "tf32"
    torch.backends.mkldnn.matmul.fp32_precision = "tf32"
    yield
    torch.backends.cuda.matmul.fp32_precision = before["cuda"]
    torch.backends.mkldnn.matmul.fp32_precision = before["mkldnn"]


def test_the_guard_forces_ieee_and_restores_the_new_api_setting(user_tf32):
    torch.backends.mkldnn.matmul.fp32_precision = "none"  # the two backends disagree: the legacy getter raises
    with pytest.raises(RuntimeError):
        torch.get_float32_matmul_precision()
    with full_fp32_matmul():
        assert _precisions() == {"cuda": "ieee", "mkldnn": "ieee"}
    assert _precisions() == {"cuda": "tf32", "mkldnn": "none"}


def test_the_guard_restores_a_legacy_setting():
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")
    try:
        with full_fp32_matmul():
            assert _precisions()["cuda"] == "ieee"
        assert torch.get_float32_matmul_precision() == "high" and torch.backends.cuda.matmul.allow_tf32
    finally:
        torch.set_float32_matmul_precision(before)


def test_hessian_statistics_and_factorisation_run_in_full_fp32_under_user_tf32(user_tf32):
    torch.manual_seed(0)
    for width in (64, 600):  # one GEMM; the lower-block-triangle path (≥ 2·256 wide)
        stats = HessianStats(width)
        with PrecisionSpy() as spy:
            stats.update(torch.randn(2, 16, width))
            damped_inverse_cholesky(stats.hessian, 0.01)
        assert spy.seen and all(p == {"cuda": "ieee", "mkldnn": "ieee"} for _, p in spy.seen), spy.seen[:3]
    assert _precisions() == {"cuda": "tf32", "mkldnn": "tf32"}  # the user's setting is back


@pytest.mark.parametrize("pattern", ["0.5", "2:4"])
def test_sparsegpt_error_feedback_runs_in_full_fp32_under_user_tf32(user_tf32, pattern):
    from prunekit.methods.sparsegpt import sparsegpt_solve
    from prunekit.recipe import parse_pattern

    torch.manual_seed(0)
    x = torch.randn(256, 300)
    weight = torch.randn(48, 300)
    recipe = Recipe("sparsegpt", pattern=parse_pattern(None, pattern) if ":" in pattern else parse_pattern(float(pattern)))
    hessian = 2 * x.T @ x / 256
    with PrecisionSpy() as spy:
        sparsegpt_solve(weight, hessian, recipe)
    assert any(name.startswith("addmm") for name, _ in spy.seen)  # the block error feedback
    assert all(p == {"cuda": "ieee", "mkldnn": "ieee"} for _, p in spy.seen), [s for s in spy.seen if s[1]["cuda"] != "ieee"][:3]


@needs_cuda
def test_cuda_statistics_match_float64_under_user_tf32(user_tf32):
    """TF32 keeps 10 mantissa bits (relative error ~1e-3 on XᵀX); full fp32 stays near 1e-6."""
    torch.manual_seed(0)
    x = torch.randn(4, 512, 1024, device="cuda")
    stats = HessianStats(1024, device="cuda")
    stats.update(x)
    flat = x.reshape(-1, 1024).double()
    reference = 2.0 / 4 * flat.T @ flat
    error = (stats.hessian.double() - reference).abs().max() / reference.abs().max()
    assert error < 1e-5, float(error)


@needs_cuda
@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_a_tiny_prune_and_eval_agree_between_cpu_and_cuda(tiny_llama, tmp_path, method):
    """The same prune on both devices, fp32. Tolerances: the masks may differ only where two scores tie
    to fp32 rounding (CPU and CUDA sum in different orders and break N:M ties differently), so at most
    1 % of the weights; the sparsity is exact on both; the perplexities within 1 % of each other."""
    import prunekit
    from prunekit.evaluation import EvaluationSpec, evaluate

    results = {}
    for device in ("cpu", "cuda"):
        pruned = prunekit.prune(str(tiny_llama), method,
                                calibration=prunekit.CalibrationSpec("en", source=str(TATOEBA), nsamples=8, seqlen=32),
                                output=prunekit.OutputSpec(tmp_path / device), engine=prunekit.EngineSpec(device),
                                progress=False)
        masks = {name: (p.detach().cpu() == 0) for name, p in pruned.model.named_parameters() if "proj" in name}
        ppl = evaluate(tmp_path / device, EvaluationSpec(langs="en", ppl_source=str(TATOEBA), seqlen=32, max_windows=8, device=device), progress=False)["perplexity"]["en"]["ppl"]
        results[device] = (masks, pruned.record["sparsity"]["overall"], ppl)
    (cpu_masks, cpu_sparsity, cpu_ppl), (gpu_masks, gpu_sparsity, gpu_ppl) = results["cpu"], results["cuda"]
    assert cpu_sparsity == gpu_sparsity
    differ = sum(int((cpu_masks[n] != gpu_masks[n]).sum()) for n in cpu_masks)
    total = sum(m.numel() for m in cpu_masks.values())
    assert differ <= 0.01 * total, f"{differ} of {total} mask entries differ"
    assert math.isfinite(gpu_ppl) and gpu_ppl == pytest.approx(cpu_ppl, rel=0.01)


def test_the_suite_is_pinned_to_the_cpu_and_a_worker_gets_its_own_device(monkeypatch):
    from prunekit.models import resolve_device

    assert resolve_device("auto") == torch.device("cpu")  # tests/conftest.py: PRUNEKIT_DEVICE=cpu
    monkeypatch.delenv("PRUNEKIT_DEVICE")
    assert resolve_device("auto").type == ("cuda" if CUDA else "cpu")
    if CUDA:
        monkeypatch.setenv("PRUNEKIT_DEVICE", f"cuda:{torch.cuda.device_count() - 1}")
        assert resolve_device("auto") == torch.device(f"cuda:{torch.cuda.device_count() - 1}")
        assert resolve_device("cpu") == torch.device("cpu")  # an explicit device wins
