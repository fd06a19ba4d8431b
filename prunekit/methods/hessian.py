"""The layer Hessian H = 2/n·XXᵀ shared by SparseGPT and GPTQ, and its damped inverse Cholesky factor."""

from __future__ import annotations

from contextlib import contextmanager

import torch


@contextmanager
def one_cpu_thread(device: torch.device | str):
    """Run a stretch of small or latency-bound operations (SparseGPT's column loop, the LAPACK
    factorisations) on one CPU thread: more threads synchronise on every one of them, and collapse
    when the cores are shared with other processes. No effect on other devices."""
    if torch.device(device).type != "cpu":
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


SYMMETRIC_BLOCK = 256  # inputs at least twice this wide accumulate only the lower block triangle of XᵀX


class HessianStats:
    """H = 2/n · Σ x xᵀ over all calibration tokens, n = number of sequences (reference semantics), fp32."""

    def __init__(self, in_features: int, device: torch.device | str = "cpu"):
        self.xxt = torch.zeros(in_features, in_features, dtype=torch.float32, device=device)
        self.sequences = 0
        self._factors: dict[float, tuple[torch.Tensor, float, torch.Tensor]] = {}
        self._consumed = False

    def _check_not_consumed(self) -> None:
        if self._consumed:
            raise RuntimeError("these statistics were consumed by damped_factor(); collect new ones")

    def update(self, x: torch.Tensor) -> None:
        """XᵀX of the batch's tokens, accumulated in fp32: one GEMM per batch, or for wide inputs one
        GEMM per column block of the lower block triangle (XᵀX is symmetric; up to ~40 % fewer FLOPs)."""
        self._check_not_consumed()
        self.sequences += x.shape[0] if x.dim() == 3 else 1
        x = x.reshape(-1, x.shape[-1]).float()
        n = x.shape[1]
        if n < 2 * SYMMETRIC_BLOCK:
            self.xxt.addmm_(x.T, x)
        else:
            for lo in range(0, n, SYMMETRIC_BLOCK):
                hi = min(lo + SYMMETRIC_BLOCK, n)
                self.xxt[lo:, lo:hi].addmm_(x[:, lo:].T, x[:, lo:hi])

    @property
    def hessian(self) -> torch.Tensor:
        """H = 2/n·XᵀX, symmetric (the lower triangle mirrored when only the lower blocks are accumulated)."""
        self._check_not_consumed()
        scale = 2.0 / max(self.sequences, 1)
        if self.xxt.shape[0] < 2 * SYMMETRIC_BLOCK:
            return self.xxt * scale
        lower = torch.tril(self.xxt)
        return (lower + torch.tril(self.xxt, -1).mT).mul_(scale)

    def damped_factor(self, dampening: float, consume: bool = False) -> tuple[torch.Tensor, float, torch.Tensor]:
        """(upper Cholesky factor of (H + λI)⁻¹, damping used, dead-input mask), computed once per
        dampening: Linears that share these statistics (q/k/v, gate/up) share the factorisation.

        ``consume=True`` turns XᵀX into H in place and damps it there (two n×n buffers at the peak
        instead of three); ``update`` and ``hessian`` refuse afterwards."""
        if dampening not in self._factors:
            self._check_not_consumed()
            scale = 2.0 / max(self.sequences, 1)
            H = self.xxt.mul_(scale) if consume else self.xxt * scale  # the factorisation reads the lower triangle only
            self._consumed = consume
            dead = torch.diag(H) == 0
            H[dead, dead] = 1.0
            factor, damping = damped_inverse_cholesky(H, dampening, overwrite=True)
            del H
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


def damped_inverse_cholesky(
    H: torch.Tensor, dampening: float, max_tries: int = 8, overwrite: bool = False
) -> tuple[torch.Tensor, float]:
    """Upper Cholesky factor of (H + λI)⁻¹ with λ = dampening·mean(diag H).

    Reads only the lower triangle and the diagonal of H; ``overwrite=True`` lets it damp H in place
    (one n×n buffer less; H is left damped). A failed factorisation retries with ten times the
    damping; it never returns NaN. Returns the factor and the damping fraction that succeeded.
    On the CPU it runs on one thread: faster for these sizes, and the result does not depend on
    the thread count.
    """
    with one_cpu_thread(H.device):
        return _damped_inverse_cholesky(H if overwrite else H.clone(), dampening, max_tries)


def _damped_inverse_cholesky(H: torch.Tensor, dampening: float, max_tries: int) -> tuple[torch.Tensor, float]:
    diagonal = torch.diag(H)  # a copy: H's diagonal is damped in place, from the original values each try
    mean_diag = torch.mean(diagonal)
    fraction = dampening
    for _ in range(max_tries):
        H.diagonal().copy_(diagonal).add_(fraction * mean_diag)  # = H + λI, element for element
        L, info = torch.linalg.cholesky_ex(H)
        if int(info) == 0:
            Hinv = torch.cholesky_inverse(L)
            del L
            U, info = torch.linalg.cholesky_ex(Hinv, upper=True)
            del Hinv
            if int(info) == 0 and torch.isfinite(U).all():
                return U, fraction
        fraction = max(fraction * 10.0, 0.01)
    raise RuntimeError(f"Hessian is not positive definite even with damping {fraction:g}·mean(diag H)")
