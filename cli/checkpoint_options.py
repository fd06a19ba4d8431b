"""The options ``prunekit prune`` and ``prunekit quantize`` share, declared once.

A command decorated with :func:`checkpoint_options` declares only its own options; the shared ones (the
model, the calibration text, the output checkpoint, where and how to compute) are added to its signature
after them, and reach it as one :class:`CheckpointOptions` in its first parameter::

    @app.command()
    @user_errors
    @checkpoint_options(uncalibrated="magnitude")
    def prune(options: CheckpointOptions, method: str = typer.Option(...)) -> None: ...
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Callable, Optional

import typer

from prunekit.conventions import HELP as CONVENTIONS_HELP


@dataclass(frozen=True)
class CheckpointOptions:
    """The shared options as the user gave them (validated by the library, not here)."""

    model: str
    calib: Optional[str]
    calib_source: str
    nsamples: Optional[int]
    seqlen: Optional[int]
    seed: int
    out: Path
    dtype: str
    device: str
    skip_layers: Optional[str]
    overwrite: bool
    no_resume: bool
    batch_size: Optional[int]
    trust_remote_code: bool
    conventions: str
    quiet: bool
    force: bool

    def pipeline_arguments(self, checkpoint_format: str = "packed", solve_threads: int | None = None) -> dict[str, Any]:
        """The keyword arguments of ``prunekit.pipeline.prune`` these options give (all but the model and the
        method's target): the calibration, output and engine specs, made (and so validated) here, once."""
        from prunekit.recipe import CalibrationSpec, EngineSpec, OutputSpec

        return {
            "calibration": CalibrationSpec(self.calib, self.calib_source, self.nsamples, self.seqlen, self.seed, self.conventions),
            "output": OutputSpec(self.out, self.dtype, checkpoint_format, self.overwrite, resume=not self.no_resume),
            "engine": EngineSpec(self.device, self.skip_layers, self.batch_size, solve_threads, self.trust_remote_code),
            "progress": not self.quiet,
        }


def _shared(uncalibrated: str) -> dict[str, tuple[Any, Any]]:
    """name -> (annotation, typer default), in the order --help lists them (the model first)."""
    return {
        "model": (str, typer.Argument(..., help="Local model dir, .gguf file, Hub id (org/name) or embedded:gemma-3-270m.")),
        "calib": (Optional[str], typer.Option(
            None, "--calib", "-c",
            help=f"Calibration language: a code (de), a mix (en+de, equal shares) or 'all' (the study's seven). Default en; {uncalibrated} uses none.")),
        "calib_source": (str, typer.Option(
            "embedded", "--calib-source",
            help="mc4 (streamed with datasets), embedded (prunekit's own texts) or a PATH (.txt/.jsonl/.parquet, or a dir with one file per language).")),
        "nsamples": (Optional[int], typer.Option(
            None, "--nsamples",
            help="Number of calibration sequences (default: the study's 128, or as many as the text supplies; the choice is printed).")),
        "seqlen": (Optional[int], typer.Option(
            None, "--seqlen",
            help="Tokens per calibration sequence (default: the study's 8192 capped by the model's context, or shorter when the text is short).")),
        "seed": (int, typer.Option(0, "--seed", help="Seed of the calibration sampling.")),
        "out": (Path, typer.Option(..., "--out", "-o", help="Output checkpoint directory (written atomically).")),
        "dtype": (str, typer.Option(
            "auto", "--dtype",
            help="auto (the checkpoint's own dtype, kept in the output), bfloat16, float16 or float32: the dtype of the model "
                 "and of the saved weights (statistics are always fp32).")),
        "device": (str, typer.Option("auto", "--device", help="auto, cpu or cuda[:i]: where each decoder layer is computed.")),
        "skip_layers": (Optional[str], typer.Option(
            None, "--skip-layers", help="Layers left as they are (neither pruned nor quantized): 'first', 'last' and/or indices, comma-separated.")),
        "overwrite": (bool, typer.Option(False, "--overwrite", help="Replace a non-empty --out directory.")),
        "no_resume": (bool, typer.Option(
            False, "--no-resume",
            help="Start at layer 0 even if an interrupted run of this same command left its staging (.OUT.partial beside "
                 "--out: the finished layers and the next layer's inputs); by default a streamed run resumes there, "
                 "and removes a staging of another run.")),
        "batch_size": (Optional[int], typer.Option(
            None, "--batch-size", help="Calibration sequences per forward (default: ~8192 tokens).")),
        "trust_remote_code": (bool, typer.Option(False, "--trust-remote-code", help="Allow model code from the Hub (off by default).")),
        "conventions": (str, typer.Option("prunekit", "--conventions", help=CONVENTIONS_HELP)),
        "quiet": (bool, typer.Option(False, "--quiet", "-q", help="No progress bars or tables.")),
        "force": (bool, typer.Option(
            False, "--force", help="Load the model whole even when the memory check says it will not fit (a --dtype other "
            "than the checkpoint's, or a checkpoint that cannot stream, is loaded whole; the checkpoint's own dtype streams).")),
    }


SHARED = tuple(field.name for field in fields(CheckpointOptions))


def checkpoint_options(uncalibrated: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Add the shared options to a command (``uncalibrated``: its method that uses no calibration text,
    named in the help of --calib). The command's first parameter receives them as :class:`CheckpointOptions`."""
    shared = _shared(uncalibrated)
    assert tuple(shared) == SHARED

    def decorate(command: Callable[..., Any]) -> Callable[..., Any]:
        own = list(inspect.signature(command).parameters.values())[1:]  # the first is ``options``
        clash = {p.name for p in own} & set(SHARED)
        if clash:
            raise TypeError(f"{command.__name__} declares shared options itself: {', '.join(sorted(clash))}")
        kw = inspect.Parameter.KEYWORD_ONLY
        model, *rest = (inspect.Parameter(name, kw, annotation=annotation, default=default)
                        for name, (annotation, default) in shared.items())
        parameters = [model, *(p.replace(kind=kw) for p in own), *rest]

        @functools.wraps(command)
        def with_options(**values: Any) -> Any:
            options = CheckpointOptions(**{name: values.pop(name) for name in SHARED})
            from prunekit.models import memory_check_forced

            with memory_check_forced(options.force):
                return command(options, **values)

        with_options.__signature__ = inspect.signature(command).replace(parameters=parameters)  # type: ignore[attr-defined]
        return with_options

    return decorate
