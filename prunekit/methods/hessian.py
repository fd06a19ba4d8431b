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

    def update(self, x: torch.Tensor) -> None:
        """XᵀX of the batch's tokens, accumulated in fp32: one GEMM per batch, or for wide inputs one
        GEMM per column block of the lower block triangle (XᵀX is symmetric; up to ~40 % fewer FLOPs)."""
        self.sequences += x.shape[0] if x.dim() == 3 else 1
        x = x.reshape(-1, x.shape[-1]).float()
        n = x.shape[1]
        if n < 2 * SYMMETRIC_BLOCK:
            self.xxt.addmm_(x.T, x)
        else:
            for lo in range(0, n, SYMMETRIC_BLOCK):
                hi = min(lo + SYMMETRIC_BLOCK, n)
                self.xxt[lo:, lo:hi].addmm_(x[:, lo:].T, x[:, lo:hi])
        self._factors.clear()

    @property
    def hessian(self) -> torch.Tensor:
        """H = 2/n·XᵀX, symmetric (the lower triangle mirrored when only the lower blocks are accumulated)."""
        scale = 2.0 / max(self.sequences, 1)
        if self.xxt.shape[0] < 2 * SYMMETRIC_BLOCK:
            return self.xxt * scale
        lower = torch.tril(self.xxt)
        return (lower + torch.tril(self.xxt, -1).mT).mul_(scale)

    def damped_factor(self, dampening: float) -> tuple[torch.Tensor, float, torch.Tensor]:
        """(upper Cholesky factor of (H + λI)⁻¹, damping used, dead-input mask), computed once per
        dampening: Linears that share these statistics (q/k/v, gate/up) share the factorisation."""
        if dampening not in self._factors:
            H = self.xxt * (2.0 / max(self.sequences, 1))  # the lower triangle is all the factorisation reads
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

    Reads only the lower triangle and the diagonal of H. A failed factorisation retries with ten
    times the damping; it never returns NaN. Returns the factor and the damping fraction that succeeded.
    On the CPU it runs on one thread: faster for these sizes, and the result does not depend on
    the thread count.
    """
    with one_cpu_thread(H.device):
        return _damped_inverse_cholesky(H, dampening, max_tries)


def _damped_inverse_cholesky(H: torch.Tensor, dampening: float, max_tries: int) -> tuple[torch.Tensor, float]:
    mean_diag = torch.mean(torch.diag(H))
    fraction = dampening
    for _ in range(max_tries):
        damped = H.clone()
        damped.diagonal().add_(fraction * mean_diag)  # = H + λI, element for element
        L, info = torch.linalg.cholesky_ex(damped)
        del damped
        if int(info) == 0:
            Hinv = torch.cholesky_inverse(L)
            del L
            U, info = torch.linalg.cholesky_ex(Hinv, upper=True)
            if int(info) == 0 and torch.isfinite(U).all():
                return U, fraction
        fraction = max(fraction * 10.0, 0.01)
    raise RuntimeError(f"Hessian is not positive definite even with damping {fraction:g}·mean(diag H)")
