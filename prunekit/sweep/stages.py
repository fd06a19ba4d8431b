"""The work of one task: the dense evaluation of a model, a run (prune -> eval -> push) or an analysis
pair, each stage held by its status file (:mod:`prunekit.sweep.state`) in the task's directory
(:mod:`prunekit.sweep.layout`, which also says what is done). Every backend (in-process, local
processes, submitit) ends up in ``execute_tasks``.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import os
import shutil
import time
import traceback
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from prunekit.artifacts import (ANALYSIS_RESULT_FILE, PUSH_FILE, SWEEP_ANALYSIS_RESULT_KIND, SWEEP_PUSH_KIND, overall_sparsity,
                                record_path, results_path, write_results)
from prunekit.errors import PrunekitError
from prunekit.io import versioned, write_json_atomic
from prunekit.sweep.config import SweepConfig
from prunekit.sweep.grid import AnalysisTask, DenseTask, Grid, RunTask, expand
from prunekit.sweep.layout import (ANALYSIS_KIND, DENSE_KIND, RUN_KIND, analysis_dir, analysis_fingerprint, dense_dir,
                                   dense_fingerprint, ensure_task_dir, eval_fingerprint, log, push_fingerprint, read_snapshot,
                                   run_dir, stage_names, task_dir, task_states)
from prunekit.sweep.state import DONE, StageBusy, clean_partials, clear_status, read_status, stage, stage_state


# ---------------------------------------------------------------------------------------------
# Outcomes
# ---------------------------------------------------------------------------------------------


@dataclass
class TaskOutcome:
    task_id: str
    state: str  # done | failed | busy
    ran: list[str] = field(default_factory=list)  # stages executed now
    skipped: list[str] = field(default_factory=list)  # stages already done
    error: str | None = None
    stage: str | None = None  # the stage that failed
    seconds: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return self.__dict__.copy()


# ---------------------------------------------------------------------------------------------
# Library calls (evaluation, hub and analysis are imported on first use: lm-eval is slow to import)
# ---------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=4)
def dense_reference(spec: str, dtype: str, trust_remote_code: bool):
    """One DenseReference per dense model and process: every run of a sweep compares against the same
    cached states, so its config and tokenizer (seconds for a 262k vocabulary) are read once. It loads
    the dense weights only on a cache miss and drops them after each evaluation."""
    return _evaluation().DenseReference.from_spec(spec, dtype, trust_remote_code)


def _evaluation():
    import prunekit.evaluation as evaluation  # on first use: it imports lm-eval

    return evaluation


def evaluation_spec(config: SweepConfig, model_entry):
    """The sweep's EvaluationSpec for one model (its dtype and trust_remote_code)."""
    return replace(config.evaluation, dtype=model_entry.dtype, trust_remote_code=model_entry.trust_remote_code)


def evaluate_checkpoint(config: SweepConfig, checkpoint: Path, model_entry, progress: bool,
                        out: Path | None = None) -> dict[str, Any]:
    """Evaluate a pruned checkpoint on disk, streamed a layer at a time, every language in one pass, against
    the dense model (whose hidden states the dense stage cached, so the dense model is not even read).
    ``out``: the run's results.json, written as results finish (a failed stage run again keeps them)."""
    dense = None
    if config.hidden_states:
        dense = dense_reference(model_entry.spec, model_entry.dtype, model_entry.trust_remote_code)
    return _evaluation().evaluate(str(checkpoint), evaluation_spec(config, model_entry), dense=dense, out=out,
                                  progress=progress)


def evaluate_dense(config: SweepConfig, model_entry, progress: bool, out: Path | None = None) -> dict[str, Any]:
    """The dense model's own evaluation (the report's dense row), streamed like every run's; as the
    reference side it also caches the dense hidden states every run of this model compares against
    (collected in its own pass: the dense model is read once)."""
    dense = None
    if config.hidden_states:
        dense = dense_reference(model_entry.spec, model_entry.dtype, model_entry.trust_remote_code)
    return _evaluation().evaluate(model_entry.spec, evaluation_spec(config, model_entry), dense=dense, out=out,
                                  progress=progress, revision=model_entry.revision)


