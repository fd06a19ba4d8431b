"""Pruning-mask overlap (study App. D.3, analysis-spec §2): IoU, IoMin, densities, chance level,
seed intersections and unions, streamed tensor by tensor with masks packed as bits.

Pruned set of checkpoint c for one (layer, module): ``A = [W == 0]``, or ``A ∧ [W_D != 0]`` when
the dense weights are given (weights that were zero before pruning are not "pruned"; their number
is reported as ``natively_zero``).

Sets compared (study Figure 2, Tables 16-17):
- ``within_a`` / ``within_b``: the seeds of one calibration language, IoU = |∩ seeds| / |∪ seeds|
  (present when that side has at least two checkpoints);
- ``between``: IoU(M_I^a, M_I^b) of the two sides' seed intersections (with one checkpoint per
  side, simply IoU(A, B)).
Aggregates are micro averages Σ|∩| / Σ|∪| (spec §2.4); ``iou_layer_mean`` is the plain mean over
layers, which is what the study's Tables 16-17 print.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from functools import reduce
from typing import Any, Sequence

import numpy as np

from prunekit.analysis.checkpoints import (
    DEFAULT_CHUNK_ELEMENTS,
    MODULE_ORDER,
    Checkpoint,
    TensorKey,
    TensorReader,
    check_same_layout,
    open_checkpoint,
    packed_zero_mask,
    popcount,
)
from prunekit.progress import progress_bar

DENSE_SPARSITY_WARNING = 0.01  # a "pruned" checkpoint with fewer zeros than this looks dense
PRUNED_DENSE_WARNING = 0.10  # a "dense" model with more zeros than this looks pruned


class DenseCheckpointWarning(UserWarning):
    """A checkpoint given as pruned has (almost) no zero weights, or the dense model has many."""


def iou(inter: int, union: int) -> float:
    """|A∧B| / |A∨B|; 1 when the union is empty (two empty masks agree)."""
    return 1.0 if union == 0 else inter / union


def iomin(inter: int, counts: Sequence[int]) -> float | None:
    """|A∧B| / min(|A|, |B|); undefined (None) when a set is empty."""
    smallest = min(counts)
    return None if smallest == 0 else inter / smallest


def chance_level(densities: Sequence[float]) -> float | None:
    """Expected IoU of independent random masks with these densities: Πρ / (1 − Π(1−ρ)).
    For two masks ρρ'/(ρ+ρ'−ρρ') — 1/3 at 50 % sparsity."""
    both = float(np.prod(densities))
    either = 1.0 - float(np.prod([1.0 - d for d in densities]))
    return None if either == 0 else both / either


def overlap_of_bools(masks: Sequence[np.ndarray]) -> dict[str, Any]:
    """Overlap statistics of plain boolean masks (a small reference used by tests and the API)."""
    packed = [np.packbits(np.asarray(m, dtype=bool).reshape(-1)) for m in masks]
    return _overlap(packed, int(np.asarray(masks[0]).size))


def _overlap(packed: Sequence[np.ndarray], numel: int) -> dict[str, Any]:
    counts = [popcount(p) for p in packed]
    inter = popcount(reduce(np.bitwise_and, packed))
    union = popcount(reduce(np.bitwise_or, packed))
    densities = [c / numel for c in counts]
    return {
        "numel": numel, "counts": counts, "intersection": inter, "union": union,
        "iou": iou(inter, union), "iomin": iomin(inter, counts), "densities": densities,
        "chance": chance_level(densities),
    }


@dataclass
class _Aggregate:
    """Micro sums over several (layer, module) cells."""

    inter: int = 0
    union: int = 0
    numel: int = 0
    expected_inter: float = 0.0
    expected_union: float = 0.0
    iou_sum: float = 0.0
    cells: int = 0
    counts: list[int] | None = None
    min_counts: int = 0

    def add(self, cell: dict[str, Any]) -> None:
        self.inter += cell["intersection"]
        self.union += cell["union"]
        self.numel += cell["numel"]
        d = cell["densities"]
        self.expected_inter += cell["numel"] * float(np.prod(d))
        self.expected_union += cell["numel"] * (1.0 - float(np.prod([1 - x for x in d])))
        self.iou_sum += cell["iou"]
        self.cells += 1
        self.counts = list(cell["counts"]) if self.counts is None else [a + b for a, b in zip(self.counts, cell["counts"])]
        self.min_counts += min(cell["counts"])

    def to_json(self) -> dict[str, Any]:
        counts = self.counts or []
        return {
            "numel": self.numel, "counts": counts, "intersection": self.inter, "union": self.union,
            "iou": iou(self.inter, self.union),
            "iomin": None if self.min_counts == 0 else self.inter / self.min_counts,
            "iou_layer_mean": self.iou_sum / self.cells if self.cells else None,
            "densities": [c / self.numel for c in counts] if self.numel else [],
            "chance": None if self.expected_union == 0 else self.expected_inter / self.expected_union,
            "cells": self.cells,
        }


