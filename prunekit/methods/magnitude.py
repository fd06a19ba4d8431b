"""Magnitude pruning: |W| with one threshold per matrix (N:M per row block)."""

from __future__ import annotations

import torch

from prunekit.methods import Method, Solution, register
from prunekit.methods.masks import select
from prunekit.recipe import Recipe


def magnitude_mask(weight: torch.Tensor, recipe: Recipe) -> torch.Tensor:
    """|W| (in the weight's own dtype, so bf16 ties stay ties) against one threshold per matrix:
    exactly ⌊numel·s⌋ weights, or with ``conventions="study"`` the reference's ``|W| <= sorted(|W|)[⌊numel·s⌋]``."""
    return select(weight.abs().float(), recipe.pattern, per_row=False, reference_threshold=recipe.conventions == "study")


def solve(weight: torch.Tensor, stats: None, recipe: Recipe) -> Solution:
    mask = magnitude_mask(weight, recipe)
    return Solution(weight.float().masked_fill(mask, 0.0), mask, {})


register(Method("magnitude", "prune", "|W|, one threshold per matrix", None, solve))
