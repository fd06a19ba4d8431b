"""The leaderboard: one row per checkpoint (model, method, sparsity pattern or bits, calibration set)
with all its numbers side by side, ranked; the dense model as a reference row.

Its cells are the study tables' cells (prunekit.report.tables): mean ± sample std over seeds of
what each run's results.json holds. The averages across languages are taken seed by seed (the
geometric mean for perplexity, the arithmetic mean for SNR, pruning error and task scores) and
then summarised over seeds the same way, so their ± is the spread between pruning runs too.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
from dataclasses import dataclass, field
from typing import Any

from prunekit.languages import STUDY_LANGUAGES
from prunekit.report.collect import Collected, checkpoint_facts
from prunekit.report.tables import Cell, MetricDef, MetricTable, Row, calibration_order, mean_std

HIDDEN_GROUPS = {"perplexity": "Perplexity", "snr_db": "SNR [dB]", "pruning_error": "Pruning error ×10⁶"}
SHORT = {"perplexity": "PPL", "snr_db": "SNR", "pruning_error": "PE×10⁶"}
CSV_PREFIX = {"perplexity": "ppl", "snr_db": "snr_db", "pruning_error": "pe_x1e6"}
TASK_METRIC_PREFERENCE = ("acc", "f1", "exact_match")  # the one number a task group shows: accuracy, else F1


@dataclass(frozen=True)
class LeaderColumn:
    key: str  # perplexity:en, perplexity:avg, snr_db:de, task:xcopa/acc
    metric: MetricDef
    group: str  # the header over its columns
    label: str  # en, geo-mean, mean, xcopa acc %
    language: str | None = None
    average: bool = False
    sources: int = 1  # how many table columns an average is taken over

    @property
    def header(self) -> str:
        """The column's name on its own (markdown, CSV readers): 'PPL en', 'PPL geo-mean', 'xcopa acc %'."""
        return self.label if self.metric.id.startswith("task:") else f"{SHORT[self.metric.id]} {self.label}"

    @property
    def csv_name(self) -> str:
        if self.metric.id.startswith("task:"):
            group, metric = split_task(self.metric.id)
            return f"{group}_{metric.replace(',', '_')}" + ("_pct" if self.metric.scale == 100.0 else "")
        suffix = "geomean" if self.average and self.metric.id == "perplexity" else ("mean" if self.average else self.language)
        return f"{CSV_PREFIX[self.metric.id]}_{suffix}"

    @property
    def target_label(self) -> str:
        """How the target selector names it."""
        if self.metric.id.startswith("task:"):
            return f"{self.label} (mean over its languages)"
        name = STUDY_LANGUAGES[self.language].name if self.language in STUDY_LANGUAGES else self.language
        return f"{self.language} ({name}): perplexity" if name != self.language else f"{self.language}: perplexity"


@dataclass
class Entry:
    model: str
    method: str
    setting: str  # 50%, 2:4, 4-bit g128; '—' for the dense model
    calibration: str
    cells: dict[str, Cell]
    seeds: list[int | None] = field(default_factory=list)
    run_ids: list[str] = field(default_factory=list)
    hub: list[dict[str, str]] = field(default_factory=list)  # {"repo_id", "url"}, one per pushed seed
    is_dense: bool = False
    rank: int | None = None

    @property
    def name(self) -> str:
        if self.is_dense:
            return f"{self.model} · dense"
        return f"{self.model} · {self.method} {self.setting} · calibration {self.calibration}"


@dataclass
class Leaderboard:
    columns: list[LeaderColumn]
    entries: list[Entry]  # the checkpoints, ranked
    dense: list[Entry]  # reference rows, one per model
    rank_by: LeaderColumn | None

    def column(self, key: str) -> LeaderColumn:
        for column in self.columns:
            if column.key == key:
                return column
        raise KeyError(f"no leaderboard column '{key}'; it has: {', '.join(c.key for c in self.columns)}")

    @property
    def groups(self) -> list[tuple[str, list[LeaderColumn]]]:
        out: dict[str, list[LeaderColumn]] = {}
        for column in self.columns:
            out.setdefault(column.group, []).append(column)
        return list(out.items())

    @property
    def targets(self) -> list[LeaderColumn]:
        """What a reader can rank by for 'my' language or task: each language's perplexity, each task group."""
        return [c for c in self.columns if (c.metric.id == "perplexity" and not c.average) or c.metric.id.startswith("task:")]

    def ranked(self, key: str) -> list[Entry]:
        """The checkpoints best-first by one column (n/a last); ties keep the leaderboard's order."""
        column = self.column(key)
        return sorted(self.entries, key=lambda e: _score(e.cells.get(column.key), column.metric))

    def best(self, key: str) -> Entry | None:
        ranked = self.ranked(key)
        return ranked[0] if ranked and ranked[0].cells[key].mean is not None else None


