"""What a sweep has done and what is left: a :class:`Plan` (each task's stages and their states, read
from the runs dir) and its table, printed before a sweep starts and by ``--dry-run``."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from prunekit.sweep.config import SweepConfig
from prunekit.sweep.grid import DenseTask, Grid, RunTask, expand
from prunekit.sweep.layout import is_complete, task_states

STATE_STYLE = {"done": "green", "todo": "yellow", "failed": "red", "stale": "magenta", "busy": "cyan"}
STATE_TEXT = {"done": "done", "todo": "to do", "failed": "failed → retry", "stale": "killed → redo", "busy": "running elsewhere"}


@dataclass
class PlanRow:
    task: Any
    states: dict[str, str]

    @property
    def complete(self) -> bool:
        return is_complete(self.states)


@dataclass
class Plan:
    config: SweepConfig
    grid: Grid
    rows: list[PlanRow]

    def pending(self, kind: type) -> list:
        return [row.task for row in self.rows if isinstance(row.task, kind) and not row.complete and "busy" not in row.states.values()]

    def counts(self) -> dict[str, int]:
        return {
            "tasks": len(self.rows),
            "runs": sum(isinstance(r.task, RunTask) for r in self.rows),
            "complete": sum(r.complete for r in self.rows),
            "busy": sum("busy" in r.states.values() for r in self.rows),
        }


def make_plan(config: SweepConfig, runs_dir: Path) -> Plan:
    grid = expand(config)
    rows = [PlanRow(task, task_states(config, runs_dir, task)) for task in [*grid.dense, *grid.runs, *grid.analysis]]
    return Plan(config, grid, rows)


def plan_table(plan: Plan, runs_dir: Path) -> Table:
    counts = plan.counts()
    title = (f"sweep '{plan.config.name}' · {counts['runs']} runs · {len(plan.grid.dense)} dense · "
             f"{len(plan.grid.analysis)} analysis · {counts['complete']}/{counts['tasks']} tasks already done · {runs_dir}")
    table = Table(title=title, title_justify="left")
    for column in ("task", "model", "method", "pattern", "calibration", "seed"):
        table.add_column(column, no_wrap=True)
    stages = ["dense", "prune", "eval"] + (["push"] if plan.config.push else []) + (["analysis"] if plan.grid.analysis else [])
    for name in stages:
        table.add_column(name, no_wrap=True)
    for row in plan.rows:
        task = row.task
        if isinstance(task, DenseTask):
            cells = [task.task_id, task.model.name, "(dense)", "-", "-", "-"]
        elif isinstance(task, RunTask):
            cells = [task.run_id, task.model.name, task.method.label, task.pattern_label, task.calib or "none",
                     "-" if task.seed is None else str(task.seed)]
        else:
            cells = [task.key, task.model.name, task.method.label, task.pattern_label, " vs ".join(task.pair), f"{len(task.runs_a)} seed(s)"]
        for name in stages:
            state = row.states.get(name)
            cells.append("" if state is None else f"[{STATE_STYLE[state]}]{STATE_TEXT[state]}[/]")
        table.add_row(*cells)
    return table


def plan_console() -> Console:
    """stdout; wide enough for the plan when writing to a file or pipe (a log)."""
    console = Console(stderr=False)
    return console if console.is_terminal else Console(stderr=False, width=200)
