"""Expand a validated sweep config into tasks: one dense task per model, one run per grid point,
one analysis task per (pair of calibration sets × model × method × pattern × seed)."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from typing import Any

from prunekit.recipe import CalibrationSpec, Pattern, Recipe, parse_pattern, run_identity
from prunekit.sweep.config import MethodEntry, ModelEntry, SweepConfig, slug


@dataclass(frozen=True)
class DenseTask:
    model: ModelEntry

    @property
    def task_id(self) -> str:
        return f"dense:{self.model.key}"

    @property
    def key(self) -> str:
        return self.model.key


@dataclass(frozen=True)
class RunTask:
    run_id: str  # the 12-hex hash of the run identity: names the run dir
    identity: dict[str, Any]
    model: ModelEntry
    method: MethodEntry
    pattern: Pattern | None  # None for quantization
    sparsity: float | None  # what was given to parse_pattern
    pattern_spec: str | None
    calibration: CalibrationSpec  # its languages None: a method that needs no calibration (magnitude)

    @property
    def task_id(self) -> str:
        return f"run:{self.run_id}"

    @property
    def calib(self) -> str | None:
        """The calibration set (``en``, ``en+de``), None for a method that needs no calibration."""
        return self.calibration.languages

    @property
    def seed(self) -> int | None:
        return self.calibration.seed if self.calibration.uses_text else None

    @property
    def pattern_label(self) -> str:
        if self.pattern is None:
            return "-"
        return self.pattern.name if self.pattern.is_nm else f"{self.pattern.sparsity * 100:g}%"

    def describe(self) -> dict[str, Any]:
        """What run.json records besides the identity: the labels reports group by."""
        return {
            "run_id": self.run_id,
            "identity": self.identity,
            "model": {"spec": self.model.spec, "name": self.model.name, "dtype": self.model.dtype,
                      "revision": self.model.revision, "key": self.model.key},
            "method": {"label": self.method.label, "method": self.method.method, "kind": self.method.kind,
                       "quantization": None if self.method.quantization is None else asdict(self.method.quantization)},
            "pattern": None if self.pattern is None else {"sparsity": self.pattern.sparsity, "n": self.pattern.n,
                                                          "m": self.pattern.m, "label": self.pattern_label},
            "calibration": self.calib if self.calib is not None else "none",
            "seed": self.seed,
        }


@dataclass(frozen=True)
class AnalysisTask:
    """Compare the checkpoints calibrated on ``pair[0]`` and ``pair[1]`` (first seed each; the other
    seeds go with them, each side a list, to prunekit.analysis.compare for seed intersections)."""

    model: ModelEntry
    method: MethodEntry
    pattern_label: str
    pair: tuple[str, str]
    runs_a: tuple[str, ...]  # run ids, one per seed
    runs_b: tuple[str, ...]

    @property
    def key(self) -> str:
        blob = json.dumps([list(self.runs_a), list(self.runs_b)])
        return f"{slug(self.pair[0])}-vs-{slug(self.pair[1])}-" + hashlib.sha256(blob.encode()).hexdigest()[:10]

    @property
    def task_id(self) -> str:
        return f"analysis:{self.key}"

    @property
    def runs(self) -> tuple[str, ...]:
        return self.runs_a + self.runs_b


@dataclass
class Grid:
    dense: list[DenseTask]
    runs: list[RunTask]
    analysis: list[AnalysisTask]

    def task(self, task_id: str):
        for task in [*self.dense, *self.runs, *self.analysis]:
            if task.task_id == task_id:
                return task
        raise KeyError(task_id)


def expand(config: SweepConfig) -> Grid:
    dense = [DenseTask(model) for model in config.models]
    runs: list[RunTask] = []
    seen: set[str] = set()
    for model in config.models:
        for method in config.methods:
            if method.kind == "quantize":
                recipes = [(Recipe(method.method, quantization=method.quantization, conventions=config.conventions), None, None, None)]
            else:
                recipes = []
                for sparsity, pattern in config.patterns:
                    parsed = parse_pattern(sparsity, pattern)
                    recipes.append((Recipe(method.method, pattern=parsed, conventions=config.conventions), parsed, sparsity, pattern))
            for recipe, parsed, sparsity, pattern in recipes:
                calibrations = [(c, s) for c in config.calib_sets for s in config.seeds] if method.needs_calibration else [(None, None)]
                for calib, seed in calibrations:
                    calibration = config.calibration_spec(calib, seed)
                    identity, run_id = run_identity(model.spec, model.revision, recipe, calibration, model.dtype, config.skip_layers)
                    if run_id in seen:
                        continue
                    seen.add(run_id)
                    runs.append(RunTask(run_id, identity, model, method, parsed, sparsity, pattern, calibration))
    analysis: list[AnalysisTask] = []
    for a, b in config.analysis_pairs:
        for model in config.models:
            for method in config.methods:
                if method.kind != "prune" or not method.needs_calibration:  # masks of quantized models mean nothing
                    continue
                mine = [r for r in runs if r.model.key == model.key and r.method.label == method.label]
                for label in dict.fromkeys(r.pattern_label for r in mine):
                    side_a = tuple(r.run_id for r in mine if r.pattern_label == label and r.calib == a)
                    side_b = tuple(r.run_id for r in mine if r.pattern_label == label and r.calib == b)
                    if side_a and side_b:
                        analysis.append(AnalysisTask(model, method, label, (a, b), side_a, side_b))
    return Grid(dense, runs, analysis)
