"""The layer Hessian H = 2/n·XXᵀ shared by SparseGPT and GPTQ, and its damped inverse Cholesky factor."""

from __future__ import annotations

import torch


class HessianStats:
    """H = 2/n · Σ x xᵀ over all calibration tokens, n = number of sequences (reference semantics), fp32."""

    def __init__(self, in_features: int, device: torch.device | str = "cpu"):
        self.xxt = torch.zeros(in_features, in_features, dtype=torch.float32, device=device)
        self.sequences = 0
        self._factors: dict[float, tuple[torch.Tensor, float, torch.Tensor]] = {}

    def update(self, x: torch.Tensor) -> None:
        """One GEMM per batch: XᵀX of all its tokens, accumulated in fp32."""
        self.sequences += x.shape[0] if x.dim() == 3 else 1
        x = x.reshape(-1, x.shape[-1]).float()
        self.xxt.addmm_(x.T, x)
        self._factors.clear()

    @property
    def hessian(self) -> torch.Tensor:
        return self.xxt * (2.0 / max(self.sequences, 1))

    def damped_factor(self, dampening: float) -> tuple[torch.Tensor, float, torch.Tensor]:
        """(upper Cholesky factor of (H + λI)⁻¹, damping used, dead-input mask), computed once per
        dampening: Linears that share these statistics (q/k/v, gate/up) share the factorisation."""
        if dampening not in self._factors:
            H = self.hessian
            dead = torch.diag(H) == 0
            H[dead, dead] = 1.0
            factor, damping = damped_inverse_cholesky(H, dampening)
            self._factors[dampening] = (factor, damping, dead)
        return self._factors[dampening]


def prepare_hessian(weight: torch.Tensor, hessian: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero the weight columns of dead inputs (diag H == 0) and set their diagonal to 1."""
    H = hessian.clone()
    W = weight.float().clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    return W, H


def damped_inverse_cholesky(H: torch.Tensor, dampening: float, max_tries: int = 8) -> tuple[torch.Tensor, float]:
    """Upper Cholesky factor of (H + λI)⁻¹ with λ = dampening·mean(diag H).

    A failed factorisation retries with ten times the damping; it never returns NaN.
    Returns the factor and the damping fraction that succeeded.
    """
    mean_diag = torch.mean(torch.diag(H))
    eye = torch.eye(H.shape[0], dtype=H.dtype, device=H.device)
    fraction = dampening
    for _ in range(max_tries):
        L, info = torch.linalg.cholesky_ex(H + fraction * mean_diag * eye)
        if int(info) == 0:
            Hinv = torch.cholesky_inverse(L)
            U, info = torch.linalg.cholesky_ex(Hinv, upper=True)
            if int(info) == 0 and torch.isfinite(U).all():
                return U, fraction
        fraction = max(fraction * 10.0, 0.01)
    raise RuntimeError(f"Hessian is not positive definite even with damping {fraction:g}·mean(diag H)")
