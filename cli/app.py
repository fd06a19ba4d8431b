"""The typer application and the error handling every command shares."""

from __future__ import annotations

import errno
import functools
import os
import sys
from typing import Callable

import click
import typer
from typer.core import TyperCommand, TyperGroup

from prunekit.errors import PrunekitError


def _no_flag_metavar(params: list) -> list:
    """Flags take no value, so their help shows no type: typer's rich help would print ``<bool>`` after
    ``--include-bos`` or ``--parallelize/--no-parallelize`` (and ``--help``), as if a value followed."""
    for param in params:
        if getattr(param, "is_flag", False) and param.metavar is None:  # typer's own (vendored) click Option
            param.metavar = ""
    return params


class Command(TyperCommand):
    """Every prunekit command: typer's, with flags shown without a value type."""

    def get_params(self, ctx) -> list:
        return _no_flag_metavar(super().get_params(ctx))


class Group(TyperGroup):
    """The ``prunekit`` group (its --debug, --version, --help), with flags shown without a value type."""

    def get_params(self, ctx) -> list:
        return _no_flag_metavar(super().get_params(ctx))


class Typer(typer.Typer):
    """A typer application whose commands default to :class:`Command` (declared at the root, so no
    command has to remember it)."""

    def command(self, *args, cls: type[TyperCommand] | None = None, **kwargs):  # type: ignore[override]
        return super().command(*args, cls=cls or Command, **kwargs)


app = Typer(
    cls=Group,
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


def _print_version(value: bool) -> None:
    if value:
        from prunekit import __version__

        print(f"prunekit {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    debug: bool = typer.Option(False, "--debug", help="Show full tracebacks for prunekit bugs (also accepted after the command)."),
    version: bool = typer.Option(False, "--version", callback=_print_version, is_eager=True, help="Print prunekit's version and exit."),
) -> None:
    if debug:
        DEBUG["enabled"] = True


OUT_OF_MEMORY_ADVICE = "out of GPU memory ({detail}); use less of it: {remedies}"
# What lowers GPU memory, per command: only flags (or sweep keys) that command has.
OUT_OF_MEMORY_REMEDIES = {
    "prune": "a smaller --batch-size, fewer --nsamples or a shorter --seqlen, --dtype bfloat16, --solve-threads 1, or --device cpu",
    "quantize": "a smaller --batch-size, fewer --nsamples or a shorter --seqlen, --dtype bfloat16, or --device cpu",
    "evaluate_command": "a smaller --batch-size or --task-batch-size, a shorter --seqlen, fewer --snr-tokens, --dtype bfloat16, "
                        "with --backend vllm a lower --gpu-memory-utilization or --max-model-len, or --device cpu",
    "compare": "a smaller --batch-size, fewer --max-tokens or a shorter --max-length, --dtype bfloat16, or --device cpu",
    "demo": "fewer --nsamples or a shorter --seqlen, --dtype bfloat16, or --device cpu",
    "sweep": "in the config, a smaller execution.batch_size or evaluation.batch_size, fewer calibration.nsamples, "
             "a lower evaluation.gpu_memory_utilization (vllm), or execution.device: cpu",
}
OUT_OF_MEMORY_DEFAULT = "a smaller --batch-size, --dtype bfloat16, or --device cpu"


def as_user_error(err: BaseException, command: str | None = None) -> str | None:
    """The one-line message for an error the user or the machine caused that surfaced outside prunekit's
    own checks (out of GPU memory, a full or read-only disk, a damaged safetensors file), else None."""
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(err, getattr(torch, "OutOfMemoryError", ())):
        return OUT_OF_MEMORY_ADVICE.format(detail=str(err).strip().splitlines()[0][:200] if str(err).strip() else "CUDA",
                                           remedies=OUT_OF_MEMORY_REMEDIES.get(command or "", OUT_OF_MEMORY_DEFAULT))
    from prunekit.io import DISK_ERRNOS

    if isinstance(err, OSError) and err.errno in DISK_ERRNOS:
        where = f"{err.filename}: " if err.filename else ""
        full = err.errno in (errno.ENOSPC, errno.EDQUOT)
        return f"{where}{DISK_ERRNOS[err.errno]}; " + (
            "free some space or write somewhere else" if full else "choose a location you can write to, or fix its permissions")
    safetensors = sys.modules.get("safetensors")
    if safetensors is not None and isinstance(err, getattr(safetensors, "SafetensorError", ())):
        return f"a safetensors file is damaged or could not be written ({err}); check the checkpoint and the disk"
    return None


def user_errors(func: Callable) -> Callable:
    """Print a PrunekitError (or another error the user or machine caused) as one line on stderr and
    exit 2; anything else is a bug."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except PrunekitError as err:
            from prunekit.remote import strip_api_hints  # huggingface_hub's hints for its Python API users

            print(f"error: {strip_api_hints(str(err))}", file=sys.stderr)
            raise SystemExit(2) from None
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            raise SystemExit(130) from None
        except (typer.Exit, typer.Abort, click.exceptions.Exit, click.exceptions.Abort):  # a command's own exit code
            raise
        except Exception as err:  # a bug: say so, traceback only with --debug
            message = as_user_error(err, func.__name__)
            if message is not None and not DEBUG["enabled"]:
                print(f"error: {message}", file=sys.stderr)
                raise SystemExit(2) from None
            if DEBUG["enabled"]:
                raise
            print(
                f"internal error ({type(err).__name__}: {err}); this is a bug in prunekit — rerun with --debug "
                "for the traceback and report it",
                file=sys.stderr,
            )
            raise SystemExit(1) from None

    return wrapper
