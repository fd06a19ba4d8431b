"""Downstream tasks through lm-evaluation-harness.

By default ``lm_eval.simple_evaluate`` runs with ``HFLM(pretrained=model, tokenizer=tokenizer)`` on
the in-memory model, so nothing is reloaded or downloaded for the model; on a GPU node lm-eval can
load the checkpoint itself instead, spread over the GPUs this process owns (``parallelize``, only when
asked) or in vLLM in a subprocess of its own (``backend="vllm"``), see
:mod:`prunekit.evaluation.lm_backend`. Each task runs on its own and is saved as it
finishes, so a killed evaluation resumes. Tasks come from three places:

* lm-eval's own tasks (the study's suite: ARC, HellaSwag, MMLU, Belebele and Okapi translations),
  read from the Hugging Face Hub, or from local files with ``task_data``: ``DIR/{task}.jsonl``
  (.json / .parquet / .csv too) holds the evaluation split, or ``DIR/{task}/{split}.jsonl`` one
  file per split name of the task config; rows must have the fields of the Hub dataset
  (``datasets.load_dataset(...).to_json(...)`` writes them);
* prunekit's YAMLs in ``prunekit/evaluation/tasks`` (MKQA, XCOPA, MGSM) whose ``data_files`` use
  ``"{task_data}"``, replaced here by the absolute ``--task-data`` directory;
* a cell without data in a language becomes ``n/a`` with a note, as does an lm-eval task whose
  dataset cannot be loaded (offline, say): reported, never dropped.
"""

from __future__ import annotations

import copy
import json
import logging
import math
from pathlib import Path
from typing import Any, Sequence

from prunekit.artifacts import TASK_PROGRESS_KIND as PARTIAL_KIND
from prunekit.errors import ConfigError, did_you_mean
from prunekit.evaluation.lm_backend import (  # noqa: F401 - the backends' names, re-exported
    BACKENDS, BackendPlan, check_backend, free_accelerator_memory, lm_arguments, make_lm, plan_backend, run_worker,
)
from prunekit.evaluation.tasks import ALIASES, GROUPS, TASKS_DIR, TaskCell, cells_for, known_cells

log = logging.getLogger(__name__)

LOCAL_EXTENSIONS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
SPLIT_FIELDS = ("training_split", "validation_split", "test_split", "fewshot_split")
_TASK_MANAGERS: dict[bool, Any] = {}


class TaskUnavailable(Exception):
    """A runnable cell whose data is not there: reported as n/a with this message."""


def task_manager(include_defaults: bool = True):
    """A cached lm-eval TaskManager (indexing the built-in tasks takes a few seconds)."""
    if include_defaults not in _TASK_MANAGERS:
        from lm_eval.tasks import TaskManager

        _TASK_MANAGERS[include_defaults] = TaskManager(include_path=str(TASKS_DIR), include_defaults=include_defaults)
    return _TASK_MANAGERS[include_defaults]


def split_names(tasks: str | Sequence[str] | None) -> list[str]:
    if tasks is None:
        return []
    items = tasks.split(",") if isinstance(tasks, str) else list(tasks)
    return [t.strip() for t in items if t and t.strip()]


def plan_tasks(tasks: str | Sequence[str] | None, langs: Sequence[str]) -> list[TaskCell]:
    """Expand group names over ``langs``; exact task names stand for themselves.

    Unknown names fail with a ConfigError that lists the groups (and a close match if any)."""
    cells: list[TaskCell] = []
    unknown: list[str] = []
    for name in split_names(tasks):
        if name in ALIASES or name in GROUPS:
            for group in ALIASES.get(name, (name,)):
                for lang in langs:
                    cells.extend(cells_for(group, lang))
        elif name in known_cells():
            cells.append(known_cells()[name])
        else:
            unknown.append(name)
    if unknown:
        index = set(task_manager(True).all_tasks)
        for name in unknown:
            if name not in index:
                hint = did_you_mean(name, list(GROUPS) + list(ALIASES) + list(known_cells()) + sorted(index))
                raise ConfigError(
                    f"unknown task '{name}'{hint}; use a group ({', '.join(GROUPS)}, or 'study' for the "
                    f"study's suite), a task such as belebele_deu_Latn or mkqa_de, or any lm-eval task name"
                )
            cells.append(TaskCell(name, "lm-eval", None, "lm-eval"))
    seen: set[str] = set()
    unique = []
    for cell in cells:
        if cell.name not in seen:
            seen.add(cell.name)
            unique.append(cell)
    return unique


# ------------------------------------------------------------------------------ task configs


