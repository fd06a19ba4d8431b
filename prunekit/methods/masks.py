"""Mask selection shared by the pruning methods: lowest scores per row, per matrix, or N of every M."""

from __future__ import annotations

import numpy as np
import torch

from prunekit.errors import ConfigError
from prunekit.recipe import Pattern


def _lowest_k(scores: torch.Tensor, k: int) -> torch.Tensor:
    """True for the k lowest entries of each row of ``scores`` [rows, cols], ties taken in column order.

    Exactly the first k positions of a stable ascending sort (the reference), found with one
    selection (kthvalue) instead of a sort: everything below the k-th value, then as many of the
    entries equal to it as are still needed, leftmost first. NaN scores fall back to the sort."""
    rows, cols = scores.shape
    if k <= 0:
        return torch.zeros_like(scores, dtype=torch.bool)
    if k >= cols:
        return torch.ones_like(scores, dtype=torch.bool)
    kth = _kth_smallest(scores, k)
    mask = scores <= kth
    if bool((torch.count_nonzero(mask, dim=1) == k).all()):  # no ties at the k-th value: the k lowest, exactly
        return mask
    if torch.isnan(scores).any():
        mask = torch.zeros_like(scores, dtype=torch.bool)
        mask.scatter_(1, torch.sort(scores, dim=1, stable=True).indices[:, :k], True)
        return mask
    below = scores < kth
    tied = scores == kth
    missing = k - below.sum(dim=1, keepdim=True)
    return below | (tied & (tied.cumsum(dim=1) <= missing))


def _kth_smallest(scores: torch.Tensor, k: int) -> torch.Tensor:
    """The k-th smallest value of each row, [rows, 1]. On the CPU numpy's introselect, which finds
    the value without tracking indices (5× faster than ``torch.kthvalue`` on a 4096×128 block)."""
    if scores.device.type == "cpu" and scores.dtype in (torch.float32, torch.float64):
        return torch.from_numpy(np.partition(scores.detach().numpy(), k - 1, axis=1)[:, k - 1 : k])
    return torch.kthvalue(scores, k, dim=1, keepdim=True).values


ROW_CHUNK = 1024  # rows selected at a time: the selection's temporaries (a copy, int64 tie counts) stay small


def lowest_per_row(scores: torch.Tensor, fraction: float) -> torch.Tensor:
    """True for the ⌊in_features·fraction⌋ lowest scores of each row (stable-sort order, as the reference)."""
    k = int(scores.shape[1] * fraction)
    if scores.dim() != 2 or scores.shape[0] <= ROW_CHUNK:
        return _lowest_k(scores, k)
    mask = torch.empty(scores.shape, dtype=torch.bool, device=scores.device)
    for lo in range(0, scores.shape[0], ROW_CHUNK):  # rows are independent
        mask[lo : lo + ROW_CHUNK] = _lowest_k(scores[lo : lo + ROW_CHUNK], k)
    return mask


def at_or_below_reference_threshold(scores: torch.Tensor, fraction: float) -> torch.Tensor:
    """The reference's rule (``--conventions study``): True where ``scores <= sorted(scores)[⌊numel·fraction⌋]``,
    that is ⌊numel·fraction⌋ + 1 entries plus every entry tied with the last of them."""
    k = min(int(scores.numel() * fraction), scores.numel() - 1)
    flat = scores.mT.reshape(1, -1) if scores.dim() == 2 and not scores.is_contiguous() and scores.mT.is_contiguous() else scores.reshape(1, -1)
    return scores <= _kth_smallest(flat, k + 1).view(())


def lowest_overall(scores: torch.Tensor, fraction: float) -> torch.Tensor:
    """True for the ⌊numel·fraction⌋ lowest scores of the whole matrix (one threshold; stable-sort order).

    ``scores`` may be the transposed view of a contiguous tensor (SparseGPT holds its blocks
    transposed): the threshold and the mask are then found in memory order, with no copy, and
    the row-major order of the reference matters only when entries tie at the threshold."""
    k = int(scores.numel() * fraction)
    if scores.dim() == 2 and not scores.is_contiguous() and scores.mT.is_contiguous() and 0 < k < scores.numel():
        flat = scores.mT.reshape(1, -1)  # a view
        kth = _kth_smallest(flat, k)
        mask = (flat <= kth).view_as(scores.mT).mT
        surplus = int(torch.count_nonzero(mask)) - k
        if surplus == 0:
            return mask
        if not bool(torch.isnan(kth).any()):  # ties at the threshold: the last `surplus` tied entries in row-major order go
            tied = torch.nonzero(scores == kth.view(()))  # row-major (lexicographic) order, whatever the layout
            mask[tied[-surplus:, 0], tied[-surplus:, 1]] = False
            return mask
    return _lowest_k(scores.reshape(1, -1), k).view_as(scores)


def lowest_n_of_m(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """True for the N lowest scores in every block of M consecutive input columns of each row."""
    rows, cols = scores.shape
    if cols % m:
        raise ConfigError(f"N:M pattern {n}:{m} needs in_features divisible by {m}, but a matrix has {cols} columns")
    blocks = scores.reshape(rows, cols // m, m)
    idx = torch.topk(blocks, n, dim=2, largest=False).indices
    mask = torch.zeros_like(blocks, dtype=torch.bool)
    mask.scatter_(2, idx, True)
    return mask.view(rows, cols)


def select(scores: torch.Tensor, pattern: Pattern, per_row: bool, reference_threshold: bool = False) -> torch.Tensor:
    """The pruning mask for ``pattern``. ``reference_threshold`` (``--conventions study``) applies the
    reference's ``<=`` rule to a one-threshold (per-matrix) selection; per-row and N:M selections
    already prune exactly what the reference prunes."""
    if pattern.is_nm:
        return lowest_n_of_m(scores, pattern.n, pattern.m)
    if per_row:
        return lowest_per_row(scores, pattern.sparsity)
    if reference_threshold:
        return at_or_below_reference_threshold(scores, pattern.sparsity)
    return lowest_overall(scores, pattern.sparsity)
