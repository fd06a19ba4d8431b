"""Wanda (Sun et al. 2023): score |W_ij|·‖X_j‖₂, pruned within each output row."""

from __future__ import annotations

import torch

from prunekit.methods import Method, Solution, register
from prunekit.methods.masks import select
from prunekit.recipe import Recipe


class WandaStats:
    """Mean over calibration sequences of the squared L2 norm of each input column."""

    def __init__(self, in_features: int, device: torch.device | str = "cpu"):
        self.sum_sq = torch.zeros(in_features, dtype=torch.float64, device=device)
        self.sequences = 0

    def update(self, x: torch.Tensor) -> None:
        """Σ over the batch's tokens of x², per input column: fp32 within a batch, fp64 across batches."""
        self.sequences += x.shape[0] if x.dim() == 3 else 1
        x = x.reshape(-1, x.shape[-1]).float()
        self.sum_sq += x.square().sum(dim=0)

    @property
    def scaler_row(self) -> torch.Tensor:
        return (self.sum_sq / max(self.sequences, 1)).float()


def wanda_scores(weight: torch.Tensor, stats: WandaStats) -> torch.Tensor:
    return weight.abs().float() * torch.sqrt(stats.scaler_row.to(weight.device)).unsqueeze(0)


def wanda_mask(weight: torch.Tensor, stats: WandaStats, recipe: Recipe) -> torch.Tensor:
    return select(wanda_scores(weight, stats), recipe.pattern, per_row=True)


def solve(weight: torch.Tensor, stats: WandaStats, recipe: Recipe) -> Solution:
    mask = wanda_mask(weight, stats, recipe)
    return Solution(weight.float().masked_fill(mask, 0.0), mask, {})


register(Method("wanda", "prune", "|W|·‖X‖₂ within each output row", WandaStats, solve))
