"""Find a checkpoint's evaluation when push is not told where it is.

A checkpoint evaluated in place keeps ``CHECKPOINT/results.json``. A sweep's (and the demo's) run keeps it one
folder up, ``RUNS_DIR/runs/<run hash>/results.json`` beside ``checkpoint/``, and the dense model's evaluation in
``RUNS_DIR/dense/<model key>/results.json`` (described by its ``dense.json``). Only results measured on this very run
(the record's ``run_id``) are taken, and a dense evaluation only when it is of the model the run was pruned from."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prunekit.artifacts import DENSE_FILE, RESULTS_FILE

DENSE_DESCRIPTION = DENSE_FILE  # a sweep's dense dir: its model (spec, revision, dtype)


@dataclass
class FoundResults:
    """Which evaluation files push uses, and what it says about them."""

    results: Path | None = None
    dense_results: Path | None = None
    notes: list[str] = field(default_factory=list)


def _read(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) else None


def _run_id(results: dict[str, Any]) -> str | None:
    record = (results.get("model") or {}).get("record") or {}
    return record.get("run_id") if isinstance(record, dict) else None


def find_results(checkpoint: Path, record: dict[str, Any]) -> Path | None:
    """The checkpoint's own ``results.json``, else its run dir's (one folder up) when measured on this run."""
    own = checkpoint / RESULTS_FILE
    if own.is_file():
        return own
    beside = checkpoint.resolve().parent / RESULTS_FILE
    data = _read(beside) if beside.is_file() else None
    if data is not None and _run_id(data) == record.get("run_id"):
        return beside
    return None


def _dense_specs(record: dict[str, Any], results: dict[str, Any] | None) -> set[str]:
    specs = {(record.get("identity") or {}).get("model"), (record.get("base_model") or {}).get("spec")}
    if results:
        specs.add((results.get("dense") or {}).get("spec"))
    return {spec for spec in specs if isinstance(spec, str) and spec}


def find_dense_results(checkpoint: Path, record: dict[str, Any], results: dict[str, Any] | None) -> Path | None:
    """The sweep's dense evaluation of the model this run was pruned from (``RUNS_DIR/dense/*/results.json``, for a
    checkpoint at ``RUNS_DIR/runs/<hash>/checkpoint``), if there is exactly one."""
    run = checkpoint.resolve().parent
    dense_root = run.parent.parent / "dense"
    if run.parent.name != "runs" or not dense_root.is_dir():
        return None
    specs, found = _dense_specs(record, results), []
    for directory in sorted(p for p in dense_root.iterdir() if p.is_dir()):
        path = directory / RESULTS_FILE
        description, data = _read(directory / DENSE_DESCRIPTION) or {}, _read(path) if path.is_file() else None
        if data is None:
            continue
        names = {(description.get("model") or {}).get("spec"),
                 (data.get("model") or {}).get("spec")}
        if names & specs:
            found.append(path)
    return found[0] if len(found) == 1 else None


def locate(checkpoint: Path, record: dict[str, Any], results: Path | None, dense_results: Path | None) -> FoundResults:
    """The results and dense results push uses: those given, else those found (:func:`find_results`,
    :func:`find_dense_results`), with a note saying which file was used or which flag to add."""
    found = FoundResults(results, dense_results)
    if results is None:
        found.results = find_results(checkpoint, record)
        if found.results is not None:
            found.notes.append(f"results: using {found.results} (found {'in' if found.results.parent == checkpoint else 'beside'} "
                               "the checkpoint; --results PATH overrides it)")
        else:
            found.notes.append(f"results: none found in {checkpoint} or beside it, so the card shows no evaluation; "
                               f"evaluate it (prunekit eval {checkpoint} --out RESULTS.json) and add --results RESULTS.json")
    if dense_results is None and found.results is not None:
        data = _read(found.results)
        found.dense_results = find_dense_results(checkpoint, record, data)
        if found.dense_results is not None:
            found.notes.append(f"dense results: using {found.dense_results} (the sweep's dense evaluation of the base "
                               "model; --dense-results PATH overrides it)")
        else:
            found.notes.append("dense results: none found, so the card shows no change against the base model; add "
                               "--dense-results DENSE.json (the base model's results.json from `prunekit eval BASE --out DENSE.json`)")
    return found
