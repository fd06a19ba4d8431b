"""Magnitude pruning: |W| with one threshold per matrix (N:M per row block)."""

from __future__ import annotations

import torch

from prunekit.methods import Method, Solution, register
from prunekit.methods.masks import select
from prunekit.recipe import Recipe


def magnitude_mask(weight: torch.Tensor, recipe: Recipe) -> torch.Tensor:
    return select(weight.abs().float(), recipe.pattern, per_row=False)


def solve(weight: torch.Tensor, stats: None, recipe: Recipe) -> Solution:
    mask = magnitude_mask(weight, recipe)
    return Solution(weight.float().masked_fill(mask, 0.0), mask, {})


register(Method("magnitude", "prune", "|W|, one threshold per matrix", None, solve))
