"""Each method against an independent straight-from-the-paper reference on the same calibration tensors."""

from __future__ import annotations

import pytest
import torch

from prunekit.methods import get_method
from prunekit.methods.hessian import HessianStats
from prunekit.methods.magnitude import magnitude_mask
from prunekit.methods.sparsegpt import sparsegpt_solve
from prunekit.methods.wanda import WandaStats, wanda_mask
from prunekit.recipe import Recipe, parse_pattern


def make_layer(out_features=48, in_features=64, sequences=6, tokens=40, seed=0):
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(out_features, in_features, generator=gen)
    # Input columns with very different scales, as real activations have (outlier features).
    scales = torch.exp(torch.randn(in_features, generator=gen))
    x = torch.randn(sequences, tokens, in_features, generator=gen) * scales
    return weight, x


def recipe(method, sparsity=None, pattern=None):
    return Recipe(method, pattern=parse_pattern(sparsity, pattern))


# --- independent references (slow loops, float64) -------------------------------------------

def reference_wanda_mask(weight, x, sparsity=None, n=0, m=0):
    """Wanda paper: S_ij = |W_ij|·‖X_j‖₂ over all calibration tokens; compare within each output row."""
    X = x.reshape(-1, x.shape[-1]).double()
    norms = [float(torch.sqrt(sum(X[t, j] ** 2 for t in range(X.shape[0])))) for j in range(X.shape[1])]
    rows, cols = weight.shape
    mask = torch.zeros(rows, cols, dtype=torch.bool)
    for i in range(rows):
        scores = [abs(float(weight[i, j])) * norms[j] for j in range(cols)]
        if m:
            for start in range(0, cols, m):
                group = sorted(range(start, start + m), key=lambda j: scores[j])
                for j in group[:n]:
                    mask[i, j] = True
        else:
            for j in sorted(range(cols), key=lambda j: scores[j])[: int(cols * sparsity)]:
                mask[i, j] = True
    return mask


def reference_magnitude_mask(weight, sparsity=None, n=0, m=0):
    rows, cols = weight.shape
    mask = torch.zeros(rows, cols, dtype=torch.bool)
    if m:
        for i in range(rows):
            for start in range(0, cols, m):
                group = sorted(range(start, start + m), key=lambda j: abs(float(weight[i, j])))
                for j in group[:n]:
                    mask[i, j] = True
        return mask
    flat = sorted(((abs(float(weight[i, j])), i, j) for i in range(rows) for j in range(cols)))
    for _, i, j in flat[: int(rows * cols * sparsity)]:
        mask[i, j] = True
    return mask


def reference_sparsegpt(weight, x, sparsity=None, n=0, m=0, blocksize=128, percdamp=0.01):
    """SparseGPT Algorithm 1 (Frantar & Alistarh 2023) in float64, column by column."""
    W = weight.double().clone()
    X = x.reshape(-1, x.shape[-1]).double()
    H = 2.0 / x.shape[0] * X.T @ X
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    H = H + percdamp * torch.mean(torch.diag(H)) * torch.eye(H.shape[0], dtype=torch.float64)
    Hinv = torch.linalg.cholesky(torch.linalg.inv(H), upper=True)
    rows, cols = W.shape
    mask = torch.zeros(rows, cols, dtype=torch.bool)
    for b0 in range(0, cols, blocksize):
        b1 = min(b0 + blocksize, cols)
        if not m:
            scores = [(float(W[i, j] ** 2 / Hinv[j, j] ** 2), i, j) for i in range(rows) for j in range(b0, b1)]
            for _, i, j in sorted(scores)[: int(len(scores) * sparsity)]:
                mask[i, j] = True
        for j in range(b0, b1):
            if m and (j - b0) % m == 0:
                for i in range(rows):
                    group = sorted(range(j, j + m), key=lambda c: float(W[i, c] ** 2 / Hinv[c, c] ** 2))
                    for c in group[:n]:
                        mask[i, c] = True
            for i in range(rows):
                if mask[i, j]:
                    err = W[i, j] / Hinv[j, j]
                    W[i, j:] -= err * Hinv[j, j:]  # the OBS update of the remaining weights of the row
                    W[i, j] = 0.0
    return W, mask


def output_error(weight, new_weight, x):
    X = x.reshape(-1, x.shape[-1]).double()
    return float(((weight.double() - new_weight.double()) @ X.T).square().sum())


def stats_of(cls, x, batch=2):
    stats = cls(x.shape[-1])
    for start in range(0, x.shape[0], batch):
        stats.update(x[start : start + batch])
    return stats


# --- tests ---------------------------------------------------------------------------------

@pytest.mark.parametrize("sparsity,pattern", [(0.5, None), (0.3, None), (None, "2:4"), (None, "4:8")])
def test_wanda_mask_matches_paper_reference(sparsity, pattern):
    weight, x = make_layer()
    r = recipe("wanda", sparsity, pattern)
    mask = wanda_mask(weight, stats_of(WandaStats, x), r)
    expected = reference_wanda_mask(weight, x, r.pattern.sparsity, r.pattern.n, r.pattern.m)
    assert torch.equal(mask, expected)


