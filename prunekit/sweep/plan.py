"""What a sweep has done and what is left: a :class:`Plan` (each task's stages and their states, read
from the runs dir). :mod:`prunekit.sweep.table` shows it, before a sweep starts and on ``--dry-run``."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prunekit.sweep.config import SweepConfig
from prunekit.sweep.grid import Grid, RunTask, expand
from prunekit.sweep.layout import is_complete, task_states

@dataclass
class PlanRow:
    task: Any
    states: dict[str, str]

    @property
    def complete(self) -> bool:
        return is_complete(self.states)


@dataclass
class Plan:
    """The sweep's tasks (its grid) and each one's stage states as last read from ``runs_dir``."""

    config: SweepConfig
    runs_dir: Path
    grid: Grid
    rows: list[PlanRow]
    counts: dict[str, int] = field(init=False)

    def __post_init__(self) -> None:
        self.counts = {
            "tasks": len(self.rows),
            "runs": sum(isinstance(r.task, RunTask) for r in self.rows),
            "complete": sum(r.complete for r in self.rows),
            "busy": sum("busy" in r.states.values() for r in self.rows),
        }

    def pending(self, kind: type) -> list:
        return [row.task for row in self.rows if isinstance(row.task, kind) and not row.complete and "busy" not in row.states.values()]

    def refreshed(self) -> Plan:
        """The same tasks with their states read again (other processes may have moved them meanwhile)."""
        return read_plan(self.config, self.runs_dir, self.grid)


def read_plan(config: SweepConfig, runs_dir: Path, grid: Grid) -> Plan:
    """The state of every task of ``grid`` (the config's, expanded) in ``runs_dir``."""
    rows = [PlanRow(task, task_states(config, runs_dir, task)) for task in [*grid.dense, *grid.runs, *grid.analysis]]
    return Plan(config, Path(runs_dir), grid, rows)


def make_plan(config: SweepConfig, runs_dir: Path) -> Plan:
    """The config's grid and its states in ``runs_dir`` (:func:`read_plan` of :func:`expand`)."""
    return read_plan(config, runs_dir, expand(config))
