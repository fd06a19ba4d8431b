"""GPTQ (Frantar et al. 2023): weight quantization with OBS error feedback, and its no-feedback
baseline round-to-nearest (RTN).

Both write fake-quantized (dequantized) fp32 weights: every group of ``group_size`` input columns
of a row holds at most 2^bits distinct values ``scale·(q − zero)``, q ∈ {0 … 2^bits − 1}. The grids
themselves (scales, zero points, and the column → group map where groups are not contiguous) come
back as a ``QuantGrid`` in ``Solution.grid``: ``prunekit.packing`` writes the integer
checkpoint from them. A grid's scale is a value of the weight's own dtype (rounded to it when the
model is bf16/fp16), so the fake-quantized weights are exactly what a packed checkpoint, which stores
scales in that dtype, dequantizes to.

Reference semantics (IST-DASLab/gptq ``fasterquant``), matched here:
- H = 2/n·XXᵀ (``HessianStats``); dead inputs (diag H = 0) get H[d,d] = 1 and W[:,d] = 0;
  damping ``recipe.dampening``·mean(diag H); Hinv = upper Cholesky factor of (H + λI)⁻¹.
- min-max grid per output row: [min(w, 0), max(w, 0)] split into 2^bits − 1 steps, zero point
  round(−min/scale); symmetric: ±max|w|, zero point 2^(bits−1).
- groups: the grid is refitted when column j with j % group_size == 0 is reached, on the
  columns j … j+group_size of W as it stands then (the lazy batch updates of earlier blocks
  applied, the in-block updates not yet: exactly the reference); ``group_size = -1`` fits one
  grid per row on the unmodified weights.
- act-order: columns are processed by descending diag(H) (stable sort); with static groups the
  grids are fitted on the (dead-column-zeroed) weights before permuting, and column j uses the
  grid of its original group. Without static groups, groups are refitted in processing order.
- loss per layer = Σ (w − q)²/d²/2.
Deliberate difference: a symmetric grid is always ±max|w| (the reference leaves the lower end at 0
for a group with no negative weight, which clips its upper half; llm-compressor does as here).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from prunekit.methods import Method, Solution, register
from prunekit.methods.hessian import HessianStats, damped_inverse_cholesky, full_fp32_matmul, prepare_hessian
from prunekit.recipe import Quantization, Recipe


@dataclass
class QuantGrid:
    """The grids a quantized weight [rows, columns] lies on: ``weight = scale·(q − zero)``,
    q ∈ {0 … 2^bits − 1}. ``scale`` and ``zero`` are fp32 [rows, groups] (one group = per-row grid);
    column c uses group ``c // group_size``, or ``g_idx[c]`` when ``g_idx`` is set (act-order with
    groups refitted in processing order: the groups are then not contiguous)."""

    scale: torch.Tensor
    zero: torch.Tensor
    bits: int
    group_size: int
    symmetric: bool
    g_idx: torch.Tensor | None = None


def minmax_grid(
    x: torch.Tensor, bits: int, symmetric: bool, dtype: torch.dtype | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point [rows, 1] of the per-row min-max grid of ``x`` [rows, columns]; with a
    half-precision ``dtype`` the scale is rounded to a value of that dtype (the zero point follows)."""
    maxq = 2**bits - 1
    x = x.float()
    xmin = torch.clamp(x.amin(dim=1), max=0.0)
    xmax = torch.clamp(x.amax(dim=1), min=0.0)
    if symmetric:
        xmax = torch.maximum(xmin.abs(), xmax)
        xmin = -xmax
    flat = (xmin == 0) & (xmax == 0)  # an all-zero row: any grid holds 0 exactly
    xmin = torch.where(flat, torch.full_like(xmin, -1.0), xmin)
    xmax = torch.where(flat, torch.full_like(xmax, 1.0), xmax)
    scale = (xmax - xmin) / maxq
    if dtype is not None and dtype != torch.float32:
        scale = scale.to(dtype).float()
    if symmetric:
        zero = torch.full_like(scale, (maxq + 1) / 2)
    else:
        zero = torch.clamp(torch.round(-xmin / scale), 0, maxq)
    return scale.unsqueeze(1), zero.unsqueeze(1)