class _Comparison:
    def __init__(self, sets: list[str], description: str):
        self.sets = sets
        self.description = description
        self.per_layer: list[dict[str, Any]] = []
        self.per_module: dict[str, _Aggregate] = {}
        self.total = _Aggregate()

    def add(self, key: TensorKey, tensor: str, cell: dict[str, Any]) -> None:
        self.per_layer.append({"layer": key.layer, "module": key.module, "tensor": tensor, **cell})
        self.per_module.setdefault(key.module, _Aggregate()).add(cell)
        self.total.add(cell)

    def to_json(self) -> dict[str, Any]:
        return {
            "sets": self.sets,
            "description": self.description,
            "per_layer": self.per_layer,
            "per_module": {m: self.per_module[m].to_json() for m in MODULE_ORDER if m in self.per_module},
            "global": self.total.to_json(),
        }


def _as_checkpoint(item: str | Checkpoint, label: str) -> Checkpoint:
    return item if isinstance(item, Checkpoint) else open_checkpoint(item, label)


class _Tally:
    """What the mask comparison counts, tensor by tensor: the comparisons, each checkpoint's raw zeros and
    pruned weights, and the dense model's native zeros."""

    def __init__(self, group_a: list[Checkpoint], group_b: list[Checkpoint], dense: Checkpoint | None):
        self.groups = {"a": group_a, "b": group_b}
        self.dense = dense
        self.everyone = group_a + group_b + ([dense] if dense is not None else [])
        self.between = _Comparison(
            ["∩a", "∩b"],
            "IoU of the seed intersections of side a and side b (study Fig. 2 right, Table 17)"
            if len(group_a) + len(group_b) > 2 else "IoU of the masks of a and b",
        )
        self.within = {
            side: _Comparison([c.label for c in group], f"IoU over the {len(group)} checkpoints of side {side}: "
                              "|∩| / |∪| (study Fig. 2 left, Table 16)")
            for side, group in self.groups.items() if len(group) > 1
        }
        self.zero_counts = {c.label: {m: [0, 0] for m in MODULE_ORDER} for c in self.everyone}  # raw zeros, numel
        self.pruned_counts = {c.label: 0 for c in group_a + group_b}
        self.native_total = {m: [0, 0] for m in MODULE_ORDER}

    def _count_zeros(self, label: str, module: str, zeros: int, numel: int) -> None:
        self.zero_counts[label][module][0] += zeros
        self.zero_counts[label][module][1] += numel

    def add(self, key: TensorKey, name: str, readers: dict[str, TensorReader], chunk_elements: int, numel: int) -> None:
        """One (layer, module) tensor of every checkpoint: its packed zero masks, intersected per side."""
        keep, native = None, None
        if self.dense is not None:
            dz = packed_zero_mask(readers["dense"], name, chunk_elements)
            native = popcount(dz)
            self._count_zeros("dense", key.module, native, numel)
            self.native_total[key.module][0] += native
            self.native_total[key.module][1] += numel
            keep = np.invert(dz)  # pad bits become 1, but are 0 in every mask they meet
            del dz
        extra = {} if native is None else {"natively_zero": native}
        sides = {}
        for side, group in self.groups.items():
            packed = []
            for ckpt in group:
                z = packed_zero_mask(readers[ckpt.label], name, chunk_elements)
                self._count_zeros(ckpt.label, key.module, popcount(z), numel)
                if keep is not None:
                    np.bitwise_and(z, keep, out=z)
                self.pruned_counts[ckpt.label] += popcount(z)
                packed.append(z)
            if side in self.within:
                self.within[side].add(key, name, _overlap(packed, numel) | extra)
            sides[side] = reduce(np.bitwise_and, packed) if len(packed) > 1 else packed[0]
            del packed
        self.between.add(key, name, _overlap([sides["a"], sides["b"]], numel) | extra)

    def checkpoints(self) -> tuple[dict[str, Any], list[str]]:
        """Each checkpoint's measured sparsity, and the warnings for a dense-looking pruned one (or the reverse)."""
        checkpoints: dict[str, Any] = {}
        warned: list[str] = []
        for ckpt in self.everyone:
            per_module = self.zero_counts[ckpt.label]
            zeros = sum(v[0] for v in per_module.values())
            total = sum(v[1] for v in per_module.values())
            measured = zeros / total if total else 0.0
            role = "dense" if ckpt is self.dense else "pruned"
            info = {"role": role, "spec": ckpt.spec, "zeros": zeros, "numel": total, "measured_sparsity": measured,
                    "per_module": {m: v[0] / v[1] for m, v in per_module.items() if v[1]}}
            if role == "pruned":
                info["pruned"] = self.pruned_counts[ckpt.label]
                if measured < DENSE_SPARSITY_WARNING:
                    warned.append(
                        f"checkpoint {ckpt.label} ('{ckpt.spec}') looks dense: measured sparsity {measured:.4f} of its "
                        "q/k/v/attn.out/ffn linears; pass pruned checkpoints as A/B and the dense model as --dense"
                    )
            elif measured > PRUNED_DENSE_WARNING:
                warned.append(
                    f"the dense model '{ckpt.spec}' has measured sparsity {measured:.4f}; is it really the unpruned model?"
                )
            checkpoints[ckpt.label] = info
        return checkpoints, warned

    def natively_zero(self) -> dict[str, Any]:
        zeros = sum(v[0] for v in self.native_total.values())
        total = sum(v[1] for v in self.native_total.values())
        return {"total": zeros, "numel": total, "per_module": {m: v[0] for m, v in self.native_total.items() if v[1]}}


