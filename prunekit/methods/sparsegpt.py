"""SparseGPT (Frantar & Alistarh 2023): OBS weight reconstruction over 128-column blocks."""

from __future__ import annotations

import torch

from prunekit.methods import Method, Solution, register
from prunekit.methods.hessian import HessianStats, damped_inverse_cholesky, prepare_hessian
from prunekit.methods.masks import lowest_n_of_m, lowest_overall
from prunekit.recipe import Recipe


def sparsegpt_solve(weight: torch.Tensor, hessian: torch.Tensor, recipe: Recipe) -> Solution:
    """Prune ``weight`` [out, in] given H [in, in].

    Unstructured: at the start of each block, the ⌊rows·block·s⌋ lowest w²/diag(Hinv)² of the
    block are pruned (the reference uses ``<=`` a threshold, which prunes one entry more per
    block; prunekit prunes exactly the requested fraction). N:M: every M columns, the N lowest
    of the error-updated weights are pruned.
    """
    pattern = recipe.pattern
    W, H = prepare_hessian(weight, hessian)
    Hinv, damping = damped_inverse_cholesky(H, recipe.dampening)
    rows, cols = W.shape
    mask = torch.zeros_like(W, dtype=torch.bool)
    losses = torch.zeros(rows, dtype=torch.float32, device=W.device)
    bs = recipe.blocksize
    for i1 in range(0, cols, bs):
        i2 = min(i1 + bs, cols)
        W1 = W[:, i1:i2].clone()
        Hinv1 = Hinv[i1:i2, i1:i2]
        d = torch.diag(Hinv1)
        Err1 = torch.zeros_like(W1)
        if pattern.is_nm:
            mask1 = torch.zeros_like(W1, dtype=torch.bool)
        else:
            mask1 = lowest_overall(W1.square() / d.square().unsqueeze(0), pattern.sparsity)
        for i in range(i2 - i1):
            if pattern.is_nm and i % pattern.m == 0:
                block = W1[:, i : i + pattern.m].square() / d[i : i + pattern.m].square().unsqueeze(0)
                mask1[:, i : i + pattern.m] = lowest_n_of_m(block, pattern.n, pattern.m)
            w = W1[:, i]
            q = w.masked_fill(mask1[:, i], 0.0)
            err = (w - q) / d[i]
            losses += (w - q).square() / d[i].square() / 2
            W1[:, i:] -= err.unsqueeze(1) * Hinv1[i, i:].unsqueeze(0)
            W1[:, i] = q
            Err1[:, i] = err
        W[:, i1:i2] = W1
        mask[:, i1:i2] = mask1
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    W.masked_fill_(mask, 0.0)
    return Solution(W, mask, {"loss": float(losses.sum()), "damping": damping})


def solve(weight: torch.Tensor, stats: HessianStats, recipe: Recipe) -> Solution:
    return sparsegpt_solve(weight, stats.hessian, recipe)


register(Method("sparsegpt", "prune", "OBS reconstruction with the layer Hessian", HessianStats, solve))
