"""Leaderboard tables the way the study prints them: per metric, rows (model, method, calibration
set), columns (evaluation language or task); mean ± sample std over seeds; a dense row; deltas
against dense; the best cell per column within each (model, method) block; a calibration advisor."""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from typing import Any

from prunekit.languages import STUDY_LANGUAGES
from prunekit.report.collect import Collected, RunResult

STUDY_ORDER = list(STUDY_LANGUAGES)
PERCENT_METRICS = {"acc", "acc_norm", "f1", "exact_match", "em", "mc1", "mc2", "accuracy"}
LOWER_IS_BETTER = {"perplexity", "word_perplexity", "byte_perplexity", "bits_per_byte", "loss", "ppl", "nll", "ter"}


@dataclass(frozen=True)
class MetricDef:
    id: str  # perplexity, snr_db, pruning_error, task:<group>/<metric>
    title: str
    better: str  # "lower" | "higher"
    scale: float = 1.0  # displayed value = raw value × scale (PE ×10⁶, accuracies in %)
    decimals: int = 2
    dense_row: bool = True  # hidden-state metrics compare a model with the dense one: no dense row

    @property
    def lower_is_better(self) -> bool:
        return self.better == "lower"

    def best(self, values: list[float]) -> float:
        return min(values) if self.lower_is_better else max(values)


PERPLEXITY = MetricDef("perplexity", "Perplexity (PPL)", "lower", 1.0, 2)
SNR = MetricDef("snr_db", "SNR of hidden states [dB]", "higher", 1.0, 2, dense_row=False)
PRUNING_ERROR = MetricDef("pruning_error", "Pruning error of hidden states ×10⁶", "lower", 1e6, 1, dense_row=False)


@dataclass(frozen=True)
class Column:
    key: str  # language code, or task name for task tables
    label: str
    language: str | None  # what the diagonal compares with the calibration language


@dataclass
class Cell:
    values: list[float]  # displayed units, one per seed (seed order)
    seeds: list[int | None]
    mean: float | None = None
    std: float | None = None  # sample std (ddof=1); None for a single seed
    delta: float | None = None  # mean − dense mean
    best: bool = False
    status: str = "ok"  # ok | n/a
    note: str | None = None

    @property
    def n(self) -> int:
        return len(self.values)


@dataclass
class Row:
    model: str
    method: str  # "dense" for the dense row
    pattern: str
    calibration: str
    cells: dict[str, Cell]
    is_dense: bool = False
    run_ids: list[str] = field(default_factory=list)

    show_pattern: bool = False  # several sparsity patterns in the report: name them

    @property
    def method_label(self) -> str:
        if self.is_dense or not self.show_pattern or self.pattern in ("-", ""):
            return self.method
        return f"{self.method} {self.pattern}"


@dataclass
class Block:
    model: str
    method: str
    pattern: str
    rows: list[Row]
    dense: Row | None = None
    show_pattern: bool = False

    @property
    def method_label(self) -> str:
        return f"{self.method} {self.pattern}" if self.show_pattern and self.pattern not in ("-", "") else self.method

    @property
    def label(self) -> str:
        return f"{self.model} · {self.method_label}"


@dataclass
class MetricTable:
    metric: MetricDef
    columns: list[Column]
    blocks: list[Block]

    def block(self, model: str, method: str, pattern: str | None = None) -> Block:
        for block in self.blocks:
            if block.model == model and block.method == method and (pattern is None or block.pattern == pattern):
                return block
        raise KeyError((model, method, pattern))


@dataclass
class AdvisorRow:
    model: str
    method: str
    pattern: str
    metric: str
    metric_title: str
    target: str  # column label
    language: str
    best_calibration: str
    best_value: float
    own_value: float | None  # calibrating on the target language itself
    margin: float | None  # how much better the best set is than the target language (>= 0), None if not run
    own_is_best: bool | None


def mean_std(values: list[float]) -> tuple[float | None, float | None]:
    if not values:
        return None, None
    if not all(math.isfinite(v) for v in values):
        return (math.inf if all(v == math.inf for v in values) else sum(values) / len(values)), None
    mean = statistics.fmean(values)
    return mean, (statistics.stdev(values) if len(values) >= 2 else None)


def language_order(code: str) -> tuple[int, str]:
    return (STUDY_ORDER.index(code) if code in STUDY_ORDER else len(STUDY_ORDER), code)


def calibration_order(calib: str, configured: list[str] | None = None) -> tuple:
    if configured and calib in configured:
        return (0, configured.index(calib), "")
    if calib == "none":
        return (-1, 0, "")
    parts = calib.split("+")
    if calib == "all":
        return (3, 0, "")
    if len(parts) == 1:
        return (1, *language_order(calib))
    return (2, len(parts), calib)


# ------------------------------------------------------------------------------------ extraction


