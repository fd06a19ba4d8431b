"""LSAR (Xie et al. 2022; study App. D.2; analysis-spec §3) on constructed embeddings."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.linalg import subspace_angles

from prunekit.analysis.lsar import fit_subspace, language_means, layer_drift
from prunekit.errors import ConfigError


def planted(d=48, langs=("de", "en", "sw", "zh"), n=40, noise=0.02, seed=0):
    """Embeddings e = c + s_lang + noise with c ⟂ span(S), Σ_lang s_lang = 0."""
    rng = np.random.default_rng(seed)
    k = len(langs)
    basis, _ = np.linalg.qr(rng.normal(size=(d, k)))  # orthonormal: first column shared, rest languages
    c = 5.0 * basis[:, 0]
    directions = basis[:, 1:]  # d × (K−1)
    coords = rng.normal(size=(k, k - 1)) * 3.0
    coords -= coords.mean(axis=0)  # language signals sum to zero
    signals = {lang: directions @ coords[i] for i, lang in enumerate(langs)}
    emb = {lang: c + signals[lang] + noise * rng.normal(size=(n, d)) for lang in langs}
    return emb, c, directions, signals


def min_norm_affine_point(m: np.ndarray) -> np.ndarray:
    """Independent reference for μ': the point of the affine hull of M's columns closest to the origin."""
    base, diffs = m[:, 0], m[:, 1:] - m[:, :1]
    t, *_ = np.linalg.lstsq(diffs, -base, rcond=None)
    return base + diffs @ t


@pytest.mark.parametrize("rank", [1, 2, 3, 6])
def test_mu_prime_is_orthogonal_to_every_centered_column_of_the_reconstruction(rank):
    rng = np.random.default_rng(rank)
    m = rng.normal(size=(64, 7)) * 10 + rng.normal(size=(64, 1)) * 30  # large shared offset, as hidden states
    space = fit_subspace(m, rank)
    residual = np.abs(space.mu_prime @ (space.m_prime - space.mu_prime[:, None]))
    assert residual.max() < 1e-10
    assert np.abs(space.mu_prime @ space.ms).max() < 1e-10
    assert np.allclose(space.ms.T @ space.ms, np.eye(rank), atol=1e-12)
    assert space.orthogonality()["max_abs"] < 1e-10


def test_mu_prime_matches_the_min_norm_point_of_the_affine_hull():
    m = np.random.default_rng(1).normal(size=(32, 5)) + 4.0
    space = fit_subspace(m, 4)  # r = K−1: M' = M
    assert np.allclose(space.m_prime, m, atol=1e-12)
    assert np.allclose(space.mu_prime, min_norm_affine_point(m), atol=1e-10)


def _relative_residual(m_prime, mu_prime):
    centered = m_prime - mu_prime[:, None]
    return (np.abs(mu_prime @ centered) / (np.linalg.norm(mu_prime) * np.linalg.norm(centered, axis=0))).max()


def _lsar_in(dtype, m, r):
    """The spec's recipe evaluated in ``dtype`` (numpy keeps float32 arrays in float32)."""
    m = m.astype(dtype)
    k = m.shape[1]
    mu = m.mean(axis=1)
    u, s, vt = np.linalg.svd(m - mu[:, None], full_matrices=False)
    m_prime = mu[:, None] + (u[:, :r] * s[:r]) @ vt[:r]
    x = np.linalg.pinv(m_prime).T @ np.ones(k, dtype=dtype)
    return m_prime, x / (x @ x)


def test_computation_is_float64_even_for_float32_input():
    rng = np.random.default_rng(2)
    small = (rng.normal(size=(256, 7)) + 2).astype(np.float32)
    space = fit_subspace(small, 6)
    assert space.ms.dtype == np.float64 and space.mu_prime.dtype == np.float64
    assert space.agnostic(small[:, 0]).dtype == np.float64
    assert np.abs(space.mu_prime @ (space.m_prime - space.mu_prime[:, None])).max() < 1e-10
    # at hidden-state scale the orthogonality holds to float64 precision, and float32 visibly breaks it
    large = (rng.normal(size=(256, 7)) * 50 + 200).astype(np.float32)
    space = fit_subspace(large, 6)
    assert space.orthogonality()["max_rel"] < 1e-12
    assert _relative_residual(*_lsar_in(np.float32, large, 6)) > 1e-9