def _free_memory() -> None:
    gc.collect()
    with contextlib.suppress(Exception):
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def run_dense(config: SweepConfig, runs_dir: Path, task: DenseTask, progress: bool) -> TaskOutcome:
    directory = ensure_task_dir(dense_dir(runs_dir, task), DENSE_KIND, {
        "model": {"spec": task.model.spec, "name": task.model.name, "dtype": task.model.dtype, "revision": task.model.revision},
    })
    fingerprint = dense_fingerprint(config)
    outcome = TaskOutcome(task.task_id, DONE)
    if stage_state(directory, "dense", fingerprint) == "done" and results_path(directory).exists():
        outcome.skipped.append("dense")
        return outcome
    with stage(directory, "dense", fingerprint, {"model": task.model.spec}) as details:
        log(runs_dir, f"{task.task_id} dense start")  # once this process holds the stage (two sweeps may race to it)
        clean_partials(directory)  # only once this process holds the stage: another may be writing there
        # The dense model against itself: its own perplexity per language (the "dense" row) and, as the
        # reference side, its hidden states -- cached by content hash in cache_dir("dense") for every run.
        results = evaluate_dense(config, task.model, progress, out=results_path(directory))
        write_results(results_path(directory), results)
        details["languages"] = list(config.eval_languages)
        details["dense_hidden_states"] = {lang: (entry.get("dense_cache") or {}).get("status")
                                          for lang, entry in (results.get("hidden_states") or {}).items()}
    outcome.ran.append("dense")
    log(runs_dir, f"{task.task_id} dense done")
    return outcome


DENSE_POLL_S = 5.0


def ensure_dense(config: SweepConfig, runs_dir: Path, task: DenseTask, progress: bool) -> str:
    """The dense evaluation a run's eval stage compares against, done: run it here if nobody has (or its
    runner died), wait for it while another process runs it (two sweeps on one runs dir, array tasks of
    one model). It never runs twice: the dense stage's lock admits one runner. Returns its final state."""
    directory = dense_dir(runs_dir, task)
    fingerprint = dense_fingerprint(config)
    waited = False
    while True:
        state = stage_state(directory, "dense", fingerprint)
        if state == "done" and not results_path(directory).exists():
            state = "todo"
        if state in ("done", "failed"):
            if waited:
                log(runs_dir, f"{task.task_id} finished elsewhere ({state}); waiting over")
            return state
        if state in ("todo", "stale"):
            try:
                run_dense(config, runs_dir, task, progress)
            except StageBusy:  # somebody claimed it a moment before us: wait for it
                time.sleep(DENSE_POLL_S)
                continue
            return stage_state(directory, "dense", fingerprint)
        if not waited:
            log(runs_dir, f"{task.task_id} is being run by another process; waiting for it")
            waited = True
        time.sleep(DENSE_POLL_S)


def run_one(config: SweepConfig, runs_dir: Path, task: RunTask, progress: bool) -> TaskOutcome:
    from prunekit.pipeline import prune
    from prunekit.recipe import EngineSpec, OutputSpec

    directory = ensure_task_dir(run_dir(runs_dir, task), RUN_KIND, task.describe())
    outcome = TaskOutcome(task.task_id, DONE)
    states = task_states(config, runs_dir, task)
    if "busy" in states.values():
        return TaskOutcome(task.task_id, "busy", error=f"stages {states} are being run by another process")
    checkpoint = directory / "checkpoint"

    if states["prune"] == "done":
        outcome.skipped.append("prune")
    else:
        clear_status(directory, "eval", "push")
        with contextlib.suppress(FileNotFoundError):
            results_path(directory).unlink()
        log(runs_dir, f"{task.task_id} prune start")
        outcome.stage = "prune"
        with stage(directory, "prune", None, {"identity_hash": task.run_id}) as details:
            clean_partials(directory)  # only once this process holds the stage: another may be writing there
            result = prune(
                task.model.spec, task.method.method, sparsity=task.sparsity, pattern=task.pattern_spec,
                quantization=task.method.quantization, calibration=task.calibration,
                output=OutputSpec(checkpoint, task.model.dtype, overwrite=True), revision=task.model.revision,
                engine=EngineSpec(config.device, config.skip_layers, config.batch_size,
                                  trust_remote_code=task.model.trust_remote_code), progress=progress,
            )
            details["record_run_id"] = result.record["run_id"]
            details["overall_sparsity"] = overall_sparsity(result.record)  # None for a quantized run
            details["timings"] = result.record["timings"]
        del result  # streamed to disk: the eval stage reads the checkpoint a layer at a time
        outcome.ran.append("prune")
        log(runs_dir, f"{task.task_id} prune done")

    fingerprint = eval_fingerprint(config, directory)
    if stage_state(directory, "eval", fingerprint) == "done" and results_path(directory).exists():
        outcome.skipped.append("eval")
    else:
        dense_task = DenseTask(task.model)
        dense_state = ensure_dense(config, runs_dir, dense_task, progress)
        outcome.stage = "eval"
        log(runs_dir, f"{task.task_id} eval start")
        with stage(directory, "eval", fingerprint) as details:
            clean_partials(directory)
            if dense_state != "done":
                raise PrunekitError(f"the dense evaluation of {task.model.name} is {dense_state}, not done; see {dense_dir(runs_dir, dense_task)}")
            results = evaluate_checkpoint(config, checkpoint, task.model, progress, out=results_path(directory))
            write_results(results_path(directory), results)
            details["languages"] = list(config.eval_languages)
            details["dense_hidden_states"] = {lang: (entry.get("dense_cache") or {}).get("status")
                                              for lang, entry in (results.get("hidden_states") or {}).items()}
        _free_memory()
        outcome.ran.append("eval")
        log(runs_dir, f"{task.task_id} eval done")

    _free_memory()
    if config.push:
        fingerprint = push_fingerprint(config, directory)
        if stage_state(directory, "push", fingerprint) == "done":
            outcome.skipped.append("push")
        else:
            outcome.stage = "push"
            log(runs_dir, f"{task.task_id} push start")
            with stage(directory, "push", fingerprint) as details:
                details.update(_push(config, task, directory, runs_dir))
                write_json_atomic(directory / PUSH_FILE, versioned(SWEEP_PUSH_KIND, dict(details)))
            outcome.ran.append("push")
            log(runs_dir, f"{task.task_id} push done")

    if not config.keep_checkpoints and checkpoint.exists():
        shutil.rmtree(checkpoint, ignore_errors=True)
    outcome.stage = None
    return outcome