def _score(cell: Cell | None, metric: MetricDef) -> tuple[int, float]:
    if cell is None or cell.mean is None or math.isnan(cell.mean):
        return (1, 0.0)
    return (0, cell.mean if metric.lower_is_better else -cell.mean)


def split_task(metric_id: str) -> tuple[str, str]:
    """'task:xcopa/acc' -> ('xcopa', 'acc')."""
    group, metric = metric_id.split(":", 1)[1].rsplit("/", 1)
    return group, metric


def task_metric(metrics: list[str]) -> str:
    """Accuracy where a group has it, else F1, else exact match, else its first metric."""
    for wanted in TASK_METRIC_PREFERENCE:
        for metric in metrics:
            if metric.split(",")[0].lower() == wanted:
                return metric
    return metrics[0]


def average_cell(metric: MetricDef, cells: list[Cell], geometric: bool) -> Cell:
    """Average across columns seed by seed, then mean ± std over the seeds every column has."""
    present = [c for c in cells if c.mean is not None]
    if not present:
        return Cell([], [], status="n/a", note="not measured")
    seeds = [s for s in present[0].seeds if all(s in c.seeds for c in present)]
    values = []
    for seed in seeds:
        xs = [c.values[c.seeds.index(seed)] for c in present]
        if geometric:
            values.append(math.inf if any(math.isinf(x) for x in xs) else math.exp(statistics.fmean(math.log(x) for x in xs)))
        else:
            values.append(statistics.fmean(xs))
    cell = Cell(values, seeds)
    cell.mean, cell.std = mean_std(values)
    if not values:
        cell.status, cell.note = "n/a", "no seed was measured in every column"
    elif len(present) < len(cells):
        cell.note = f"over {len(present)} of {len(cells)} columns (the others are n/a)"
    return cell


def setting_of(pattern: str, quantization: dict[str, Any] | None) -> str:
    if quantization:
        group = quantization.get("group_size")
        return f"{quantization.get('bits')}-bit" + (f" g{group}" if group and group > 0 else "")
    return pattern if pattern not in ("", None) else "-"


def _hub_link(push: dict[str, Any] | None) -> dict[str, str] | None:
    if not push or not push.get("repo_id"):
        return None
    url = str(push.get("url") or "")
    if not url.startswith(("https://", "http://")):  # only web links go into a page
        url = f"https://huggingface.co/{push['repo_id']}"
    return {"repo_id": str(push["repo_id"]), "url": url}


