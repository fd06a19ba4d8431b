"""The layer Hessian H = 2/n·XXᵀ shared by SparseGPT and GPTQ, and its damped inverse Cholesky factor."""

from __future__ import annotations

from contextlib import contextmanager

import torch

from prunekit.methods import lapack


@contextmanager
def one_cpu_thread(device: torch.device | str):
    """Run a stretch of small or latency-bound operations (SparseGPT's column loop, the LAPACK
    factorisations) on one CPU thread, torch's and scipy's: more threads synchronise on every one of
    them, and collapse when the cores are shared with other processes. No effect on other devices."""
    if torch.device(device).type != "cpu":
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with lapack.single_threaded():  # scipy's BLAS/LAPACK too (SparseGPT's ger, the factorisations)
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
        with full_fp32_matmul():
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
        H = self.xxt * (2.0 / max(self.sequences, 1))
        if H.shape[0] >= 2 * SYMMETRIC_BLOCK:
            _mirror_lower_to_upper(H)
        return H

    def damped_factor(self, dampening: float, consume: bool = False) -> tuple[torch.Tensor, float, torch.Tensor]:
        """(upper Cholesky factor of (H + λI)⁻¹, damping used, dead-input mask), computed once per
        dampening: Linears that share these statistics (q/k/v, gate/up) share the factorisation.

        ``consume=True`` turns XᵀX into H in place and factorises it there, then lets it go: one n×n
        buffer besides the factor at the peak, and only the factor afterwards; ``update`` and
        ``hessian`` refuse from then on."""
        if dampening not in self._factors:
            self._check_not_consumed()
            scale = 2.0 / max(self.sequences, 1)
            H = self.xxt.mul_(scale) if consume else self.xxt * scale  # the factorisation reads the lower triangle only
            if consume:
                self._consumed, self.xxt = True, None
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
    """Upper Cholesky factor U of (H + λI)⁻¹ (that is, (H + λI)⁻¹ = UᵀU) with λ = dampening·mean(diag H).

    Reads only the lower triangle and the diagonal of H; ``overwrite=True`` lets it use H as
    scratch (one n×n buffer less; H's contents are lost). A failed factorisation retries with ten
    times the damping; it never returns NaN. Returns the factor and the damping fraction that
    succeeded. On the CPU it runs on one thread: faster for these sizes, and the result does not
    depend on the thread count.

    One Cholesky factorisation and one triangular inverse, instead of the reference's Cholesky,
    inverse and second Cholesky (half the O(n³) work): with J the order reversal, J(H+λI)J = LLᵀ
    gives (H+λI)⁻¹ = (JL⁻¹J)ᵀ(JL⁻¹J), and JL⁻¹J is upper triangular with a positive diagonal, so
    it is the unique upper Cholesky factor.

    On the CPU both steps are LAPACK's in-place potrf and trtri (``methods/lapack.py``): no buffer
    besides H itself, ~2× faster single-threaded than torch's, and the GIL is released meanwhile.
    H's upper triangle, which neither touches, keeps a copy of the matrix for a retry.
    """
    H = H if overwrite else H.clone()
    with one_cpu_thread(H.device), full_fp32_matmul():
        if lapack.available(H):
            return _damped_inverse_cholesky_lapack(H, dampening, max_tries)
        return _damped_inverse_cholesky_torch(H, dampening, max_tries)


def _damped_inverse_cholesky_lapack(H: torch.Tensor, dampening: float, max_tries: int) -> tuple[torch.Tensor, float]:
    _mirror_lower_to_upper(H)
    _reverse_in_place(H)  # J H J, both triangles valid
    diagonal = torch.diag(H)
    mean_diag = torch.mean(diagonal)
    fraction = dampening
    for _ in range(max_tries):
        H.diagonal().copy_(diagonal).add_(fraction * mean_diag)
        if lapack.cholesky_lower_in_place(H) == 0:  # H's lower triangle ← L, J(H+λI)J = LLᵀ
            if lapack.invert_lower_in_place(H) == 0 and _all_finite(H):  # H's lower triangle ← L⁻¹
                H.tril_()
                _reverse_in_place(H)  # J L⁻¹ J, upper triangular
                return H, fraction
        _mirror_lower_to_upper(H.mT)  # restore JHJ's lower triangle from the untouched upper one
        fraction = max(fraction * 10.0, 0.01)
    raise RuntimeError(f"Hessian is not positive definite even with damping {fraction:g}·mean(diag H)")


def _all_finite(X: torch.Tensor) -> bool:
    """Without a bool tensor the size of X (isfinite(X) page-faults 32 MB for a 5632-wide H)."""
    low, high = torch.aminmax(X)
    return bool(torch.isfinite(low)) and bool(torch.isfinite(high))