def _load_yaml(path: Path, resolve: bool = True) -> dict[str, Any]:
    from lm_eval.tasks._yaml_loader import load_yaml

    return load_yaml(path, resolve_func=resolve)


def _resolve_data_file(value: str, task_data: Path) -> Path:
    path = Path(value.replace("{task_data}", str(task_data)))
    candidates = [path]
    if path.suffix == ".gz":
        candidates.append(path.with_suffix(""))
    else:
        candidates.append(path.with_name(path.name + ".gz"))
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise TaskUnavailable(f"no data file {path} under --task-data")


def build_prunekit_config(cell: TaskCell, task_data: str | Path | None) -> dict[str, Any]:
    """The config dict of one of prunekit's YAML tasks, with absolute data file paths."""
    cfg = _load_yaml(cell.yaml)
    files = cfg.get("dataset_kwargs", {}).get("data_files", {})
    remote = (cfg.get("metadata") or {}).get("remote_data_files")
    if task_data is None:
        if any("{task_data}" in str(v) for v in files.values()):
            if not remote:
                example = next(iter(files.values())).replace("{task_data}/", "")
                raise ConfigError(
                    f"task '{cell.name}' reads local files: pass --task-data DIR with {example} inside it"
                )
            resolved = dict(remote)
        else:
            resolved = dict(files)
    else:
        root = Path(task_data).expanduser().resolve()
        resolved = {split: str(_resolve_data_file(str(v), root)) for split, v in files.items()}
    cfg = copy.copy(cfg)
    cfg["dataset_kwargs"] = {**cfg.get("dataset_kwargs", {}), "data_files": resolved}
    return cfg


def _local_files_for(task: str, cfg: dict[str, Any], root: Path) -> dict[str, Path]:
    """Local data of an lm-eval task: DIR/{task}/{split}.ext per split, or DIR/{task}.ext = eval split."""
    splits = {cfg.get(f) for f in SPLIT_FIELDS if cfg.get(f)}
    found: dict[str, Path] = {}
    folder = root / task
    if folder.is_dir():
        for split in splits:
            for ext in LOCAL_EXTENSIONS:
                if (folder / f"{split}{ext}").is_file():
                    found[split] = folder / f"{split}{ext}"
                    break
        if found:
            return found
    eval_split = cfg.get("test_split") or cfg.get("validation_split")
    for ext in LOCAL_EXTENSIONS:
        if (root / f"{task}{ext}").is_file() and eval_split:
            return {eval_split: root / f"{task}{ext}"}
    return {}


def build_lm_eval_spec(cell: TaskCell, task_data: str | Path | None) -> str | dict[str, Any]:
    """An lm-eval task name, or its full config dict pointed at local files under ``task_data``."""
    if task_data is None:
        return cell.name
    manager = task_manager(True)
    entry = manager.task_index.get(cell.name)
    if entry is None or entry.yaml_path is None:
        return cell.name
    root = Path(task_data).expanduser().resolve()
    raw = _load_yaml(entry.yaml_path, resolve=False)
    if "group" in raw and "task" in raw and isinstance(raw["task"], list):
        if (root / cell.name).exists() or any(root.glob(f"{cell.name}.*")):
            raise TaskUnavailable(
                f"'{cell.name}' is an lm-eval group; local data is read per task, not per group "
                "(for English MMLU from local files use m_mmlu_en)"
            )
        return cell.name
    files = _local_files_for(cell.name, raw, root)
    if not files:
        return cell.name  # not under --task-data: read it from the Hub as usual
    kinds = {LOCAL_EXTENSIONS[p.suffix] for p in files.values()}
    if len(kinds) != 1:
        raise TaskUnavailable(f"local files of '{cell.name}' mix formats: {', '.join(map(str, files.values()))}")
    cfg = _load_yaml(entry.yaml_path, resolve=True)
    cfg.update(
        dataset_path=kinds.pop(), dataset_name=None,
        dataset_kwargs={"data_files": {split: str(path) for split, path in files.items()}},
    )
    for field in SPLIT_FIELDS:
        if cfg.get(field) and cfg[field] not in files:
            cfg[field] = None
    for key in ("tag", "group"):
        cfg.pop(key, None)
    return cfg


def export_task_configs(task_data: str | Path, out_dir: str | Path) -> Path:
    """Write prunekit's task YAMLs (and utils.py) with ``{task_data}`` replaced by an absolute path,
    for use with lm-eval directly: ``lm_eval --include_path OUT_DIR --tasks xcopa_local_sw ...``."""
    import shutil

    root = Path(task_data).expanduser().resolve()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for file in sorted(TASKS_DIR.iterdir()):
        if file.suffix == ".yaml":
            (out / file.name).write_text(file.read_text(encoding="utf-8").replace("{task_data}", str(root)), encoding="utf-8")
    shutil.copyfile(TASKS_DIR / "utils.py", out / "utils.py")
    return out