@pytest.mark.parametrize("sparsity,pattern", [(0.5, None), (0.7, None), (None, "2:4")])
def test_magnitude_mask_matches_paper_reference(sparsity, pattern):
    weight, _ = make_layer(seed=3)
    r = recipe("magnitude", sparsity, pattern)
    expected = reference_magnitude_mask(weight, r.pattern.sparsity, r.pattern.n, r.pattern.m)
    assert torch.equal(magnitude_mask(weight, r), expected)


@pytest.mark.parametrize("sparsity,pattern,blocksize", [(0.5, None, 128), (0.5, None, 16), (None, "2:4", 128), (None, "4:8", 32)])
def test_sparsegpt_weights_match_plain_implementation(sparsity, pattern, blocksize):
    weight, x = make_layer(seed=1)
    r = Recipe("sparsegpt", pattern=parse_pattern(sparsity, pattern), blocksize=blocksize)
    solution = sparsegpt_solve(weight, stats_of(HessianStats, x).hessian, r)
    ref_weight, ref_mask = reference_sparsegpt(weight, x, r.pattern.sparsity, r.pattern.n, r.pattern.m, blocksize)
    assert torch.equal(solution.mask, ref_mask)
    relative = (solution.weight.double() - ref_weight).norm() / ref_weight.norm()
    assert relative < 1e-5
    assert torch.isfinite(solution.weight).all()


@pytest.mark.parametrize("pattern", [None, "2:4"])
def test_sparsegpt_error_is_at_most_wanda_and_magnitude(pattern):
    weight, x = make_layer(seed=2)
    errors = {}
    for name in ("magnitude", "wanda", "sparsegpt"):
        method = get_method(name)
        stats = stats_of(method.new_statistics, x) if method.new_statistics else None
        errors[name] = output_error(weight, method.solve(weight, stats, recipe(name, 0.5 if pattern is None else None, pattern)).weight, x)
    assert errors["sparsegpt"] <= errors["wanda"]
    assert errors["sparsegpt"] <= errors["magnitude"]


def test_exact_sparsity_per_row_for_wanda_and_per_matrix_for_magnitude():
    weight, x = make_layer(out_features=30, in_features=70)
    for sparsity in (0.1, 0.5, 0.9, 0.33):
        mask = wanda_mask(weight, stats_of(WandaStats, x), recipe("wanda", sparsity))
        assert (mask.sum(dim=1) == int(70 * sparsity)).all()
        mask = magnitude_mask(weight, recipe("magnitude", sparsity))
        assert int(mask.sum()) == int(30 * 70 * sparsity)


@pytest.mark.parametrize("name", ["magnitude", "wanda", "sparsegpt"])
@pytest.mark.parametrize("n,m", [(2, 4), (4, 8), (1, 4)])
def test_n_m_pattern_exact_in_every_group(name, n, m):
    weight, x = make_layer(out_features=24, in_features=64, seed=5)
    method = get_method(name)
    stats = stats_of(method.new_statistics, x) if method.new_statistics else None
    solution = method.solve(weight, stats, recipe(name, None, f"{n}:{m}"))
    zeros = (solution.weight == 0).reshape(24, 64 // m, m).sum(dim=2)
    assert (zeros == n).all()
    assert torch.equal(solution.weight == 0, solution.mask)


@pytest.mark.parametrize("name", ["magnitude", "wanda", "sparsegpt"])
def test_same_inputs_give_bit_identical_masks(name):
    weight, x = make_layer(seed=7)
    method = get_method(name)
    results = []
    for _ in range(2):
        stats = stats_of(method.new_statistics, x) if method.new_statistics else None
        results.append(method.solve(weight.clone(), stats, recipe(name, 0.5)))
    assert torch.equal(results[0].mask, results[1].mask)
    assert torch.equal(results[0].weight, results[1].weight)


def test_sparsegpt_dead_columns_and_singular_hessian_never_give_nan():
    weight, x = make_layer(seed=4)
    x[..., :5] = 0.0  # dead input columns
    x[..., 10] = x[..., 11]  # a duplicated column makes H singular
    stats = stats_of(HessianStats, x)
    solution = sparsegpt_solve(weight, stats.hessian, Recipe("sparsegpt", pattern=parse_pattern(0.5), dampening=0.0))
    assert torch.isfinite(solution.weight).all()
    assert (solution.weight[:, :5] == 0).all()
    assert solution.info["damping"] > 0.0


def test_statistics_do_not_depend_on_batching():
    _, x = make_layer(seed=8)
    a, b = stats_of(WandaStats, x, batch=1), stats_of(WandaStats, x, batch=6)
    assert torch.allclose(a.scaler_row, b.scaler_row, rtol=1e-6)
    h1, h2 = stats_of(HessianStats, x, batch=1), stats_of(HessianStats, x, batch=3)
    assert torch.allclose(h1.hessian, h2.hessian, rtol=1e-5, atol=1e-4)


def test_register_refuses_a_second_method_of_the_same_name():
    from prunekit.errors import ConfigError
    from prunekit.methods import Method, get_method, register

    wanda = get_method("wanda")
    assert register(wanda) is wanda  # the same object again: harmless
    impostor = Method("wanda", "prune", "not Wanda", None, lambda weight, stats, recipe: None)
    with pytest.raises(ConfigError, match="already registered"):
        register(impostor)
    assert get_method("wanda") is wanda