def _push(config: SweepConfig, task: RunTask, directory: Path, runs_dir: Path) -> dict[str, Any]:
    from prunekit import hub

    results = results_path(directory)
    dense_results = results_path(dense_dir(runs_dir, DenseTask(task.model)))
    pushed = hub.push(
        directory / "checkpoint", hub.PushTarget(namespace=config.push["namespace"], private=config.push["private"]),
        hub.CardInputs(results if results.exists() else None, dense_results if dense_results.exists() else None),
        endpoint=config.push.get("endpoint"),
    )
    return {"repo_id": pushed.repo_id, "url": pushed.url, "private": config.push["private"],
            "commit": getattr(pushed, "commit", None), "committed": getattr(pushed, "committed", None)}


def publish_collection(config: SweepConfig, runs_dir: Path, runs: list[RunTask]) -> list[str]:
    """After the pushes: the sweep's Hub collection of the repos ``runs`` pushed, linked from each card
    (prunekit.hub.collection). Returns the notes for the summary; a Hub failure is a note, not an error."""
    import json

    from prunekit.hub.collection import publish_sweep_collection

    pushed = [runs_dir / "runs" / task.run_id / PUSH_FILE for task in runs]
    repo_ids = [json.loads(path.read_text())["repo_id"] for path in pushed if path.is_file()]
    if not repo_ids:
        return []
    try:
        done = publish_sweep_collection(config.name, repo_ids, config.push["namespace"], private=config.push["private"],
                                        endpoint=config.push.get("endpoint"), **config.collection)
    except PrunekitError as err:
        return [f"the sweep's Hub collection was not updated ({err}); rerun the sweep to retry"]
    return [f"Hub collection: {done.url} ({len(done.items)} checkpoints; {len(done.added)} added, "
            f"{len(done.cards_updated)} cards updated)"]


