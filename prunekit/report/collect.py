"""Read a sweep's runs dir: every run's description (run.json) and evaluation (results.json), and
each model's dense evaluation (dense/<model key>/results.json)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prunekit.errors import ConfigError, SchemaError
from prunekit.artifacts import (ANALYSIS_FILE, ANALYSIS_RESULT_FILE, DENSE_FILE, PUSH_FILE, RUN_FILE, SWEEP_ANALYSIS_KIND,
                                SWEEP_ANALYSIS_RESULT_KIND, SWEEP_DENSE_KIND, SWEEP_FILE, SWEEP_KIND, SWEEP_PUSH_KIND,
                                SWEEP_RUN_KIND, read_results, results_path)
from prunekit.io import read_json, read_versioned


@dataclass
class RunResult:
    run_id: str
    model: str  # display name
    model_key: str
    method: str  # label, e.g. wanda, gptq-w4g128
    pattern: str  # 50%, 2:4, '-' for quantization
    calibration: str  # en, en+de, all, none
    seed: int | None
    results: dict[str, Any]
    path: Path


@dataclass
class DenseResult:
    model: str
    model_key: str
    results: dict[str, Any]
    path: Path


@dataclass
class Collected:
    runs_dir: Path
    runs: list[RunResult]
    dense: dict[str, DenseResult]  # model key -> dense evaluation
    missing: list[dict[str, Any]] = field(default_factory=list)  # runs without an evaluation yet
    sweep: dict[str, Any] | None = None  # sweep.json of the last sweep, for orderings
    analysis: list[dict[str, Any]] = field(default_factory=list)  # compared calibration pairs
    warnings: list[str] = field(default_factory=list)  # damaged files that were skipped, each named


def _state(path: Path) -> str | None:
    """The state in a stage's status file; None when it is missing or damaged (the stage is not done)."""
    try:
        data = read_json(path)
    except (OSError, SchemaError):
        return None
    return data.get("state") if isinstance(data, dict) else None


RERUN = "rerun the sweep with its config to {}"


def _damaged(path: Path, err: Exception, what: str, rerun: str | None = None) -> str:
    """The warning for a file the report skips. ``rerun``: what rerunning the sweep does about it, said only
    where a rerun fixes it: the sweep redoes a stage whose output is damaged, but a file written by a prunekit
    with another major schema version needs that prunekit (the error says so), not a rerun."""
    reason = err if isinstance(err, SchemaError) else f"{type(err).__name__}: {err}"
    newer = isinstance(err, SchemaError) and "schema version" in str(err)
    advice = f"; {RERUN.format(rerun)}" if rerun and not newer else ""
    return f"skipped {path}: {reason} ({what}{advice})"


