"""Every command's --help: flags show no value type (typer's rich help printed ``<bool>`` after them)."""

from __future__ import annotations

import typer
from typer.testing import CliRunner

from prunekit.cli.main import app


def _commands() -> list[list[str]]:
    group = typer.main.get_command(app)
    return [[]] + [[name] for name in sorted(group.commands)]


def test_no_command_shows_a_metavar_after_a_flag() -> None:
    runner = CliRunner()
    commands = _commands()
    assert ["eval"] in commands and ["prune"] in commands and len(commands) > 8
    for args in commands:
        result = runner.invoke(app, [*args, "--help"], terminal_width=200)
        assert result.exit_code == 0, (args, result.output)
        assert "--help" in result.output
        assert "<bool>" not in result.output, f"prunekit {' '.join(args)} --help shows <bool>"
    # the flags are still there, and options that take a value still show their type
    result = runner.invoke(app, ["eval", "--help"], terminal_width=200)
    assert "--include-bos" in result.output and "--no-parallelize" in result.output
    assert "<int>" in result.output  # --seqlen