def hidden_value(results: dict[str, Any], lang: str, key: str) -> float | None:
    entry = (results.get("hidden_states") or {}).get(lang)
    if not entry or entry.get(key) is None:
        return None
    value = float(entry[key])
    if key == "snr_db" and math.isinf(value) and entry.get("snr_db_finite_layers") is not None:
        value = float(entry["snr_db_finite_layers"])  # a layer kept dense (PE = 0): mean over the changed layers
    return value


def ppl_value(results: dict[str, Any], lang: str) -> float | None:
    entry = (results.get("perplexity") or {}).get(lang)
    return None if not entry or entry.get("ppl") is None else float(entry["ppl"])


def task_metric_defs(results_list: list[dict[str, Any]]) -> dict[str, tuple[MetricDef, dict[str, Column]]]:
    """One table per (task group, metric); columns are the group's tasks."""
    tables: dict[str, tuple[MetricDef, dict[str, Column]]] = {}
    by_group: dict[str, dict[str, str | None]] = {}
    metrics_of: dict[str, list[str]] = {}
    for results in results_list:
        for task, entry in (results.get("tasks") or {}).items():
            group = entry.get("group") or task
            by_group.setdefault(group, {})[task] = entry.get("language")
            for metric in (entry.get("metrics") or {}):
                if metric not in metrics_of.setdefault(group, []):
                    metrics_of[group].append(metric)
    for group, tasks in by_group.items():
        languages = [lang for lang in tasks.values() if lang]
        # a column is named by its language, unless the group has several tasks in it (ARC-Easy and
        # ARC-Challenge in English, like the study's EN-E / EN-C): then by the task's name
        columns = {task: Column(task, lang if lang and languages.count(lang) == 1 else task, lang) for task, lang in tasks.items()}
        ordered = dict(sorted(columns.items(), key=lambda kv: (language_order(kv[1].language or "~"), kv[0])))
        for metric in metrics_of.get(group, []) or ["acc"]:
            base = metric.split(",")[0].lower()  # "exact_match,strict-match": metric, lm-eval filter
            lower = base in LOWER_IS_BETTER
            percent = base in PERCENT_METRICS
            title = f"{group} [{metric}{', %' if percent else ''}]"
            tables[f"task:{group}/{metric}"] = (MetricDef(f"task:{group}/{metric}", title, "lower" if lower else "higher",
                                                         100.0 if percent else 1.0, 1 if percent else 3), ordered)
    return tables


def task_value(results: dict[str, Any], task: str, metric: str) -> tuple[float | None, str, str | None]:
    entry = (results.get("tasks") or {}).get(task)
    if entry is None:
        return None, "n/a", "not evaluated"
    if entry.get("status", "ok") != "ok":
        return None, "n/a", entry.get("note")
    value = (entry.get("metrics") or {}).get(metric)
    return (None, "n/a", f"no {metric}") if value is None else (float(value), "ok", None)


def value_of(metric: MetricDef, results: dict[str, Any], column: Column) -> tuple[float | None, str, str | None]:
    if metric.id == "perplexity":
        v = ppl_value(results, column.key)
    elif metric.id in ("snr_db", "pruning_error"):
        v = hidden_value(results, column.key, metric.id)
    else:
        group_metric = metric.id.split(":", 1)[1]
        return task_value(results, column.key, group_metric.rsplit("/", 1)[1])
    return (v, "ok", None) if v is not None else (None, "n/a", "not measured")


# ---------------------------------------------------------------------------------------- tables


def make_cell(metric: MetricDef, runs: list[RunResult], column: Column) -> Cell:
    values, seeds, notes = [], [], []
    for run in sorted(runs, key=lambda r: (r.seed is None, r.seed)):
        value, status, note = value_of(metric, run.results, column)
        if value is None:
            notes.append(note)
            continue
        values.append(value * metric.scale)
        seeds.append(run.seed)
    cell = Cell(values, seeds)
    cell.mean, cell.std = mean_std(values)
    if not values:
        cell.status, cell.note = "n/a", next((n for n in notes if n), None)
    return cell


