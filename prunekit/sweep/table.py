"""The plan as a person reads it: one row per task, one column per stage, each state in its colour
(printed by ``prunekit sweep`` before it starts, and by ``--dry-run``)."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from prunekit.sweep.grid import DenseTask, RunTask
from prunekit.sweep.plan import Plan

STATE_STYLE = {"done": "green", "todo": "yellow", "failed": "red", "stale": "magenta", "busy": "cyan"}
STATE_TEXT = {"done": "done", "todo": "to do", "failed": "failed → retry", "stale": "killed → redo", "busy": "running elsewhere"}


def plan_table(plan: Plan) -> Table:
    """The plan's table: its title counts what is done; a row per task, a column per stage."""
    counts = plan.counts
    title = (f"sweep '{plan.config.name}' · {counts['runs']} runs · {len(plan.grid.dense)} dense · "
             f"{len(plan.grid.analysis)} analysis · {counts['complete']}/{counts['tasks']} tasks already done · {plan.runs_dir}")
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