def build_leaderboard(collected: Collected, tables: list[MetricTable]) -> Leaderboard:
    runs = {run.run_id: run for run in collected.runs}
    facts = {run_id: checkpoint_facts(run) for run_id, run in runs.items()}
    configured = (collected.sweep or {}).get("calibration_sets")
    columns: list[LeaderColumn] = []
    entries: dict[tuple[str, str, str, str], Entry] = {}
    dense: dict[str, Entry] = {}
    task_metrics: dict[str, list[str]] = {}
    for table in tables:
        if table.metric.id.startswith("task:"):
            group, name = split_task(table.metric.id)
            task_metrics.setdefault(group, []).append(name)
    chosen_task_metric = {group: task_metric(names) for group, names in task_metrics.items()}

    def entry_of(row: Row) -> Entry:
        key = (row.model, row.method, row.pattern, row.calibration)
        if key not in entries:
            quantization = next((facts[r]["quantization"] for r in row.run_ids if r in facts), None)
            hub = [link for link in (_hub_link(facts[r]["push"]) for r in row.run_ids if r in facts) if link]
            seeds = sorted((runs[r].seed for r in row.run_ids if r in runs), key=lambda s: (s is None, s))
            entries[key] = Entry(row.model, row.method, setting_of(row.pattern, quantization), row.calibration, {},
                                 seeds, list(row.run_ids), hub)
        return entries[key]

    def dense_of(model: str) -> Entry:
        return dense.setdefault(model, Entry(model, "dense", "—", "—", {}, [], [], [], is_dense=True))

    for table in tables:
        metric = table.metric
        if metric.id.startswith("task:"):
            group, name = split_task(metric.id)
            if name != chosen_task_metric.get(group):
                continue
            average = LeaderColumn(metric.id, metric, "Tasks (mean over languages)",
                                   f"{group} {name.split(',')[0]}{' %' if metric.scale == 100.0 else ''}",
                                   None, True, len(table.columns))
            mine = [average]
        elif metric.id in HIDDEN_GROUPS:
            label = "geo-mean" if metric.id == "perplexity" else "mean"
            average = LeaderColumn(f"{metric.id}:avg", metric, HIDDEN_GROUPS[metric.id], label, None, True, len(table.columns))
            mine = [average] + [LeaderColumn(f"{metric.id}:{c.key}", metric, HIDDEN_GROUPS[metric.id], c.label, c.language)
                                for c in table.columns]
        else:
            continue
        columns += mine
        geometric = metric.id == "perplexity"
        for block in table.blocks:
            rows = [(row, entry_of(row)) for row in block.rows]
            if block.dense is not None:
                rows.append((block.dense, dense_of(block.model)))
            for row, entry in rows:
                source = [row.cells[c.key] for c in table.columns]
                entry.cells[average.key] = average_cell(metric, source, geometric)
                for column, cell in zip(mine[1:], source):
                    entry.cells[column.key] = dataclasses.replace(cell, best=False, delta=None)

    checkpoints = list(entries.values())
    for entry in checkpoints + list(dense.values()):
        for column in columns:
            if column.key not in entry.cells:
                note = "the reference itself" if entry.is_dense and not column.metric.dense_row else "not measured"
                entry.cells[column.key] = Cell([], [], status="n/a", note=note)
    for column in columns:
        means = [e.cells[column.key].mean for e in checkpoints if e.cells[column.key].mean is not None]
        means = [m for m in means if math.isfinite(m)]
        if means:
            best = column.metric.best(means)
            for entry in checkpoints:
                entry.cells[column.key].best = entry.cells[column.key].mean == best

    rank_by = next((c for c in columns if c.key == "perplexity:avg"), None) or next((c for c in columns if c.average), None)
    model_order = list(dict.fromkeys(e.model for e in checkpoints))

    def tie_break(entry: Entry) -> tuple:
        return (model_order.index(entry.model), entry.method, entry.setting, calibration_order(entry.calibration, configured))

    if rank_by is not None:
        checkpoints.sort(key=lambda e: (_score(e.cells[rank_by.key], rank_by.metric), tie_break(e)))
        previous = None
        for i, entry in enumerate(checkpoints, start=1):
            score = _score(entry.cells[rank_by.key], rank_by.metric)
            entry.rank = None if score[0] else (checkpoints[i - 2].rank if score == previous else i)
            previous = score
    else:
        checkpoints.sort(key=tie_break)
    return Leaderboard(columns, checkpoints, list(dense.values()), rank_by)


def leaderboard_records(board: Leaderboard) -> list[dict[str, Any]]:
    """One flat record per row (dense first, then the ranked checkpoints): what results.csv holds."""
    records = []
    for entry in board.dense + board.entries:
        record: dict[str, Any] = {
            "rank": entry.rank, "model": entry.model, "method": entry.method, "setting": entry.setting,
            "calibration": entry.calibration, "is_dense": entry.is_dense, "seeds": entry.seeds, "n_seeds": len(entry.seeds),
        }
        for column in board.columns:
            cell = entry.cells[column.key]
            record[column.csv_name] = cell.mean
            record[f"{column.csv_name}_std"] = cell.std
        record["hub_repos"] = [link["repo_id"] for link in entry.hub]
        record["hub_urls"] = [link["url"] for link in entry.hub]
        record["run_ids"] = entry.run_ids
        records.append(record)
    return records


def csv_fields(board: Leaderboard) -> list[str]:
    return (["rank", "model", "method", "setting", "calibration", "is_dense", "seeds", "n_seeds"]
            + [name for c in board.columns for name in (c.csv_name, f"{c.csv_name}_std")] + ["hub_repos", "hub_urls", "run_ids"])
