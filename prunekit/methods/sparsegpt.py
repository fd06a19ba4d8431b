"""SparseGPT (Frantar & Alistarh 2023): OBS weight reconstruction over 128-column blocks."""

from __future__ import annotations

import numpy as np
import torch

from prunekit.methods import Method, Solution, lapack, register
from prunekit.methods.hessian import HessianStats, damped_inverse_cholesky, full_fp32_matmul, one_cpu_thread, prepare_hessian
from prunekit.methods.masks import lowest_n_of_m, select as select_mask
from prunekit.recipe import Recipe

SUB_BLOCK = 32  # columns whose rank-1 updates are applied one by one; the rest of a block gets one GEMM per sub-block


def sparsegpt_solve(weight: torch.Tensor, hessian: torch.Tensor, recipe: Recipe) -> Solution:
    """Prune ``weight`` [out, in] given H [in, in]."""
    W, H = prepare_hessian(weight, hessian)
    Hinv, damping = damped_inverse_cholesky(H, recipe.dampening, overwrite=True)
    del H
    return _solve_stacked(W.T.contiguous(), Hinv, damping, recipe, [W.shape[0]])[0]


def _solve_stacked(WT: torch.Tensor, Hinv: torch.Tensor, damping: float, recipe: Recipe, rows: list[int]) -> list[Solution]:
    """Prune the weights stacked in WT in place: WT is their transpose [in, Σ out] (fp32, contiguous,
    dead inputs already zeroed) and Hinv the upper Cholesky factor of (H + λI)⁻¹.

    The weights are held transposed for the whole solve, so that a weight column is a contiguous
    row of WT and every per-column operation runs along contiguous memory; the returned weights
    and masks are [out, in] views of it. WT may stack several matrices that share H (``rows`` =
    their row counts): every step is row-wise except the unstructured mask and the GEMM that
    carries a block's error to the later columns, which are done per matrix, so each gets exactly
    its own solution.

    Unstructured: at the start of each block, the ⌊rows·block·s⌋ lowest w²/diag(Hinv)² of the
    block are pruned (the reference uses ``<=`` a threshold, which prunes one entry more per
    block; prunekit prunes exactly the requested fraction; ties go in the [out, in] row-major
    order of the reference's flattened block). With ``recipe.conventions == "study"`` the
    reference's ``<=`` is applied instead. N:M: every M columns, the N lowest of the
    error-updated weights are pruned.

    Column loop, per column i of a block: err = (w − q)/d with q = w where kept and 0 where pruned,
    then W1[:, i+1:] −= err ⊗ Hinv1[i, i+1:]. The reference applies that rank-1 update to every later
    column of the 128-column block, one column at a time; here it reaches only the later columns of
    the same ``SUB_BLOCK``-column sub-block, and a sub-block's errors reach the rest of the block in
    one GEMM when it is done (the same lazy batching the reference uses between blocks, one level
    down). Every column still sees every earlier column's error before its own is computed, so the
    result is the reference's up to fp32 summation order; an N:M group lies in one sub-block. The
    column itself keeps w and the pruned entries are zeroed once per block.
    """
    maskT = torch.zeros_like(WT, dtype=torch.bool)
    offsets = [0]
    for count in rows:
        offsets.append(offsets[-1] + count)
    parts = list(zip(offsets[:-1], offsets[1:]))
    loss = torch.zeros(len(parts), dtype=torch.float64, device=WT.device)
    with one_cpu_thread(WT.device), full_fp32_matmul():  # error feedback in full fp32, never TF32
        _blocks(WT, Hinv, recipe, maskT, loss, parts)
    W, mask = WT.mT, maskT.mT
    return [Solution(W[a:b], mask[a:b], {"loss": float(loss[i]), "damping": damping}) for i, (a, b) in enumerate(parts)]