def run_analysis(config: SweepConfig, runs_dir: Path, task: AnalysisTask, progress: bool) -> TaskOutcome:
    directory = ensure_task_dir(analysis_dir(runs_dir, task), ANALYSIS_KIND, {
        "model": task.model.spec, "model_name": task.model.name, "method": task.method.label, "pattern": task.pattern_label,
        "pair": list(task.pair), "runs_a": list(task.runs_a), "runs_b": list(task.runs_b),
    })
    fingerprint = analysis_fingerprint(config, runs_dir, task)
    outcome = TaskOutcome(task.task_id, DONE)
    if stage_state(directory, "analysis", fingerprint) == "done":
        outcome.skipped.append("analysis")
        return outcome
    outcome.stage = "analysis"
    with stage(directory, "analysis", fingerprint) as details:
        clean_partials(directory)
        side_a = [Path(runs_dir) / "runs" / rid / "checkpoint" for rid in task.runs_a]
        side_b = [Path(runs_dir) / "runs" / rid / "checkpoint" for rid in task.runs_b]
        missing = [str(c) for c in side_a + side_b if not record_path(c).exists()]
        if missing:
            raise PrunekitError(f"analysis needs the checkpoints of both calibration sets; missing: {', '.join(missing)}")
        from prunekit.analysis import compare

        spec = config.compare_spec(task.model.dtype)
        comparison = compare(side_a, side_b, spec, dense=task.model.spec, out=directory / "compare", overwrite=True,
                             progress=progress)
        del comparison  # written to compare/compare.json (+ summary.md, figures/) by compare itself
        result = {"status": "ok", "compare": "compare/compare.json", "summary": "compare/summary.md"}
        write_json_atomic(directory / ANALYSIS_RESULT_FILE, versioned(SWEEP_ANALYSIS_RESULT_KIND, {"pair": list(task.pair), **result}))
        details["status"] = result["status"]
    _free_memory()
    outcome.ran.append("analysis")
    outcome.stage = None
    return outcome


def execute_task(config: SweepConfig, runs_dir: Path, task, progress: bool = False) -> TaskOutcome:
    """Run one task, turning any failure into a recorded outcome so that the sweep goes on."""
    t0 = time.perf_counter()
    runner = run_dense if isinstance(task, DenseTask) else run_one if isinstance(task, RunTask) else run_analysis
    try:
        outcome = runner(config, Path(runs_dir), task, progress)
    except StageBusy as err:
        outcome = TaskOutcome(task.task_id, "busy", error=str(err))
    except KeyboardInterrupt:
        raise
    except Exception as err:
        if is_job_interruption(err):  # submitit's timeout: the job ends (and is requeued), not the task
            raise
        outcome = _failed(config, Path(runs_dir), task, err)
    outcome.seconds = round(time.perf_counter() - t0, 3)
    return outcome


def is_job_interruption(err: BaseException) -> bool:
    """submitit's UncompletedJobError (raised by its signal handler when a job times out and cannot be
    requeued): it must end the job, never be recorded as the failure of a task. The handler raises it
    wherever the job happens to be, so a library may have wrapped it (transformers' lazy imports turn
    it into a ModuleNotFoundError): the whole chain of causes is searched."""
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        if type(err).__module__.startswith("submitit") and type(err).__name__ == "UncompletedJobError":
            return True
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return False


def _failed(config: SweepConfig, runs_dir: Path, task, err: Exception) -> TaskOutcome:
    """A task's failure as its outcome (its stage's status file already records it), logged."""
    kind = "" if isinstance(err, PrunekitError) else f"{type(err).__name__}: "
    outcome = TaskOutcome(task.task_id, "failed", error=f"{kind}{err}")
    outcome.stage = _failed_stage(config, runs_dir, task)
    log(runs_dir, f"{task.task_id} FAILED in {outcome.stage}: {kind}{err}")
    if not isinstance(err, PrunekitError):
        log(runs_dir, traceback.format_exc(limit=8).replace("\n", " | "))
    _free_memory()
    return outcome


def _failed_stage(config: SweepConfig, runs_dir: Path, task) -> str | None:
    directory = task_dir(runs_dir, task)
    for name in stage_names(config, task):
        status = read_status(directory, name)
        if status and status.get("state") == "failed":
            return name
    return None


def execute_tasks(runs_dir: str | Path, config_digest: str, task_ids: list[str], progress: bool = False) -> list[dict[str, Any]]:
    """Entry point of every worker (subprocess, submitit job): re-read the config snapshot and run tasks."""
    runs_dir = Path(runs_dir)
    config = read_snapshot(runs_dir, config_digest)
    _select_worker_gpu(config)
    grid: Grid = expand(config)
    outcomes = []
    for task_id in task_ids:
        outcomes.append(execute_task(config, runs_dir, grid.task(task_id), progress).to_json())
    return outcomes


def _select_worker_gpu(config: SweepConfig) -> None:
    """A worker given its own GPU (PRUNEKIT_DEVICE=cuda:i by the local pool or a Slurm rank) makes it the
    current device, so that whatever names no index (``cuda``, memory queries, cache releases) means it."""
    device = os.environ.get("PRUNEKIT_DEVICE", "")
    if config.device in ("auto", "cuda") and device.startswith("cuda:"):
        import torch

        if torch.cuda.is_available():
            torch.cuda.set_device(torch.device(device))