def test_specific_part_recovers_planted_language_directions_and_agnostic_part_is_language_invariant():
    langs = ("de", "en", "sw", "zh")
    emb, c, directions, signals = planted(langs=langs, n=200)  # mean noise per language ≈ 0.01
    space = fit_subspace(language_means(emb, langs), rank=3)
    assert np.degrees(subspace_angles(space.ms, directions)).max() < 2.0
    assert np.linalg.norm(space.mu_prime - c) < 0.05
    for lang in langs:
        specific = space.specific(emb[lang]).mean(axis=0)
        agnostic = space.agnostic(emb[lang]).mean(axis=0)
        assert np.linalg.norm(specific - signals[lang]) < 0.05
        assert np.linalg.norm(agnostic - c) < 0.05
    raw_spread = max(np.linalg.norm(emb[x].mean(0) - emb[y].mean(0)) for x in langs for y in langs)
    agn_spread = max(np.linalg.norm(space.agnostic(emb[x]).mean(0) - space.agnostic(emb[y]).mean(0))
                     for x in langs for y in langs)
    assert agn_spread < 0.01 * raw_spread


def test_lower_rank_keeps_the_strongest_language_directions():
    rng = np.random.default_rng(3)
    basis, _ = np.linalg.qr(rng.normal(size=(20, 3)))
    c, strong, weak = 4 * basis[:, 0], basis[:, 1], basis[:, 2]
    means = np.stack([c + 5 * strong + 0.1 * weak, c - 5 * strong + 0.1 * weak, c - 0.2 * weak], axis=1)  # de, en, sw
    space = fit_subspace(means, rank=1)
    assert abs(abs(space.ms[:, 0] @ strong) - 1) < 1e-3


def test_drift_inside_the_specific_subspace_moves_only_specific_features_with_the_dense_projector():
    langs = ("de", "en", "sw", "zh")
    emb, *_ = planted(langs=langs)
    ms = fit_subspace(language_means(emb, langs), rank=3).ms
    shift = 0.7 * (ms[:, 0] - ms[:, 2]) / np.sqrt(2)  # a unit-norm direction inside span(Ms), times 0.7
    moved = {lang: e + shift for lang, e in emb.items()}
    result = layer_drift(emb, moved, langs, rank=3, subspace="dense")
    for lang in langs:
        cell = result["per_language"][lang]
        assert cell["delta_agnostic"] == pytest.approx(0.0, abs=1e-12)
        assert cell["delta_specific"] == pytest.approx(0.7, rel=1e-12)
        assert cell["delta_full"] == pytest.approx(0.7, rel=1e-12)


def test_drift_outside_the_subspace_moves_only_agnostic_features():
    langs = ("de", "en", "sw", "zh")
    emb, *_ = planted(langs=langs)
    ms = fit_subspace(language_means(emb, langs), rank=3).ms
    outside = np.linalg.qr(np.column_stack([ms, np.random.default_rng(5).normal(size=ms.shape[0])]))[0][:, -1]
    moved = {lang: e + 0.3 * outside for lang, e in emb.items()}
    # a translation leaves the affine hull's directions, hence Ms, unchanged: both modes agree
    for mode in ("dense", "per_model"):
        result = layer_drift(emb, moved, langs, rank=3, subspace=mode)
        for lang in langs:
            assert result["per_language"][lang]["delta_specific"] == pytest.approx(0.0, abs=1e-10)
            assert result["per_language"][lang]["delta_agnostic"] == pytest.approx(0.3, rel=1e-10)
        assert max(result["principal_angles_deg"]) < 1e-5


def test_identical_models_have_zero_drift_and_zero_principal_angles():
    langs = ("de", "en", "sw")
    emb, *_ = planted(langs=langs)
    result = layer_drift(emb, emb, langs)
    assert result["rank"] == 2
    assert all(v["delta_agnostic"] == 0 and v["delta_specific"] == 0 for v in result["per_language"].values())
    assert max(result["principal_angles_deg"]) < 1e-5


def test_rank_and_language_count_are_validated():
    m = np.ones((8, 3))
    with pytest.raises(ConfigError, match="between 1 and K−1 = 2"):
        fit_subspace(m, 3)
    with pytest.raises(ConfigError, match="at least two languages"):
        fit_subspace(np.ones((8, 1)))
    with pytest.raises(ConfigError, match="subspace"):
        layer_drift({"de": np.ones((2, 8))}, {"de": np.ones((2, 8))}, ["de"], subspace="shared")
