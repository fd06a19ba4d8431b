"""Mask selection shared by the pruning methods: lowest scores per row, per matrix, or N of every M."""

from __future__ import annotations

import torch

from prunekit.errors import ConfigError
from prunekit.recipe import Pattern


def lowest_per_row(scores: torch.Tensor, fraction: float) -> torch.Tensor:
    """True for the ⌊in_features·fraction⌋ lowest scores of each row (stable sort, as the reference)."""
    k = int(scores.shape[1] * fraction)
    mask = torch.zeros_like(scores, dtype=torch.bool)
    if k > 0:
        order = torch.sort(scores, dim=1, stable=True).indices[:, :k]
        mask.scatter_(1, order, True)
    return mask


def lowest_overall(scores: torch.Tensor, fraction: float) -> torch.Tensor:
    """True for the ⌊numel·fraction⌋ lowest scores of the whole matrix (one threshold)."""
    k = int(scores.numel() * fraction)
    mask = torch.zeros(scores.numel(), dtype=torch.bool, device=scores.device)
    if k > 0:
        order = torch.sort(scores.flatten(), stable=True).indices[:k]
        mask[order] = True
    return mask.view_as(scores)


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


def select(scores: torch.Tensor, pattern: Pattern, per_row: bool) -> torch.Tensor:
    if pattern.is_nm:
        return lowest_n_of_m(scores, pattern.n, pattern.m)
    return lowest_per_row(scores, pattern.sparsity) if per_row else lowest_overall(scores, pattern.sparsity)