def compare_masks(
    a: str | Checkpoint,
    b: str | Checkpoint,
    dense: str | Checkpoint | None = None,
    seeds_a: Sequence[str | Checkpoint] = (),
    seeds_b: Sequence[str | Checkpoint] = (),
    chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
    progress: bool = True,
    reader_factory=TensorReader,
) -> dict[str, Any]:
    """Mask overlap of checkpoints A (+ its seeds) and B (+ its seeds), optionally dense-aware.

    Streams one tensor at a time: per (layer, module) it holds only one row block of one
    checkpoint as floats and one packed bit mask per checkpoint.
    """
    group_a = [_as_checkpoint(a, "a")] + [_as_checkpoint(s, f"a#{i + 2}") for i, s in enumerate(seeds_a)]
    group_b = [_as_checkpoint(b, "b")] + [_as_checkpoint(s, f"b#{i + 2}") for i, s in enumerate(seeds_b)]
    tally = _Tally(group_a, group_b, None if dense is None else _as_checkpoint(dense, "dense"))
    check_same_layout(tally.everyone)
    keys = sorted(group_a[0].linears().items(), key=lambda item: item[0].order)

    readers = {c.label: reader_factory(c) for c in tally.everyone}
    try:
        with progress_bar("comparing masks", len(keys), progress) as update:
            for done, (key, name) in enumerate(keys, 1):
                tally.add(key, name, readers, chunk_elements, int(np.prod(group_a[0].shapes[name])))
                update(done, len(keys))
    finally:
        for reader in readers.values():
            reader.close()

    checkpoints, warned = tally.checkpoints()
    for message in warned:
        warnings.warn(message, DenseCheckpointWarning, stacklevel=2)
    dense_aware = tally.dense is not None
    result: dict[str, Any] = {
        "dense_aware": dense_aware,
        "definition": "A = [W == 0]" + (" ∧ [W_dense != 0]" if dense_aware else ""),
        "modules": [m for m in MODULE_ORDER if any(k.module == m for k, _ in keys)],
        "num_layers": 1 + max(k.layer for k, _ in keys),
        "chunk_elements": chunk_elements,
        "groups": {"a": [c.label for c in group_a], "b": [c.label for c in group_b]},
        "checkpoints": checkpoints,
        "comparisons": {"between": tally.between.to_json(),
                        **{f"within_{s}": c.to_json() for s, c in tally.within.items()}},
        "warnings": warned,
    }
    if dense_aware:
        result["natively_zero"] = tally.natively_zero()
    return result