# ------------------------------------------------------------------------------------ running


def resolve_chat_template(tokenizer, chat_template: bool | None, name: str = "the model") -> bool:
    """None: use the tokenizer's chat template when it has one (the study evaluated with it)."""
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if chat_template is None:
        return has_template
    if chat_template and not has_template:
        raise ConfigError(
            f"--chat-template was asked for, but the tokenizer of {name} has no chat template; "
            "use --no-chat-template (or a tokenizer that defines one)"
        )
    return bool(chat_template)


def _na(cell: TaskCell, note: str | None) -> dict[str, Any]:
    return {"group": cell.group, "language": cell.language, "status": "n/a", "note": note,
            "metrics": {}, "stderr": {}, "samples": None}


def _number(value: Any) -> float | None:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value) if math.isfinite(value) else None
    return None


def _metrics_of(row: dict[str, Any]) -> tuple[dict[str, float], dict[str, float | None]]:
    metrics: dict[str, float] = {}
    stderr: dict[str, float | None] = {}
    for key, value in row.items():
        if "," not in key:
            continue  # alias, name, sample_len
        metric, filt = key.split(",", 1)
        if metric.endswith("_stderr"):
            base = metric[: -len("_stderr")]
            stderr[base if filt == "none" else f"{base},{filt}"] = _number(value)
        elif _number(value) is not None:
            metrics[metric if filt == "none" else f"{metric},{filt}"] = float(value)
    for name in metrics:
        stderr.setdefault(name, None)
    return metrics, stderr


def _samples(res: dict[str, Any], name: str) -> int | None:
    n_samples = res.get("n-samples", {})
    if name in n_samples:
        return int(n_samples[name].get("effective", n_samples[name].get("original", 0)))
    children = res.get("group_subtasks", {}).get(name)
    if children:
        counts = [_samples(res, child) for child in children]
        return sum(c for c in counts if c is not None)
    return None


# ------------------------------------------------------------------------------------ backends



def partial_results_path(out: str | Path) -> Path:
    """Where finished tasks wait while an evaluation that writes ``out`` runs (a killed one resumes from it)."""
    out = Path(out)
    return out.with_name(f".{out.name}.tasks-partial.json")


def _read_partial(path: Path | None, identity: dict[str, Any]) -> dict[str, Any]:
    if path is None or not path.exists():
        return {}
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    if saved.get("kind") != PARTIAL_KIND or saved.get("identity") != identity:
        return {}  # another model or other settings: start over
    return saved.get("tasks", {})


def _write_partial(path: Path, identity: dict[str, Any], done: dict[str, Any]) -> None:
    from prunekit.io import write_json_atomic

    write_json_atomic(path, {"kind": PARTIAL_KIND, "identity": identity, "tasks": done})


