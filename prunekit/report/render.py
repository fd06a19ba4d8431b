"""Write a report: report.md, a self-contained report.html (jinja2; PNGs embedded as base64, the
leaderboard's sorting / filter / target selector as a small inline script), results.csv (the
leaderboard, one line per checkpoint), cells.csv (one line per table cell), leaderboard.json (versioned)
and heatmaps/*.png (matplotlib Agg)."""

from __future__ import annotations

import base64
import csv
import io
import math
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prunekit.artifacts import REPORT_KIND
from prunekit.io import versioned, write_json_atomic, write_text_atomic
from prunekit.report.leaderboard import Entry, Leaderboard, csv_fields, leaderboard_records
from prunekit.report.tables import Block, Cell, MetricTable

if TYPE_CHECKING:
    from prunekit.report import Report


def fmt(value: float | None, decimals: int, signed: bool = False) -> str:
    if value is None:
        return "n/a"
    if math.isinf(value):
        return ("+" if signed and value > 0 else "") + ("∞" if value > 0 else "−∞")
    return f"{value:+.{decimals}f}" if signed else f"{value:.{decimals}f}"


def cell_text(cell: Cell, decimals: int) -> str:
    if cell.mean is None:
        return "n/a"
    text = fmt(cell.mean, decimals)
    if cell.std is not None:
        text += f" ± {fmt(cell.std, decimals)}"
    return text


def data_value(value: float | None) -> str:
    """A number as the page's script reads it back (parseFloat): '' for n/a, 'Infinity' for ∞."""
    if value is None or math.isnan(value):
        return ""
    if math.isinf(value):
        return "Infinity" if value > 0 else "-Infinity"
    return repr(value)


def seeds_text(entry: Entry) -> str:
    return "—" if entry.is_dense else ", ".join("–" if s is None else str(s) for s in entry.seeds)


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-")


# -------------------------------------------------------------------------------------- heatmaps


def heatmap(table: MetricTable, block: Block, path: Path) -> Path:
    """Rows: calibration sets; columns: evaluation languages/tasks; the diagonal outlined."""
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    metric = table.metric
    rows, columns = block.rows, table.columns
    data = np.array([[row.cells[c.key].mean if row.cells[c.key].mean is not None else np.nan for c in columns] for row in rows], dtype=float)
    data[~np.isfinite(data)] = np.nan
    # Shade column by column, as the study reads its tables ("the lighter the color in a column, the better"):
    # 1 = the best calibration set for that evaluation language, 0 = the worst.
    shade = np.full_like(data, np.nan)
    for j in range(data.shape[1]):
        column = data[:, j]
        if np.isfinite(column).any():
            low, high = np.nanmin(column), np.nanmax(column)
            scaled = np.ones_like(column) if high == low else (column - low) / (high - low)
            shade[:, j] = 1.0 - scaled if metric.lower_is_better else scaled
    fig = Figure(figsize=(1.6 + 0.9 * len(columns), 1.0 + 0.55 * len(rows)), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    image = ax.imshow(np.ma.masked_invalid(shade), cmap="viridis", vmin=0.0, vmax=1.0, aspect="auto")
    bar = fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, ticks=[0, 1])
    bar.ax.set_yticklabels(["worst", "best"])
    bar.set_label("within each column", fontsize=7)
    rotate = any(len(c.label) > 4 for c in columns)
    ax.set_xticks(range(len(columns)), [c.label for c in columns], rotation=45 if rotate else 0, ha="right" if rotate else "center")
    ax.set_yticks(range(len(rows)), [row.calibration for row in rows])
    ax.set_xlabel("evaluation")
    ax.set_ylabel("calibration")
    ax.set_title(f"{metric.title} ({metric.better} is better)\n{block.label}", fontsize=9)
    for i, row in enumerate(rows):
        for j, column in enumerate(columns):
            cell = row.cells[column.key]
            text = "n/a" if cell.mean is None else fmt(cell.mean, metric.decimals)
            dark = np.isfinite(shade[i, j]) and shade[i, j] < 0.5
            ax.text(j, i, text, ha="center", va="center", fontsize=7, color="white" if dark else "black",
                    fontweight="bold" if cell.best else "normal")
            if column.language is not None and row.calibration == column.language:
                ax.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, edgecolor="red", linewidth=2.2))
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    fig.savefig(tmp, format="png")
    tmp.replace(path)
    return path


