"""Leaderboard reports of a sweep: every checkpoint ranked (prunekit.report.leaderboard), then the
study's Tables 1–4 (prunekit.report.tables).

    from prunekit.report import build_report, diagonal_finding
    report = build_report("runs/tiny", "report/")
    print("\\n".join(diagonal_finding(report)))
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from prunekit.artifacts import REPORT_JSON_FILE
from prunekit.errors import ConfigError
from prunekit.io import write_text_atomic
from prunekit.report.collect import Collected, collect
from prunekit.report.leaderboard import Entry, LeaderColumn, Leaderboard, build_leaderboard
from prunekit.report.tables import (
    AdvisorRow,
    Block,
    Cell,
    MetricTable,
    Row,
    advisor_summary,
    build_advisor,
    build_tables,
    diagonal_counts,
)

__all__ = ["AdvisorRow", "Block", "Cell", "Entry", "LeaderColumn", "Leaderboard", "MetricTable", "Report", "Row",
           "build_report", "diagonal_finding"]


@dataclass
class Report:
    name: str
    runs_dir: Path
    out_dir: Path
    collected: Collected
    tables: list[MetricTable]
    advisor: list[AdvisorRow]
    created: str
    leaderboard: Leaderboard
    findings: list[str] = field(default_factory=list)
    heatmaps: list[Path] = field(default_factory=list)
    files: dict[str, Path] = field(default_factory=dict)

    @property
    def perplexity_settings(self) -> str | None:
        """How the runs' perplexity was measured (each distinct setting once), and why it differs elsewhere."""
        from prunekit.artifacts import PERPLEXITY_SETTINGS_NOTE, windows_perplexity_settings

        runs = list(self.collected.runs) + list(self.collected.dense.values())
        lines = sorted({windows_perplexity_settings(r.results["settings"]) for r in runs
                        if r.results.get("settings") and r.results.get("perplexity")})
        return f"{'; '.join(lines)}. {PERPLEXITY_SETTINGS_NOTE}" if lines else None

    def table(self, metric: str) -> MetricTable:
        """The table of a metric: 'perplexity', 'snr_db', 'pruning_error' or 'task:<group>/<metric>'
        (a bare '<group>/<metric>' works too)."""
        for table in self.tables:
            if table.metric.id in (metric, f"task:{metric}"):
                return table
        raise KeyError(f"no '{metric}' table; the report has: {', '.join(t.metric.id for t in self.tables)}")

    def heatmaps_for(self, metric: str) -> list[Path]:
        from prunekit.report.render import heatmap_name

        try:
            table = self.table(metric)
        except KeyError:
            return []
        names = {heatmap_name(table, block) for block in table.blocks}
        return [p for p in self.heatmaps if p.name in names]

    def advice(self) -> tuple[list[AdvisorRow], str]:
        """The advisor as the report shows it: the rows where another calibration set beat the target language's
        own, and one sentence (``tables.advisor_summary``); ``advisor`` keeps every row (leaderboard.json)."""
        return advisor_summary(self.advisor)

    def decimals(self, metric: str) -> int:
        return self.table(metric).metric.decimals


def diagonal_finding(report: Report, metric: str = "perplexity") -> list[str]:
    """One line per model × method, e.g. 'calibrating on the target language gave the lowest perplexity
    in 6 of 7 languages (sparsegpt, Meta-Llama-3-8B-Instruct)'."""
    try:
        table = report.table(metric)
    except KeyError:
        return []
    word = "lowest" if table.metric.lower_is_better else "highest"
    name = table.metric.title.split(" (")[0].split(" [")[0]
    name = {"perplexity": "perplexity", "snr_db": "SNR", "pruning_error": "pruning error"}.get(table.metric.id, name)
    lines = []
    for block, k, n in diagonal_counts(table):
        method = block.method_label
        lines.append(f"calibrating on the target language gave the {word} {name} in {k} of {n} "
                     f"language{'s' if n != 1 else ''} ({method}, {block.model})")
    return lines


def build_report(runs_dir: str | Path, out_dir: str | Path, heatmaps: bool = True) -> Report:
    """Read every evaluated run of a sweep and write its report; what ``prunekit report`` does.

    The report opens with the leaderboard (every checkpoint ranked), then the study's tables per metric (mean ±
    std over seeds, the best cell per column, the change against the dense model), the calibration advisor, the
    analyses and the runs not evaluated yet. A damaged file is left out with a warning that names it.

    Args:
        runs_dir (`str` or `Path`):
            The ``--runs-dir`` of a sweep (:func:`prunekit.sweep.run_sweep`); only its files are read.
        out_dir (`str` or `Path`):
            Where the report goes (created when missing): ``report.md``, ``report.html`` (self-contained: the
            heatmaps are inlined), ``results.csv`` (the leaderboard), ``cells.csv`` (every table cell),
            ``leaderboard.json`` (versioned, with every advisor row) and ``heatmaps/*.png``; each written atomically.
        heatmaps (`bool`, *optional*, defaults to `True`):
            Draw one heatmap per metric and (model, method) block (calibration set × evaluation language).

    Returns:
        [`Report`]: the collected runs, the tables, the advisor, the leaderboard, the findings (e.g. "calibrating
        on the target language gave the lowest perplexity in 6 of 7 languages") and ``files``, the paths written.

    Raises:
        [`~prunekit.errors.ConfigError`]: ``runs_dir`` does not exist, holds no sweep, or holds no evaluated run
            yet (the message says how many runs are still waiting and which command finishes them).

    Example:

    ```python
    >>> from prunekit.report import build_report, diagonal_finding
    >>> report = build_report("runs/tiny", "report/tiny")
    >>> report.files["report.html"]
    PosixPath('report/tiny/report.html')
    >>> print("\\n".join(diagonal_finding(report)))
    ```
    """
    from prunekit.report import render

    collected = collect(runs_dir)
    if not collected.runs:
        waiting = f" ({len(collected.missing)} runs are not evaluated yet)" if collected.missing else ""
        raise ConfigError(f"no evaluated runs in '{runs_dir}'{waiting}; finish the sweep first (`prunekit sweep CONFIG --runs-dir {runs_dir}`)")
    out_dir = Path(out_dir).expanduser()
    out_dir.mkdir(parents=True, exist_ok=True)
    tables = build_tables(collected)
    name = (collected.sweep or {}).get("name") or Path(runs_dir).name
    report = Report(name, Path(runs_dir), out_dir, collected, tables, build_advisor(tables),
                    datetime.now(timezone.utc).isoformat(timespec="seconds"), build_leaderboard(collected, tables))
    report.findings = [line for metric in ("perplexity", "snr_db", "pruning_error") for line in diagonal_finding(report, metric)]
    if heatmaps:
        for table in tables:
            for block in table.blocks:
                if block.rows:
                    report.heatmaps.append(render.heatmap(table, block, out_dir / "heatmaps" / render.heatmap_name(table, block)))
    report.files["report.md"] = write_text_atomic(out_dir / "report.md", render.markdown(report))
    report.files["report.html"] = write_text_atomic(out_dir / "report.html", render.html(report))
    report.files["results.csv"] = render.write_leaderboard_csv(report, out_dir / "results.csv")
    report.files["cells.csv"] = render.write_csv(report, out_dir / "cells.csv")
    report.files[REPORT_JSON_FILE] = render.write_json(report, out_dir / REPORT_JSON_FILE)
    return report
