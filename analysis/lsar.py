"""LSAR: low-rank subspace of language-specific signals (Xie et al. 2022; study App. D.2,
analysis-spec §3), and the drift of language-agnostic / language-specific features after pruning.

Everything is float64: in float32 the orthogonality constraint μ' ⟂ span(Ms) is visibly broken.

Per layer, M ∈ R^{d×K} holds the mean sentence embedding of each of K languages (columns):

    μ  = M 1/K ;  U,S,Vᵀ = svd(M − μ1ᵀ) ;  M' = μ1ᵀ + U_r S_r V_rᵀ      (rank-r approximation)
    x  = pinv(M')ᵀ 1 ;  μ' = x/‖x‖²                                    (μ' ⟂ span(Ms))
    U' = svd(M' − μ'1ᵀ).U ;  Ms = U'[:, :r]                             (d × r, orthonormal)
    s  = Ms Msᵀ e (language-specific) ;  a = e − s (language-agnostic)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np
from scipy.linalg import subspace_angles

from prunekit.analysis.spec import SUBSPACES
from prunekit.errors import ConfigError


@dataclass
class Subspace:
    ms: np.ndarray  # d × r orthonormal basis of the language-specific subspace
    mu_prime: np.ndarray  # d, the shared (language-agnostic) vector, ⟂ span(ms)
    mu: np.ndarray  # d, the plain mean of the language means
    m_prime: np.ndarray  # d × K rank-r reconstruction of M
    singular_values: np.ndarray  # of M − μ1ᵀ

    @property
    def rank(self) -> int:
        return self.ms.shape[1]

    def orthogonality(self) -> dict[str, float]:
        """|μ'ᵀ(M'_k − μ')| (max over k), absolute and relative to ‖μ'‖·‖M'_k − μ'‖, and max |μ'ᵀ Ms|."""
        centered = self.m_prime - self.mu_prime[:, None]
        dots = np.abs(self.mu_prime @ centered)
        norms = np.linalg.norm(self.mu_prime) * np.linalg.norm(centered, axis=0)
        rel = np.where(norms > 0, dots / np.where(norms > 0, norms, 1.0), 0.0)
        return {
            "max_abs": float(dots.max()),
            "max_rel": float(rel.max()),
            "max_abs_mu_ms": float(np.abs(self.mu_prime @ self.ms).max()),
        }

    def specific(self, e: np.ndarray) -> np.ndarray:
        """Language-specific part s = Ms Msᵀ e of embeddings e (n × d or d)."""
        e = np.asarray(e, dtype=np.float64)
        return (e @ self.ms) @ self.ms.T

    def agnostic(self, e: np.ndarray) -> np.ndarray:
        """Language-agnostic part a = e − Ms Msᵀ e."""
        e = np.asarray(e, dtype=np.float64)
        return e - self.specific(e)


def default_rank(num_languages: int) -> int:
    """r = K−1 unless asked otherwise: the spec allows 1 ≤ r ≤ K−1 and the study does not state r;
    K−1 keeps every language direction (M' = M), a lower r keeps only the strongest ones."""
    return num_languages - 1


def fit_subspace(means: np.ndarray, rank: int | None = None) -> Subspace:
    """LSAR on the d × K matrix of language means (analysis-spec §3.2), in float64."""
    m = np.asarray(means, dtype=np.float64)
    if m.ndim != 2:
        raise ConfigError(f"LSAR needs a d × K matrix of language means, got shape {m.shape}")
    d, k = m.shape
    if k < 2:
        raise ConfigError("LSAR needs at least two languages (--langs with two or more codes)")
    r = default_rank(k) if rank is None else int(rank)
    if not 1 <= r <= k - 1:
        raise ConfigError(f"LSAR rank must be between 1 and K−1 = {k - 1} for {k} languages, got {r}")
    mu = m.mean(axis=1)
    u, s, vt = np.linalg.svd(m - mu[:, None], full_matrices=False)
    m_prime = mu[:, None] + (u[:, :r] * s[:r]) @ vt[:r]
    x = np.linalg.pinv(m_prime).T @ np.ones(k)
    mu_prime = x / (x @ x)
    u2, _, _ = np.linalg.svd(m_prime - mu_prime[:, None], full_matrices=False)
    return Subspace(u2[:, :r], mu_prime, mu, m_prime, s)


def language_means(embeddings: Mapping[str, np.ndarray], langs: Sequence[str]) -> np.ndarray:
    """d × K: column k = mean over samples of language k (embeddings[lang]: n × d)."""
    return np.stack([np.asarray(embeddings[lang], dtype=np.float64).mean(axis=0) for lang in langs], axis=1)


def layer_drift(
    reference: Mapping[str, np.ndarray],
    target: Mapping[str, np.ndarray],
    langs: Sequence[str],
    rank: int | None = None,
    subspace: str = "per_model",
) -> dict[str, Any]:
    """One layer: Δ_agn = mean_i ‖a^D_i − a^P_i‖₂ and Δ_spec likewise, per evaluation language.

    ``reference`` / ``target``: lang -> n × d sentence embeddings of the same (parallel) samples in the
    dense (reference) and pruned (target) model. ``subspace="per_model"`` fits Ms on each model (the
    study); ``"dense"`` projects both with the reference's Ms (isolates feature change from subspace
    change). Also reports Δ of the whole embedding (study Fig. 5) and the principal angles between the
    two models' subspaces.
    """
    if subspace not in SUBSPACES:
        raise ConfigError(f"unknown LSAR subspace '{subspace}'; use one of {', '.join(SUBSPACES)}")
    ref_space = fit_subspace(language_means(reference, langs), rank)
    tgt_space = fit_subspace(language_means(target, langs), rank)
    project = ref_space if subspace == "dense" else tgt_space
    per_lang = {}
    for lang in langs:
        e_ref = np.asarray(reference[lang], dtype=np.float64)
        e_tgt = np.asarray(target[lang], dtype=np.float64)
        if e_ref.shape != e_tgt.shape:
            raise ConfigError(f"LSAR: language '{lang}' has {e_ref.shape} reference vs {e_tgt.shape} target embeddings")
        a_ref, a_tgt = ref_space.agnostic(e_ref), project.agnostic(e_tgt)
        s_ref, s_tgt = e_ref - a_ref, e_tgt - a_tgt
        per_lang[lang] = {
            "delta_agnostic": float(np.linalg.norm(a_ref - a_tgt, axis=1).mean()),
            "delta_specific": float(np.linalg.norm(s_ref - s_tgt, axis=1).mean()),
            "delta_full": float(np.linalg.norm(e_ref - e_tgt, axis=1).mean()),
            "norm_reference": float(np.linalg.norm(e_ref, axis=1).mean()),
            "samples": int(e_ref.shape[0]),
        }
    angles = subspace_angles(ref_space.ms, tgt_space.ms)
    return {
        "per_language": per_lang,
        "principal_angles_deg": [float(x) for x in np.degrees(np.sort(angles))],
        "orthogonality": {"reference": ref_space.orthogonality(), "target": tgt_space.orthogonality()},
        "rank": ref_space.rank,
    }