def collect(runs_dir: str | Path) -> Collected:
    runs_dir = Path(runs_dir).expanduser()
    if not runs_dir.is_dir():
        raise ConfigError(f"runs dir '{runs_dir}' does not exist; run `prunekit sweep CONFIG --runs-dir {runs_dir}` first")
    if not (runs_dir / "runs").is_dir() and not (runs_dir / "dense").is_dir():
        raise ConfigError(f"'{runs_dir}' holds no sweep (no runs/ or dense/ inside); point at the --runs-dir of a sweep")
    warnings: list[str] = []
    sweep = None
    if (runs_dir / SWEEP_FILE).exists():
        try:
            sweep = read_versioned(runs_dir / SWEEP_FILE, SWEEP_KIND)
        except (SchemaError, OSError) as err:
            warnings.append(_damaged(runs_dir / SWEEP_FILE, err, "the report keeps the default orderings", "rewrite it"))
    runs: list[RunResult] = []
    missing: list[dict[str, Any]] = []
    for directory in sorted(p for p in (runs_dir / "runs").glob("*") if p.is_dir() and not p.name.startswith(".")):
        desc_path = directory / RUN_FILE
        if not desc_path.exists():
            continue
        try:
            desc = read_versioned(desc_path, SWEEP_RUN_KIND)
        except (SchemaError, OSError) as err:
            warnings.append(_damaged(desc_path, err, "the run is left out", "rewrite it"))
            continue
        label = {"run_id": desc["run_id"], "model": desc["model"]["name"], "method": desc["method"]["label"],
                 "calibration": desc["calibration"], "seed": desc["seed"]}
        results_file = results_path(directory)
        status_path = directory / "eval.status.json"
        done = status_path.exists() and _state(status_path) == "done"
        if not results_file.exists() or not done:
            missing.append(label | {"reason": "not evaluated yet" if not results_file.exists() else "evaluation not finished"})
            continue
        try:
            results = read_results(results_file)
        except (SchemaError, OSError) as err:
            missing.append(label | {"reason": str(err)})
            warnings.append(_damaged(results_file, err, "the run is left out", "redo its evaluation"))
            continue
        runs.append(RunResult(
            run_id=desc["run_id"], model=desc["model"]["name"], model_key=desc["model"]["key"],
            method=desc["method"]["label"], pattern=(desc.get("pattern") or {}).get("label", "-"),
            calibration=desc["calibration"], seed=desc["seed"], results=results, path=directory,
        ))
    dense: dict[str, DenseResult] = {}
    for directory in sorted(p for p in (runs_dir / "dense").glob("*") if p.is_dir() and not p.name.startswith(".")):
        if not (directory / DENSE_FILE).exists() or not results_path(directory).exists():
            continue
        status_path = directory / "dense.status.json"
        if not status_path.exists() or _state(status_path) != "done":
            continue
        try:
            desc = read_versioned(directory / DENSE_FILE, SWEEP_DENSE_KIND)
            dense_results = read_results(results_path(directory))
        except (SchemaError, OSError) as err:
            warnings.append(_damaged(directory, err, "the dense row is left out", "redo it"))
            continue
        dense[directory.name] = DenseResult(desc["model"]["name"], directory.name, dense_results, directory)
    if warnings and not runs:
        fixable = any(RERUN.format("") in w for w in warnings)
        raise ConfigError(
            f"no usable results in '{runs_dir}': " + "; ".join(warnings)
            + (f". Rerun `prunekit sweep CONFIG --runs-dir {runs_dir}` with the sweep's config to redo the damaged stages"
               if fixable else "")
        )
    return Collected(runs_dir, runs, dense, missing, sweep, collect_analysis(runs_dir, warnings), warnings)


def collect_analysis(runs_dir: Path, warnings: list[str] | None = None) -> list[dict[str, Any]]:
    """Finished analysis pairs: what was compared and where its compare summary lies (or why n/a). A damaged
    description or result is skipped with a warning (added to ``warnings``)."""
    out = []
    for directory in sorted(p for p in (runs_dir / "analysis").glob("*") if p.is_dir() and not p.name.startswith(".")):
        if not (directory / ANALYSIS_FILE).exists() or not (directory / ANALYSIS_RESULT_FILE).exists():
            continue
        try:
            desc = read_versioned(directory / ANALYSIS_FILE, SWEEP_ANALYSIS_KIND)
            result = read_versioned(directory / ANALYSIS_RESULT_FILE, SWEEP_ANALYSIS_RESULT_KIND)
        except (SchemaError, OSError) as err:
            if warnings is not None:
                warnings.append(_damaged(directory, err, "the comparison is left out", "redo it"))
            continue
        summary = directory / result["summary"] if result.get("summary") else None
        out.append({
            "model": desc.get("model_name", desc["model"]), "method": desc["method"], "pattern": desc["pattern"],
            "pair": desc["pair"], "seeds": len(desc.get("runs_a", [])), "status": result["status"], "note": result.get("note"),
            "summary": str(summary) if summary is not None and summary.exists() else None,
            "summary_text": summary.read_text(encoding="utf-8") if summary is not None and summary.exists() else None,
        })
    return out


def checkpoint_facts(run: RunResult) -> dict[str, Any]:
    """What the leaderboard names a checkpoint by besides its labels: the quantization (bits, group
    size) from run.json and, once the push stage is done, the Hub repo from push.json."""
    desc = read_versioned(run.path / RUN_FILE, SWEEP_RUN_KIND)
    push = None
    status = run.path / "push.status.json"
    if (run.path / PUSH_FILE).exists() and status.exists() and read_json(status).get("state") == "done":
        data = read_versioned(run.path / PUSH_FILE, SWEEP_PUSH_KIND)
        push = {"repo_id": data.get("repo_id"), "url": data.get("url"), "private": data.get("private")}
    return {"quantization": (desc.get("method") or {}).get("quantization"), "push": push}