def heatmap_name(table: MetricTable, block: Block) -> str:
    pattern = "" if block.pattern in ("-", "") or not block.show_pattern else f"__{slug(block.pattern)}"
    return f"{slug(block.model)}__{slug(block.method)}{pattern}__{slug(table.metric.id.replace(':', '-').replace('/', '-'))}.png"


# -------------------------------------------------------------------------------------- markdown


def _md_row(cells: list[str]) -> str:
    return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"


def leaderboard_note(board: Leaderboard) -> str:
    by = board.rank_by
    ranked = (f"ranked by {by.header} ({by.metric.better} is better)" if by is not None else "in sweep order")
    several = len({e.model for e in board.entries}) > 1
    return (f"One row per checkpoint, {ranked}. Cells are mean ± sample standard deviation over seeds; the averages "
            "across languages are taken seed by seed (geometric mean for perplexity, arithmetic mean for SNR, pruning "
            "error and task scores) and then summarised over seeds. Task groups show their accuracy (F1 where a group "
            "has no accuracy) in %, averaged over the group's languages. The best checkpoint of each column is marked; "
            "the dense model is the reference row."
            + (" Perplexities of models with different tokenizers are not comparable with each other." if several else ""))


def hub_markdown(entry: Entry) -> str:
    return ", ".join(f"[{link['repo_id']}]({link['url']})" for link in entry.hub)


def leaderboard_markdown(board: Leaderboard) -> list[str]:
    lines = ["## Leaderboard", "", leaderboard_note(board), ""]
    lines.append(_md_row(["#", "model", "method", "setting", "calibration", "seeds"] + [c.header for c in board.columns] + ["Hub"]))
    lines.append(_md_row(["---:"] + ["---"] * 5 + ["---:"] * len(board.columns) + ["---"]))
    for entry in board.dense + board.entries:
        cells = []
        for column in board.columns:
            cell = entry.cells[column.key]
            text = "—" if entry.is_dense and not column.metric.dense_row else cell_text(cell, column.metric.decimals)
            cells.append(f"**{text}**" if cell.best else text)
        lines.append(_md_row(["—" if entry.rank is None else str(entry.rank), entry.model, entry.method, entry.setting,
                              entry.calibration, seeds_text(entry)] + cells + [hub_markdown(entry)]))
    lines.append("")
    if board.targets:
        lines += ["### Best checkpoint per target language and task", ""]
        lines += [_md_row(["target", "best checkpoint", "value", "Hub"]), _md_row(["---", "---", "---:", "---"])]
        for column in board.targets:
            best = board.best(column.key)
            if best is not None:
                lines.append(_md_row([column.target_label, best.name, cell_text(best.cells[column.key], column.metric.decimals),
                                      hub_markdown(best)]))
        lines.append("")
    return lines


def conventions_of(report: "Report") -> str:
    """The conventions (prunekit.conventions) the evaluated runs were made and measured with: 'study', 'prunekit' or both."""
    names = sorted({(r.results.get("settings", {}).get("conventions") or {}).get("name", "prunekit") for r in report.collected.runs})
    return " and ".join(names) or "prunekit"


