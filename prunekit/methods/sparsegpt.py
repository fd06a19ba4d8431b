"""SparseGPT (Frantar & Alistarh 2023): OBS weight reconstruction over 128-column blocks."""

from __future__ import annotations

import torch

from prunekit.methods import Method, Solution, register
from prunekit.methods.hessian import HessianStats, damped_inverse_cholesky, prepare_hessian
from prunekit.methods.masks import lowest_n_of_m, lowest_overall
from prunekit.recipe import Recipe

_buffers: dict[tuple, torch.Tensor] = {}


def _scratch(rows: int, cols: int, device: torch.device) -> torch.Tensor:
    """A [rows, cols] fp32 work buffer, reused across calls (and layers) of the same shape and device.

    A fresh allocation per column would cost a page-faulting mmap on the CPU for every column."""
    key = (rows, cols, str(device))
    buffer = _buffers.get(key)
    if buffer is None:
        _buffers.clear()  # keep at most one buffer alive
        buffer = _buffers[key] = torch.empty(rows, cols, dtype=torch.float32, device=device)
    return buffer


def sparsegpt_solve(weight: torch.Tensor, hessian: torch.Tensor, recipe: Recipe) -> Solution:
    """Prune ``weight`` [out, in] given H [in, in]."""
    W, H = prepare_hessian(weight, hessian)
    Hinv, damping = damped_inverse_cholesky(H, recipe.dampening)
    del H
    return _solve_prepared(W, Hinv, damping, recipe)


def _solve_prepared(W: torch.Tensor, Hinv: torch.Tensor, damping: float, recipe: Recipe) -> Solution:
    """Prune W in place (fp32, dead columns already zeroed) with Hinv = the upper Cholesky factor of (H + λI)⁻¹.

    Unstructured: at the start of each block, the ⌊rows·block·s⌋ lowest w²/diag(Hinv)² of the
    block are pruned (the reference uses ``<=`` a threshold, which prunes one entry more per
    block; prunekit prunes exactly the requested fraction). N:M: every M columns, the N lowest
    of the error-updated weights are pruned.

    Column loop, per column i of a block: err = (w − q)/d with q = w where kept and 0 where pruned,
    then W1[:, i+1:] −= err ⊗ Hinv1[i, i+1:]. The products and differences are the reference's,
    element for element (bit-identical results); the column itself keeps w and the pruned entries
    are zeroed once per block, and the product goes into a reused buffer.
    """
    pattern = recipe.pattern
    rows, cols = W.shape
    mask = torch.zeros_like(W, dtype=torch.bool)
    loss = torch.zeros((), dtype=torch.float64, device=W.device)
    zero = torch.zeros((), dtype=W.dtype, device=W.device)
    bs = recipe.blocksize
    buffer = _scratch(rows, bs, W.device)
    for i1 in range(0, cols, bs):
        i2 = min(i1 + bs, cols)
        count = i2 - i1
        W1 = W[:, i1:i2]  # updated in place
        Hinv1 = Hinv[i1:i2, i1:i2]
        d = torch.diagonal(Hinv1)
        Err1 = torch.empty_like(W1)
        if pattern.is_nm:
            mask1 = torch.zeros_like(W1, dtype=torch.bool)
        else:
            mask1 = lowest_overall(W1.square() / d.square().unsqueeze(0), pattern.sparsity)
        w_cols, m_cols, e_cols, d_items = W1.unbind(1), mask1.unbind(1), Err1.unbind(1), d.unbind(0)
        for i in range(count):
            if pattern.is_nm and i % pattern.m == 0:
                block = W1[:, i : i + pattern.m].square() / d[i : i + pattern.m].square().unsqueeze(0)
                mask1[:, i : i + pattern.m] = lowest_n_of_m(block, pattern.n, pattern.m)
            torch.div(torch.where(m_cols[i], w_cols[i], zero), d_items[i], out=e_cols[i])
            if i + 1 < count:
                update = torch.mul(Err1[:, i : i + 1], Hinv1[i : i + 1, i + 1 :], out=buffer[:, : count - i - 1])
                W1[:, i + 1 :].sub_(update)
        W1.masked_fill_(mask1, 0.0)
        mask[:, i1:i2] = mask1
        loss += Err1.double().square().sum() / 2
        if i2 < cols:
            W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    return Solution(W, mask, {"loss": float(loss), "damping": damping})


def solve(weight: torch.Tensor, stats: HessianStats, recipe: Recipe) -> Solution:
    """Linears that read the same input (q/k/v, gate/up) share one ``stats`` and so one factorisation."""
    Hinv, damping, dead = stats.damped_factor(recipe.dampening)
    W = weight.to(torch.float32, copy=True)
    W[:, dead] = 0.0
    return _solve_prepared(W, Hinv, damping, recipe)


register(Method("sparsegpt", "prune", "OBS reconstruction with the layer Hessian", HessianStats, solve))