def _blocks(WT, Hinv, recipe, maskT, loss, parts) -> None:
    """The 128-column blocks, in place on WT, maskT and loss (all [in, out])."""
    pattern, bs = recipe.pattern, recipe.blocksize
    study = recipe.conventions == "study"  # the reference's `<=` threshold per block
    cols = WT.shape[0]
    sub = pattern.m * -(-SUB_BLOCK // pattern.m) if pattern.is_nm else SUB_BLOCK  # an N:M group never straddles two
    ErrT_buffer = torch.empty(min(bs, cols), WT.shape[1], dtype=WT.dtype, device=WT.device)
    for i1 in range(0, cols, bs):
        i2 = min(i1 + bs, cols)
        count = i2 - i1
        W1T, M1T, ErrT = WT[i1:i2], maskT[i1:i2], ErrT_buffer[:count]
        Hinv1 = Hinv[i1:i2, i1:i2]
        d = torch.diagonal(Hinv1)
        if not pattern.is_nm:
            scoresT = W1T.square().div_(d.square().unsqueeze(1))
            for a, b in parts:  # one threshold per matrix block
                M1T[:, a:b] = select_mask(scoresT[:, a:b].T, pattern, per_row=False, reference_threshold=study).T
            del scoresT
        # Float masks (1.0 = pruned): a product with one is ~3.5× faster per column than torch.where on a
        # bool mask, and zeroing a block by a product ~20× faster than masked_fill_.
        P1T = M1T.to(WT.dtype)
        select, error, update = _column_steps(W1T, M1T, P1T, ErrT, Hinv1, pattern)
        for j1 in range(0, count, sub):
            j2 = min(j1 + sub, count)
            for i in range(j1, j2):
                if pattern.is_nm and i % pattern.m == 0:
                    select(i)
                error(i)
                if i + 1 < j2:
                    update(i, j2)
            if j2 < count:  # the sub-block's errors reach the rest of the block in one GEMM per matrix
                for a, b in parts:
                    W1T[j2:, a:b].addmm_(Hinv1[j1:j2, j2:].T, ErrT[j1:j2, a:b], alpha=-1.0)
        W1T.sub_(W1T * P1T)  # pruned entries to +0.0 (w − w), kept ones unchanged
        row_losses = (ErrT * ErrT).sum(dim=0).double()  # per weight row: the same whatever is stacked with it
        for i, (a, b) in enumerate(parts):
            loss[i] += row_losses[a:b].sum() / 2
            if i2 < cols:  # the block's errors reach all later columns
                WT[i2:, a:b].addmm_(Hinv[i1:i2, i2:].T, ErrT[:, a:b], alpha=-1.0)


def _column_steps(W1T, M1T, P1T, ErrT, Hinv1, pattern):
    """The steps of the column loop over one block, as closures over per-column views.
    ``select(i)``: the N:M mask of columns i..i+M (M1T, and P1T as floats) from the current weights;
    ``error(i)``: ErrT[i] = W1T[i]·P1T[i] / Hinv1[i, i], that is (w − q)/d; ``update(i, j2)``:
    W1T[i+1:j2] −= Hinv1[i, i+1:j2] ⊗ ErrT[i], the rank-1 update of the sub-block's later columns.

    On the CPU in fp32 they are numpy operations and BLAS ger (scipy), whose per-call overhead is
    a third of torch's: 2–3× faster for these small operands, and bit-identical to torch's
    addcmul_. Elsewhere (GPUs) they are torch operations."""
    sger = lapack.ger_in_place() if USE_BLAS_COLUMN_STEPS and W1T.device.type == "cpu" and W1T.dtype == torch.float32 else None
    if sger is not None:
        w, mask, p, e, h = W1T.numpy(), M1T.numpy(), P1T.numpy(), ErrT.numpy(), Hinv1.numpy()
        d = np.diagonal(h)
        multiply = np.multiply

        def select(i):
            rows = slice(i, i + pattern.m)
            scores = np.square(w[rows]) / np.square(d[rows])[:, None]
            if scores.shape[0] == pattern.m:
                chosen = scores <= _nth_smallest_per_column(scores, pattern.n)
                if np.count_nonzero(chosen) == pattern.n * scores.shape[1]:  # no ties at the threshold, no NaN
                    mask[rows], p[rows] = chosen, chosen
                    return
            mask[rows] = lowest_n_of_m(torch.from_numpy(scores).T, pattern.n, pattern.m).T.numpy()
            p[rows] = mask[rows]

        def error(i):
            row = e[i]
            multiply(w[i], p[i], out=row)
            row /= d[i]

        def update(i, j2):  # Fortran sees the C-ordered W1T[i+1:j2] as its transpose: Aᵀ −= e ⊗ h
            sger(-1.0, e[i], h[i, i + 1 : j2], a=w[i + 1 : j2].T, overwrite_a=1)

        return select, error, update

    d = torch.diagonal(Hinv1)
    d_items, w_rows, p_rows, e_rows = d.unbind(0), W1T.unbind(0), P1T.unbind(0), ErrT.unbind(0)
    e_wide, h_cols = ErrT.unsqueeze(1).unbind(0), Hinv1.unsqueeze(2).unbind(0)  # per-column views, one call each

    def select(i):
        rows = slice(i, i + pattern.m)
        scores = W1T[rows].square() / d[rows].square().unsqueeze(1)
        M1T[rows] = lowest_n_of_m(scores.T, pattern.n, pattern.m).T
        P1T[rows] = M1T[rows]

    def error(i):
        torch.mul(w_rows[i], p_rows[i], out=e_rows[i]).div_(d_items[i])

    def update(i, j2):
        W1T[i + 1 : j2].addcmul_(h_cols[i][i + 1 : j2], e_wide[i], value=-1.0)

    return select, error, update


def _nth_smallest_per_column(scores: np.ndarray, n: int) -> np.ndarray:
    """The n-th smallest of each column of a [M, cols] array. 2 of 4 (the common case) by a
    min/max network, ~5× faster than a partition along the short axis."""
    if scores.shape[0] == 4 and n == 2:
        a, b, c, e = scores
        low1, high1, low2, high2 = np.minimum(a, b), np.maximum(a, b), np.minimum(c, e), np.maximum(c, e)
        return np.minimum(np.maximum(low1, low2), np.minimum(high1, high2))
    return np.partition(scores, n - 1, axis=0)[n - 1]


USE_BLAS_COLUMN_STEPS = True  # tests turn it off to compare with the torch steps


def solve(weight: torch.Tensor, stats: HessianStats, recipe: Recipe) -> Solution:
    """Linears that read the same input (q/k/v, gate/up) share one ``stats`` and so one factorisation."""
    return solve_group([weight], stats, recipe)[0]


def solve_group(weights: list[torch.Tensor], stats: HessianStats, recipe: Recipe) -> list[Solution]:
    """``solve`` for several Linears sharing ``stats``, in one column loop over their stacked rows."""
    Hinv, damping, dead = stats.damped_factor(recipe.dampening, consume=True)
    WT = torch.cat([w.T for w in weights], dim=1).to(torch.float32)  # [in, Σ out], a copy even of one fp32 weight
    WT[dead] = 0.0
    return _solve_stacked(WT, Hinv, damping, recipe, [w.shape[0] for w in weights])


def prepare(stats: HessianStats, recipe: Recipe) -> None:
    """Factorise the Hessian ahead of the solve (cached in ``stats``; XᵀX is consumed)."""
    stats.damped_factor(recipe.dampening, consume=True)


register(Method("sparsegpt", "prune", "OBS reconstruction with the layer Hessian", HessianStats, solve, solve_group, prepare,
                one_cpu_thread))