def markdown(report: "Report") -> str:
    lines = [f"# Sweep report: {report.name}", ""]
    runs, dense = len(report.collected.runs), len(report.collected.dense)
    lines.append(f"Runs dir `{report.runs_dir}` · {runs} evaluated run{'s' * (runs != 1)} · "
                 f"{dense} dense model{'s' * (dense != 1)} · conventions `{conventions_of(report)}` · created {report.created}")
    lines.append("")
    lines += leaderboard_markdown(report.leaderboard)
    lines += ["## The study's tables", ""]
    lines.append("Cells are mean ± sample standard deviation (ddof = 1) over seeds (a single seed shows no std). "
                 "Rows are calibration sets, columns evaluation languages (or tasks). **Bold** marks the best cell "
                 "of each column within a model × method block; ◆ marks calibration language = evaluation language "
                 "(the diagonal, outlined in the heatmaps). Pruning error is printed ×10⁶ as in the study's Table 1; "
                 "SNR is the mean over layers in dB (over the changed layers when a layer was kept dense); "
                 "accuracies and F1 are in %.")
    lines.append("")
    if report.findings:
        lines += ["## Findings", ""] + [f"- {line}" for line in report.findings] + [""]
    for table in report.tables:
        metric = table.metric
        lines += [f"## {metric.title} ({metric.better} is better)", ""]
        if metric.id == "perplexity" and report.perplexity_settings:
            lines += [report.perplexity_settings, ""]
        header = ["model", "method", "calibration"] + [c.label for c in table.columns]
        lines += [_md_row(header), _md_row(["---"] * 3 + ["---:"] * len(table.columns))]
        dense_printed: set[str] = set()
        for block in table.blocks:
            if block.dense is not None and block.model not in dense_printed:  # once per model, as the study's '-' row
                dense_printed.add(block.model)
                lines.append(_md_row([block.model, "dense", "—"] + [cell_text(block.dense.cells[c.key], metric.decimals) for c in table.columns]))
            for row in block.rows:
                cells = []
                for c in table.columns:
                    text = cell_text(row.cells[c.key], metric.decimals)
                    if row.cells[c.key].best:
                        text = f"**{text}**"
                    if c.language is not None and c.language == row.calibration:
                        text += " ◆"
                    cells.append(text)
                lines.append(_md_row([block.model, row.method_label, row.calibration] + cells))
        lines.append("")
        if any(block.dense is not None for block in table.blocks):
            lines += [f"### {metric.title}: change against the dense model (mean − dense)", ""]
            lines += [_md_row(header), _md_row(["---"] * 3 + ["---:"] * len(table.columns))]
            for block in table.blocks:
                if block.dense is None:
                    continue
                for row in block.rows:
                    lines.append(_md_row([block.model, row.method_label, row.calibration]
                                         + [fmt(row.cells[c.key].delta, metric.decimals, signed=True) for c in table.columns]))
            lines.append("")
        maps = [p for p in report.heatmaps_for(metric.id)]
        if maps:
            lines += [f"![{metric.title} — {p.stem}](heatmaps/{p.name})" for p in maps] + [""]
    if report.advisor:
        lines += ["## Calibration advisor", ""]
        if report.advice_summary:
            lines += [report.advice_summary, ""]
        if report.advice:
            lines += ["For each target language and metric where another calibration set scored best: that set, and its "
                      "margin over calibrating on the target language itself (how much better it is).", ""]
            lines.append(_md_row(["model", "method", "metric", "target", "best calibration", "best", "target-language calibration", "margin"]))
            lines.append(_md_row(["---"] * 5 + ["---:"] * 3))
            for a in report.advice:
                decimals = report.decimals(a.metric)
                lines.append(_md_row([a.model, a.method, a.metric_title, a.target,
                                      a.best_calibration, fmt(a.best_value, decimals), fmt(a.own_value, decimals), fmt(a.margin, decimals)]))
            lines.append("")
    if report.collected.analysis:
        lines += ["## What pruning changed between calibration sets (prunekit compare)", ""]
        lines += [_md_row(["model", "method", "pair", "seeds", "status", "summary"]), _md_row(["---"] * 6)]
        for item in report.collected.analysis:
            link = f"[summary.md]({item['summary']})" if item["summary"] else (item["note"] or "")
            lines.append(_md_row([item["model"], item["method"], " vs ".join(item["pair"]), str(item["seeds"]), item["status"], link]))
        lines.append("")
    if report.collected.missing:
        lines += ["## Runs without results", ""]
        for item in report.collected.missing:
            lines.append(f"- `{item['run_id']}` {item['model']} · {item['method']} · {item['calibration']} · seed {item['seed']}: {item['reason']}")
        lines.append("")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------ html


def html(report: "Report") -> str:
    from jinja2 import Environment, PackageLoader, select_autoescape

    env = Environment(loader=PackageLoader("prunekit.report", "templates"), autoescape=select_autoescape(["html", "j2"]))
    env.filters["cell"] = cell_text
    env.filters["fmt"] = fmt
    env.filters["data_value"] = data_value
    env.filters["seeds"] = seeds_text
    images = {}
    for table in report.tables:
        images[table.metric.id] = [(p.stem, base64.b64encode(p.read_bytes()).decode("ascii")) for p in report.heatmaps_for(table.metric.id)]
    script = (Path(__file__).parent / "templates" / "leaderboard.js").read_text(encoding="utf-8")
    return env.get_template("report.html.j2").render(report=report, board=report.leaderboard, images=images,
                                                    note=leaderboard_note(report.leaderboard), script=script,
                                                    conventions=conventions_of(report))