def _mirror_lower_to_upper(X: torch.Tensor) -> None:
    """X's strict upper triangle ← its strict lower one (X symmetric afterwards); ``X.mT`` mirrors the
    other way. Square tiles: a transposed copy of a whole block row is ~5× slower (it leaves the cache)."""
    n = X.shape[0]
    for lo in range(0, n, _CHUNK):
        hi = min(lo + _CHUNK, n)
        block = X[lo:hi, lo:hi]
        block.copy_(torch.tril(block) + torch.tril(block, -1).mT)
        for lo2 in range(hi, n, _CHUNK):
            hi2 = min(lo2 + _CHUNK, n)
            X[lo:hi, lo2:hi2] = X[lo2:hi2, lo:hi].mT


def _fp32_precision_settings() -> list:
    """The per-backend fp32 matmul settings of torch's ``fp32_precision`` API (torch ≥ 2.9): CUDA's
    (TF32 on Ampere and later) and oneDNN's (TF32/bf16 on recent CPUs); empty on older torch."""
    settings = []
    for backend in (getattr(torch.backends, "cuda", None), getattr(torch.backends, "mkldnn", None)):
        matmul = getattr(backend, "matmul", None)
        if matmul is not None and hasattr(matmul, "fp32_precision"):
            settings.append(matmul)
    return settings


@contextmanager
def full_fp32_matmul():
    """Full fp32 products (IEEE, no TF32) whatever the user's TF32 setting, restored on exit: the
    statistics (XᵀX), the factorisations and SparseGPT's/GPTQ's error feedback need them.

    Uses the per-backend ``fp32_precision`` settings where torch has them: the legacy
    ``torch.get_float32_matmul_precision()`` raises once a program has mixed the two APIs (for
    example ``torch.backends.cuda.matmul.fp32_precision = "tf32"`` alone)."""
    settings = _fp32_precision_settings()
    if not settings:  # torch before the fp32_precision API
        previous_legacy = torch.get_float32_matmul_precision()
        torch.set_float32_matmul_precision("highest")
        try:
            yield
        finally:
            torch.set_float32_matmul_precision(previous_legacy)
        return
    previous = [matmul.fp32_precision for matmul in settings]
    for matmul in settings:
        matmul.fp32_precision = "ieee"
    try:
        yield
    finally:
        for matmul, value in zip(settings, previous):
            matmul.fp32_precision = value


def _damped_inverse_cholesky_torch(H: torch.Tensor, dampening: float, max_tries: int) -> tuple[torch.Tensor, float]:
    _reverse_in_place(H)  # J H J: H's lower triangle is now its upper one
    diagonal = torch.diag(H)  # a copy: H's diagonal is damped in place, from the original values each try
    mean_diag = torch.mean(diagonal)
    fraction = dampening
    for _ in range(max_tries):
        H.diagonal().copy_(diagonal).add_(fraction * mean_diag)  # = J(H + λI)J, element for element
        R, info = torch.linalg.cholesky_ex(H, upper=True)  # reads the upper triangle only
        L = R.mT  # lower, JHJ = LLᵀ; LAPACK's column-major R is a row-major L
        del R
        if int(info) == 0:
            _invert_lower_triangular_in_place(L)
            if torch.isfinite(L).all():
                _reverse_in_place(L)  # J L⁻¹ J
                return L, fraction
        del L
        fraction = max(fraction * 10.0, 0.01)
    raise RuntimeError(f"Hessian is not positive definite even with damping {fraction:g}·mean(diag H)")


_CHUNK = 256  # rows moved at a time by the in-place reversal, tile side of the mirroring


def _reverse_in_place(X: torch.Tensor) -> None:
    """X[i, j] ← X[n−1−i, n−1−j] (both orders reversed), with one chunk of scratch memory."""
    flat = X.view(-1)
    total = flat.numel()
    step = _CHUNK * X.shape[-1]
    for lo in range(0, total // 2, step):
        hi = min(lo + step, total // 2)
        head = flat[lo:hi].clone()
        flat[lo:hi] = flat[total - hi : total - lo].flip(0)
        flat[total - hi : total - lo] = head.flip(0)


_INVERT_DIRECTLY = 256  # triangular blocks up to this size are inverted with one triangular solve


def _invert_lower_triangular_in_place(L: torch.Tensor) -> None:
    """L ← L⁻¹ for a lower-triangular L (zeros above the diagonal), by halves:
    [[A, 0], [B, C]]⁻¹ = [[A⁻¹, 0], [−C⁻¹BA⁻¹, C⁻¹]]. The off-diagonal block costs one GEMM and one
    triangular solve, so most of the work runs at GEMM speed."""
    n = L.shape[0]
    if n <= _INVERT_DIRECTLY:
        identity = torch.eye(n, dtype=L.dtype, device=L.device)
        L.copy_(torch.linalg.solve_triangular(L, identity, upper=False))
        return
    half = n // 2
    A, B, C = L[:half, :half], L[half:, :half], L[half:, half:]
    _invert_lower_triangular_in_place(A)
    B.copy_(B @ A)
    B.copy_(torch.linalg.solve_triangular(C, B, upper=False)).neg_()
    _invert_lower_triangular_in_place(C)