def fake_quantize(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """Round ``x`` onto the grid ``scale·(q − zero)``, q ∈ [0, 2^bits − 1], and dequantize."""
    q = torch.clamp(torch.round(x / scale) + zero, 0, 2**bits - 1)
    return scale * (q - zero)


def _group_grids(W: torch.Tensor, quantization: Quantization, dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Scales and zero points [rows, groups] of contiguous groups of ``W``, fitted now."""
    scales, zeros = [], []
    for start in range(0, W.shape[1], quantization.group_size):
        scale, zero = minmax_grid(W[:, start : start + quantization.group_size], quantization.bits, quantization.symmetric, dtype)
        scales.append(scale)
        zeros.append(zero)
    return torch.cat(scales, dim=1), torch.cat(zeros, dim=1)


def _grid(scale: torch.Tensor, zero: torch.Tensor, quantization: Quantization, g_idx: torch.Tensor | None = None) -> QuantGrid:
    return QuantGrid(scale.float().cpu(), zero.float().cpu(), quantization.bits, quantization.group_size, quantization.symmetric, g_idx)


def _info(quantization: Quantization, **extra) -> dict:
    return {
        "bits": quantization.bits,
        "group_size": quantization.group_size,
        "act_order": quantization.act_order,
        "static_groups": quantization.act_order and quantization.static_groups and quantization.group_size != -1,
        "symmetric": quantization.symmetric,
        **extra,
    }


def gptq_solve(weight: torch.Tensor, hessian: torch.Tensor, recipe: Recipe) -> Solution:
    """Quantize ``weight`` [out, in] given H [in, in]; returns fp32 fake-quantized weights."""
    quantization = recipe.quantization or Quantization()
    row_grid = _row_grid(weight, quantization)
    W, H = prepare_hessian(weight, hessian)
    dead = int((torch.diag(hessian) == 0).sum())
    with full_fp32_matmul():
        perm = None
        if quantization.act_order:
            perm = torch.argsort(torch.diag(H), descending=True, stable=True)
            H = H[perm][:, perm]
        Hinv, damping = damped_inverse_cholesky(H, recipe.dampening)
        return _solve_prepared(W, Hinv, damping, dead, perm, row_grid, quantization, recipe.blocksize, weight.dtype)


def _row_grid(weight: torch.Tensor, quantization: Quantization) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The per-row grid of ``group_size = -1``, fitted on the weights as given (reference)."""
    if quantization.group_size != -1:
        return None
    return minmax_grid(weight, quantization.bits, quantization.symmetric, weight.dtype)


def _solve_prepared(
    W: torch.Tensor,
    Hinv: torch.Tensor,
    damping: float,
    dead: int,
    perm: torch.Tensor | None,
    row_grid: tuple[torch.Tensor, torch.Tensor] | None,
    quantization: Quantization,
    blocksize: int = 128,
    dtype: torch.dtype | None = None,
) -> Solution:
    """The column loop on dead-column-zeroed ``W`` (original column order) and the factor ``Hinv`` of
    the (permuted, if ``perm``) damped Hessian.

    Per column j of a block: q = quant(w); err = (w − q)/d; W1[:, j:] −= err ⊗ Hinv1[j, j:] — the
    reference's products element for element. The block is held transposed ([columns, rows],
    contiguous) so that every per-column operation runs along contiguous memory. ``dtype``: the
    weight's own dtype, which every grid's scale is a value of.
    """
    bits, group_size, symmetric = quantization.bits, quantization.group_size, quantization.symmetric
    rows, cols = W.shape
    static = perm is not None and quantization.static_groups and group_size != -1
    if static:  # grids fitted before permuting; held as [groups, rows] for contiguous lookups
        scales, zeros = (t.T.contiguous() for t in _group_grids(W, quantization, dtype))
        group_of = (perm // group_size).tolist()
    else:  # fitted as the loop reaches each group, in processing order
        scales, zeros = [], []
    if perm is not None:
        W = W[:, perm]
    if row_grid is not None:
        scale, zero = (t.squeeze(1) for t in row_grid)
    Q = torch.empty_like(W)
    losses = torch.zeros(rows, dtype=torch.float64, device=W.device)
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        count = i2 - i1
        W1T = W[:, i1:i2].T.contiguous()
        QT = torch.empty_like(W1T)
        ErrT = torch.empty_like(W1T)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(count):
            j = i1 + i
            if static:
                scale, zero = scales[group_of[j]], zeros[group_of[j]]
            elif group_size != -1 and j % group_size == 0:
                # refit on W as it stands: earlier blocks' updates applied, this block's not (reference)
                scale, zero = (t.squeeze(1) for t in minmax_grid(W[:, j : j + group_size], bits, symmetric, dtype))
                scales.append(scale)
                zeros.append(zero)
            w = W1T[i]
            q = fake_quantize(w, scale, zero, bits)
            QT[i] = q
            err = ErrT[i]
            torch.sub(w, q, out=err)
            err.div_(Hinv1[i, i])
            if i + 1 < count:
                W1T[i + 1 :].sub_(Hinv1[i, i + 1 :].unsqueeze(1) * err.unsqueeze(0))
        Q[:, i1:i2] = QT.T
        Err1 = ErrT.T
        losses += Err1.double().square().sum(dim=1) / 2  # Σ (w − q)²/d²/2
        if i2 < cols:
            W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    if perm is not None:
        Q = Q[:, torch.argsort(perm)]
    if row_grid is not None:
        grid = _grid(*row_grid, quantization)
    elif static:
        grid = _grid(scales.T, zeros.T, quantization)
    else:
        g_idx = None
        if perm is not None:  # group k holds the columns processed k-th: perm[k·g … (k+1)·g)
            g_idx = torch.empty(cols, dtype=torch.int32)
            g_idx[perm.cpu()] = torch.arange(cols, dtype=torch.int32) // group_size
        grid = _grid(torch.stack(scales, dim=1), torch.stack(zeros, dim=1), quantization, g_idx)
    return Solution(Q, None, _info(quantization, loss=float(losses.sum()), damping=damping, dead_columns=dead), grid)


def rtn_quantize(weight: torch.Tensor, quantization: Quantization) -> tuple[torch.Tensor, QuantGrid]:
    """Round-to-nearest on the same min-max grids (contiguous groups), no error feedback."""
    W = weight.float()
    if quantization.group_size == -1:
        scale, zero = minmax_grid(W, quantization.bits, quantization.symmetric, weight.dtype)
        return fake_quantize(W, scale, zero, quantization.bits), _grid(scale, zero, quantization)
    scales, zeros = _group_grids(W, quantization, weight.dtype)
    index = torch.arange(W.shape[1], device=W.device) // quantization.group_size
    return fake_quantize(W, scales[:, index], zeros[:, index], quantization.bits), _grid(scales, zeros, quantization)


def solve(weight: torch.Tensor, stats: HessianStats, recipe: Recipe) -> Solution:
    """Without act-order, Linears that read the same input (q/k/v, gate/up) share one factorisation."""
    quantization = recipe.quantization or Quantization()
    if quantization.act_order or not hasattr(stats, "damped_factor"):
        return gptq_solve(weight, stats.hessian, recipe)
    row_grid = _row_grid(weight, quantization)
    with full_fp32_matmul():
        Hinv, damping, dead = stats.damped_factor(recipe.dampening)
        W = weight.to(torch.float32, copy=True)
        W[:, dead] = 0.0
        return _solve_prepared(W, Hinv, damping, int(dead.sum()), None, row_grid, quantization, recipe.blocksize, weight.dtype)


def solve_rtn(weight: torch.Tensor, stats: None, recipe: Recipe) -> Solution:
    quantization = recipe.quantization or Quantization()
    quantized, grid = rtn_quantize(weight, quantization)
    return Solution(quantized, None, _info(quantization), grid)


register(Method("gptq", "quantize", "GPTQ: quantization with Hessian error feedback", HessianStats, solve))
register(Method("rtn", "quantize", "round-to-nearest quantization baseline (no calibration needed)", None, solve_rtn))