# ------------------------------------------------------------------------------------ csv / json

CSV_FIELDS = ["metric", "metric_title", "better", "scale", "model", "method", "pattern", "calibration", "is_dense", "column",
              "language", "diagonal", "mean", "std", "n", "seeds", "values", "dense", "delta", "best", "status", "note"]


def cell_records(report: "Report") -> list[dict[str, Any]]:
    records = []
    for table in report.tables:
        metric = table.metric
        for block in table.blocks:
            rows = ([block.dense] if block.dense is not None else []) + block.rows
            for row in rows:
                for column in table.columns:
                    cell = row.cells[column.key]
                    dense_cell = None if block.dense is None else block.dense.cells[column.key]
                    records.append({
                        "metric": metric.id, "metric_title": metric.title, "better": metric.better, "scale": metric.scale,
                        "model": block.model, "method": row.method if not row.is_dense else "dense",
                        "pattern": block.pattern if not row.is_dense else "-", "calibration": row.calibration,
                        "is_dense": row.is_dense, "column": column.key, "language": column.language,
                        "diagonal": bool(column.language and column.language == row.calibration),
                        "mean": cell.mean, "std": cell.std, "n": cell.n, "seeds": cell.seeds, "values": cell.values,
                        "dense": None if (row.is_dense or dense_cell is None) else dense_cell.mean,
                        "delta": cell.delta, "best": cell.best, "status": cell.status, "note": cell.note,
                        "block": block.label,
                    })
    return records


def write_csv(report: "Report", path: Path) -> Path:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_FIELDS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for record in cell_records(report):
        flat = dict(record)
        flat["seeds"] = ";".join("" if s is None else str(s) for s in record["seeds"])
        flat["values"] = ";".join(repr(v) for v in record["values"])
        for key in ("mean", "std", "dense", "delta"):
            flat[key] = "" if record[key] is None else repr(record[key])
        writer.writerow(flat)
    return write_text_atomic(path, buffer.getvalue())


def _csv_value(value: Any) -> Any:
    if value is None:
        return ""
    if isinstance(value, list):
        return ";".join("" if v is None else str(v) for v in value)
    return repr(value) if isinstance(value, float) else value


def write_leaderboard_csv(report: "Report", path: Path) -> Path:
    """The leaderboard as a table: one line per checkpoint (the dense reference first), mean and std per column."""
    board = report.leaderboard
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=csv_fields(board), lineterminator="\n")
    writer.writeheader()
    for record in leaderboard_records(board):
        writer.writerow({key: _csv_value(value) for key, value in record.items()})
    return write_text_atomic(path, buffer.getvalue())


def write_json(report: "Report", path: Path) -> Path:
    payload = versioned(REPORT_KIND, {
        "name": report.name,
        "runs_dir": str(report.runs_dir),
        "created": report.created,
        "findings": report.findings,
        "leaderboard": {
            "rank_by": None if report.leaderboard.rank_by is None else report.leaderboard.rank_by.key,
            "columns": [{"key": c.key, "header": c.header, "csv_name": c.csv_name, "metric": c.metric.id, "better": c.metric.better,
                         "language": c.language, "average": c.average} for c in report.leaderboard.columns],
            "rows": leaderboard_records(report.leaderboard),
        },
        "conventions": conventions_of(report),
        "cells": cell_records(report),
        "advisor": [a.__dict__ for a in report.advisor],
        "runs": [{"run_id": r.run_id, "model": r.model, "method": r.method, "pattern": r.pattern,
                  "calibration": r.calibration, "seed": r.seed} for r in report.collected.runs],
        "dense": {key: d.model for key, d in report.collected.dense.items()},
        "missing": report.collected.missing,
        "analysis": [{k: v for k, v in item.items() if k != "summary_text"} for item in report.collected.analysis],
        "heatmaps": [f"heatmaps/{p.name}" for p in report.heatmaps],
    })
    return write_json_atomic(path, payload)