def run_tasks(
    model,
    tokenizer,
    cells: list[TaskCell],
    spec: Any,  # an EvaluationSpec (not imported: spec imports this module)
    *,
    model_name: str = "the model",
    backend: BackendPlan | None = None,
    partial: str | Path | None = None,
    identity: dict[str, Any] | None = None,
    on_task: Any = None,
) -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
    """Run ``cells`` on the in-memory model (or, per ``backend``, a model lm-eval loads itself), with the
    task settings of ``spec`` (``limit``, ``task_data``, ``chat_template``, ``num_fewshot``, ``bootstrap_iters``,
    ``seed``; lm-eval's batch size is ``backend``'s, default ``spec.batch_size`` with lm-eval's HFLM).

    Returns (tasks block of the results, harness info). Each task runs on its own and, with
    ``partial`` (a file) and an ``identity`` naming the model, is saved there as soon as it finishes:
    a killed evaluation run again with the same model and settings skips the tasks already done (and says
    so). ``on_task(results so far, info)`` is called as each task ends (the suite saves them in results.json)."""
    limit, task_data, chat_template = spec.limit, spec.task_data, spec.chat_template
    num_fewshot, bootstrap_iters, seed = spec.num_fewshot, spec.bootstrap_iters, spec.seed
    apply_template = resolve_chat_template(tokenizer, chat_template, model_name)
    if task_data is not None and not Path(task_data).expanduser().is_dir():
        raise ConfigError(f"--task-data '{task_data}' is not a directory")
    if backend is None:
        backend = BackendPlan("hf", False, spec.batch_size)
    results: dict[str, dict[str, Any]] = {}
    objects: dict[str, Any] = {}
    uses_defaults = any(cell.kind == "lm-eval" for cell in cells)
    for cell in cells:
        if cell.kind == "n/a":
            results[cell.name] = _na(cell, cell.note)
            continue
        try:
            spec = build_prunekit_config(cell, task_data) if cell.kind == "prunekit" else build_lm_eval_spec(cell, task_data)
        except TaskUnavailable as err:
            results[cell.name] = _na(cell, str(err))
            continue
        manager = task_manager(uses_defaults)
        try:
            loaded = manager.load([spec])
        except Exception as err:  # noqa: BLE001 - a dataset that cannot be read is an n/a cell with the reason
            if cell.kind == "prunekit":
                raise
            results[cell.name] = _na(cell, f"could not load the task data ({type(err).__name__}: {err})")
            continue
        objects[cell.name] = loaded["groups"].get(cell.name) or loaded["tasks"][cell.name]
    info: dict[str, Any] = {"chat_template": apply_template, "num_fewshot": num_fewshot, "limit": limit,
                            "bootstrap_iters": bootstrap_iters, "batch_size": backend.batch_size, "seed": seed,
                            "task_versions": {}}
    partial_path = None if partial is None or identity is None or identity.get("model") is None else Path(partial)
    identity = None if partial_path is None else {
        **identity, "limit": limit, "num_fewshot": num_fewshot, "chat_template": apply_template,
        "bootstrap_iters": bootstrap_iters, "seed": seed, "backend": backend.describe(),
        "task_data": None if task_data is None else str(Path(task_data).expanduser().resolve()),
    }
    done = _read_partial(partial_path, identity)
    for name in list(objects):
        if name in done:
            results[name] = done[name]["result"]
            info["task_versions"].update(done[name].get("versions", {}))
            info.setdefault("chat_template_sha", done[name].get("chat_template_sha"))
            del objects[name]
            log.warning("task %s already done in %s; skipping it", name, partial_path)
    if objects:
        settings = {"num_fewshot": num_fewshot, "limit": limit, "bootstrap_iters": bootstrap_iters,
                    "apply_chat_template": apply_template, "random_seed": seed}
        free_accelerator_memory()  # what prunekit's allocator keeps reserved would count against lm-eval / vLLM
        for cell, res in _evaluations(backend, model, tokenizer, [c for c in cells if c.name in objects], objects,
                                      task_data, uses_defaults, settings):
            versions = {k: v for k, v in res.get("versions", {}).items() if k == cell.name}
            info.update(lm_eval_version=res.get("lm_eval_version"), chat_template_sha=res.get("chat_template_sha"))
            info["task_versions"].update(versions)
            row = res["results"].get(cell.name) or res.get("groups", {}).get(cell.name)
            if row is None:
                results[cell.name] = _na(cell, "lm-eval returned no result for this task")
            else:
                metrics, stderr = _metrics_of(row)
                results[cell.name] = {
                    "group": cell.group, "language": cell.language, "status": "ok", "note": None,
                    "metrics": metrics, "stderr": stderr, "samples": _samples(res, cell.name),
                }
            if partial_path is not None:
                done[cell.name] = {"result": results[cell.name], "versions": versions,
                                   "chat_template_sha": res.get("chat_template_sha")}
                _write_partial(partial_path, identity, done)
            if on_task is not None:
                on_task({c.name: results[c.name] for c in cells if c.name in results}, info)
    ordered = {cell.name: results[cell.name] for cell in cells}
    return ordered, info


def _evaluations(backend: BackendPlan, model, tokenizer, cells: list[TaskCell], objects: dict[str, Any],
                 task_data, uses_defaults: bool, settings: dict[str, Any]):
    """(cell, lm-eval's result) per task as each finishes: in this process, or (vLLM) in a subprocess
    of its own that the tasks share (``lm_backend.run_worker``)."""
    if backend.in_subprocess:
        request = {"backend": backend.backend, "lm_args": lm_arguments(backend, None, None), "uses_defaults": uses_defaults,
                   "cells": [{"name": c.name, "group": c.group, "language": c.language, "kind": c.kind, "note": c.note} for c in cells],
                   "task_data": None if task_data is None else str(Path(task_data).expanduser().resolve()), "evaluate": settings}
        by_name = {cell.name: cell for cell in cells}
        for name, res in run_worker(request, backend.visible_devices):
            yield by_name[name], res
        return
    import lm_eval

    lm = make_lm(backend, model, tokenizer)
    for cell in cells:
        yield cell, lm_eval.simple_evaluate(model=lm, tasks=[objects[cell.name]], log_samples=False, fewshot_as_multiturn=False,
                                            task_manager=task_manager(uses_defaults), **settings)
