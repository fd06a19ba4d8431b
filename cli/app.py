"""The typer application and the error handling every command shares."""

from __future__ import annotations

import functools
import os
import sys
from typing import Callable

import click
import typer

from prunekit.errors import PrunekitError

app = typer.Typer(
    name="prunekit",
    help=(
        "Prune multilingual LLMs with language-specific calibration, evaluate every pruned model in "
        "every language, analyse what pruning changed, publish to the Hugging Face Hub, and sweep.\n\n"
        "Start with `prunekit demo` (offline, on a laptop CPU)."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

DEBUG = {"enabled": bool(os.environ.get("PRUNEKIT_DEBUG"))}


@app.callback()
def _root(debug: bool = typer.Option(False, "--debug", help="Show full tracebacks for prunekit bugs.")) -> None:
    if debug:
        DEBUG["enabled"] = True


def user_errors(func: Callable) -> Callable:
    """Print a PrunekitError as one line on stderr and exit 2; anything else is a bug."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except PrunekitError as err:
            print(f"error: {err}", file=sys.stderr)
            raise SystemExit(2) from None
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            raise SystemExit(130) from None
        except (typer.Exit, typer.Abort, click.exceptions.Exit, click.exceptions.Abort):  # a command's own exit code
            raise
        except Exception as err:  # a bug: say so, traceback only with --debug
            if DEBUG["enabled"]:
                raise
            print(
                f"internal error ({type(err).__name__}: {err}); this is a bug in prunekit — rerun with --debug "
                "for the traceback and report it",
                file=sys.stderr,
            )
            raise SystemExit(1) from None

    return wrapper
