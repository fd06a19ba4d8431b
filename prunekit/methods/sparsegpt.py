"""SparseGPT (Frantar & Alistarh 2023): OBS weight reconstruction over 128-column blocks."""

from __future__ import annotations

import torch

from prunekit.methods import Method, Solution, register
from prunekit.methods.hessian import HessianStats, damped_inverse_cholesky, one_cpu_thread, prepare_hessian
from prunekit.methods.masks import lowest_n_of_m, lowest_overall
from prunekit.recipe import Recipe

SUB_BLOCK = 32  # columns whose rank-1 updates are applied one by one; the rest of a block gets one GEMM per sub-block


def sparsegpt_solve(weight: torch.Tensor, hessian: torch.Tensor, recipe: Recipe) -> Solution:
    """Prune ``weight`` [out, in] given H [in, in]."""
    W, H = prepare_hessian(weight, hessian)
    Hinv, damping = damped_inverse_cholesky(H, recipe.dampening)
    del H
    return _solve_prepared(W, Hinv, damping, recipe)


def _solve_prepared(W: torch.Tensor, Hinv: torch.Tensor, damping: float, recipe: Recipe) -> Solution:
    return _solve_stacked(W, Hinv, damping, recipe, [W.shape[0]])[0]


def _solve_stacked(W: torch.Tensor, Hinv: torch.Tensor, damping: float, recipe: Recipe, rows: list[int]) -> list[Solution]:
    """Prune W in place (fp32, dead columns already zeroed) with Hinv = the upper Cholesky factor of (H + λI)⁻¹.

    W may stack the rows of several matrices that share H (``rows`` = their row counts): every
    step is row-wise except the unstructured mask and the GEMM that carries a block's error to the
    later columns, which are done per matrix, so each gets exactly its own solution.

    Unstructured: at the start of each block, the ⌊rows·block·s⌋ lowest w²/diag(Hinv)² of the
    block are pruned (the reference uses ``<=`` a threshold, which prunes one entry more per
    block; prunekit prunes exactly the requested fraction). N:M: every M columns, the N lowest
    of the error-updated weights are pruned.

    Column loop, per column i of a block: err = (w − q)/d with q = w where kept and 0 where pruned,
    then W1[:, i+1:] −= err ⊗ Hinv1[i, i+1:]. The reference applies that rank-1 update to every later
    column of the 128-column block, one column at a time; here it reaches only the later columns of
    the same ``SUB_BLOCK``-column sub-block, and a sub-block's errors reach the rest of the block in
    one GEMM when it is done (the same lazy batching the reference uses between blocks, one level
    down). Every column still sees every earlier column's error before its own is computed, so the
    result is the reference's up to fp32 summation order; an N:M group lies in one sub-block. The
    column itself keeps w and the pruned entries are zeroed once per block: four tensor operations
    per column, on a transposed copy of the block so that every operation runs along contiguous rows.
    """
    mask = torch.zeros_like(W, dtype=torch.bool)
    offsets = [0]
    for count in rows:
        offsets.append(offsets[-1] + count)
    parts = list(zip(offsets[:-1], offsets[1:]))
    loss = torch.zeros(len(parts), dtype=torch.float64, device=W.device)
    zero = torch.zeros((), dtype=W.dtype, device=W.device)
    with one_cpu_thread(W.device):
        _blocks(W, Hinv, recipe, mask, loss, zero, parts)
    return [Solution(W[a:b], mask[a:b], {"loss": float(loss[i]), "damping": damping}) for i, (a, b) in enumerate(parts)]


def _blocks(W, Hinv, recipe, mask, loss, zero, parts) -> None:
    """The 128-column blocks, in place on W, mask and loss."""
    pattern, bs = recipe.pattern, recipe.blocksize
    cols = W.shape[1]
    sub = pattern.m * -(-SUB_BLOCK // pattern.m) if pattern.is_nm else SUB_BLOCK  # an N:M group never straddles two
    for i1 in range(0, cols, bs):
        i2 = min(i1 + bs, cols)
        count = i2 - i1
        # The block is held transposed ([columns, rows], contiguous): a column is a contiguous row
        # and each update runs along the long rows dimension.
        W1T = W[:, i1:i2].T.contiguous()
        W1 = W1T.T
        Hinv1 = Hinv[i1:i2, i1:i2]
        d = torch.diagonal(Hinv1)
        ErrT = torch.empty_like(W1T)
        maskT = torch.zeros_like(W1T, dtype=torch.bool)
        if not pattern.is_nm:
            scores = W1.square() / d.square().unsqueeze(0)
            for a, b in parts:  # one threshold per matrix block
                maskT[:, a:b] = lowest_overall(scores[a:b], pattern.sparsity).T
        # per-column views, made in one call each
        d_items, w_rows, m_rows, e_rows = d.unbind(0), W1T.unbind(0), maskT.unbind(0), ErrT.unbind(0)
        e_wide, h_cols = ErrT.unsqueeze(1).unbind(0), Hinv1.unsqueeze(2).unbind(0)
        for j1 in range(0, count, sub):
            j2 = min(j1 + sub, count)
            for i in range(j1, j2):
                if pattern.is_nm and i % pattern.m == 0:
                    block = W1[:, i : i + pattern.m].square() / d[i : i + pattern.m].square().unsqueeze(0)
                    maskT[i : i + pattern.m] = lowest_n_of_m(block, pattern.n, pattern.m).T
                torch.div(torch.where(m_rows[i], w_rows[i], zero), d_items[i], out=e_rows[i])
                if i + 1 < j2:
                    W1T[i + 1 : j2].sub_(h_cols[i][i + 1 : j2] * e_wide[i])
            if j2 < count:  # the sub-block's errors reach the rest of the block in one GEMM per matrix
                for a, b in parts:
                    W1T[j2:, a:b].addmm_(Hinv1[j1:j2, j2:].T, ErrT[j1:j2, a:b], alpha=-1.0)
        W[:, i1:i2] = W1T.masked_fill_(maskT, 0.0).T
        mask[:, i1:i2] = maskT.T
        Err1 = ErrT.T.contiguous()
        for i, (a, b) in enumerate(parts):
            loss[i] += Err1[a:b].double().square().sum() / 2
            if i2 < cols:
                W[a:b, i2:] -= Err1[a:b] @ Hinv[i1:i2, i2:]


def solve(weight: torch.Tensor, stats: HessianStats, recipe: Recipe) -> Solution:
    """Linears that read the same input (q/k/v, gate/up) share one ``stats`` and so one factorisation."""
    return solve_group([weight], stats, recipe)[0]


def solve_group(weights: list[torch.Tensor], stats: HessianStats, recipe: Recipe) -> list[Solution]:
    """``solve`` for several Linears sharing ``stats``, in one column loop over their stacked rows."""
    Hinv, damping, dead = stats.damped_factor(recipe.dampening, consume=True)
    W = torch.cat([w.to(torch.float32) for w in weights])  # a copy, even of one fp32 weight
    W[:, dead] = 0.0
    return _solve_stacked(W, Hinv, damping, recipe, [w.shape[0] for w in weights])


register(Method("sparsegpt", "prune", "OBS reconstruction with the layer Hessian", HessianStats, solve, solve_group))