def build_tables(collected: Collected) -> list[MetricTable]:
    runs = collected.runs
    sweep = collected.sweep or {}
    configured_calib = sweep.get("calibration_sets")
    run_order = {rid: i for i, rid in enumerate(sweep.get("runs", []))}
    ordered_runs = sorted(runs, key=lambda r: (run_order.get(r.run_id, len(run_order)), r.model, r.method, r.pattern))
    block_keys: list[tuple[str, str, str]] = list(dict.fromkeys((r.model, r.method, r.pattern) for r in ordered_runs))
    model_keys = {r.model: r.model_key for r in runs}
    show_pattern = len({r.pattern for r in runs if r.pattern not in ("-", "")}) > 1

    all_results = [r.results for r in runs] + [d.results for d in collected.dense.values()]
    configured_langs = sweep.get("eval_languages") or []
    langs = sorted({lang for res in all_results for lang in (res.get("languages") or [])}
                   | {lang for res in all_results for lang in (res.get("perplexity") or {})},
                   key=lambda code: (0, configured_langs.index(code), "") if code in configured_langs else (1, *language_order(code)))
    lang_columns = [Column(lang, lang, lang) for lang in langs]
    metrics: list[tuple[MetricDef, list[Column]]] = [(PERPLEXITY, lang_columns)]
    if any(res.get("hidden_states") for res in (r.results for r in runs)):
        metrics += [(SNR, lang_columns), (PRUNING_ERROR, lang_columns)]
    for metric, columns in task_metric_defs(all_results).values():
        metrics.append((metric, list(columns.values())))

    tables = []
    for metric, columns in metrics:
        blocks = []
        for model, method, pattern in block_keys:
            members = [r for r in runs if (r.model, r.method, r.pattern) == (model, method, pattern)]
            calibs = sorted({r.calibration for r in members}, key=lambda c: calibration_order(c, configured_calib))
            rows = []
            for calib in calibs:
                group = [r for r in members if r.calibration == calib]
                cells = {c.key: make_cell(metric, group, c) for c in columns}
                rows.append(Row(model, method, pattern, calib, cells, run_ids=[r.run_id for r in group], show_pattern=show_pattern))
            dense_row = None
            dense = collected.dense.get(model_keys.get(model, ""))
            if metric.dense_row and dense is not None:
                fake = RunResult("dense", model, dense.model_key, "dense", "-", "-", None, dense.results, dense.path)
                dense_row = Row(model, "dense", "-", "-", {c.key: make_cell(metric, [fake], c) for c in columns}, is_dense=True)
            block = Block(model, method, pattern, rows, dense_row, show_pattern)
            mark_best_and_deltas(metric, block, columns)
            blocks.append(block)
        if any(cell.status == "ok" for b in blocks for row in b.rows for cell in row.cells.values()):
            tables.append(MetricTable(metric, columns, blocks))
    return tables


def mark_best_and_deltas(metric: MetricDef, block: Block, columns: list[Column]) -> None:
    for column in columns:
        means = [row.cells[column.key].mean for row in block.rows if row.cells[column.key].mean is not None]
        means = [m for m in means if math.isfinite(m)]
        best = metric.best(means) if means else None
        dense_mean = None if block.dense is None else block.dense.cells[column.key].mean
        for row in block.rows:
            cell = row.cells[column.key]
            cell.best = best is not None and cell.mean is not None and cell.mean == best
            if dense_mean is not None and cell.mean is not None:
                cell.delta = cell.mean - dense_mean


def build_advisor(tables: list[MetricTable]) -> list[AdvisorRow]:
    advice = []
    for table in tables:
        metric = table.metric
        for block in table.blocks:
            for column in table.columns:
                if column.language is None:
                    continue
                scored = [(row, row.cells[column.key].mean) for row in block.rows
                          if row.cells[column.key].mean is not None and math.isfinite(row.cells[column.key].mean)]
                if not scored:
                    continue
                best_value = metric.best([v for _, v in scored])
                winners = [row.calibration for row, v in scored if v == best_value]
                own = next((v for row, v in scored if row.calibration == column.language), None)
                margin = None
                if own is not None:
                    margin = own - best_value if metric.lower_is_better else best_value - own
                advice.append(AdvisorRow(
                    block.model, block.method_label, block.pattern, metric.id, metric.title, column.label, column.language,
                    "/".join(winners), best_value, own, margin, None if own is None else column.language in winners,
                ))
    return advice


def advisor_summary(advice: list[AdvisorRow]) -> tuple[list[AdvisorRow], str]:
    """What the advisor has to say: the rows where another calibration set beat calibrating on the target
    language itself (a row where the target language's calibration is best, or the only one, says nothing), and
    one sentence over every (target, metric) whose target-language calibration was run. ``([], "")`` when no
    target language was also a calibration set."""
    compared = [a for a in advice if a.own_value is not None]
    beaten = [a for a in compared if a.own_is_best is False]
    if not compared:
        return [], ""
    n = len(compared)
    if not beaten:
        return [], f"Calibrating on the target language was best for every target and metric ({n} of {n})."
    return beaten, (f"Another calibration set beat calibrating on the target language itself for {len(beaten)} of {n} "
                    f"targets and metrics (the target language was best for the other {n - len(beaten)}):")


def diagonal_counts(table: MetricTable) -> list[tuple[Block, int, int]]:
    """Per block: in how many evaluation languages calibrating on that language was best (k of n)."""
    out = []
    for block in table.blocks:
        k = n = 0
        for column in table.columns:
            if column.language is None:
                continue
            own = next((row for row in block.rows if row.calibration == column.language), None)
            if own is None or own.cells[column.key].mean is None:
                continue
            n += 1
            k += bool(own.cells[column.key].best)
        if n:
            out.append((block, k, n))
    return out
