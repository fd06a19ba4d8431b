"""The options of ``prunekit compare`` that make its :class:`~prunekit.analysis.spec.CompareSpec`, declared once.

A command decorated with :func:`compare_options` declares only its other options; these are added to its
signature before its ``out`` option and reach it as one ``CompareSpec`` (made, and so validated, here) in its
first parameter. Each option has the spec field's name (``--lape-thresholds`` is ``lape_thresholds``).
"""

from __future__ import annotations

import functools
import inspect
from typing import Any, Callable, Optional

import typer

OPTIONS: dict[str, tuple[Any, Any]] = {
    "langs": (Optional[str], typer.Option(None, "--langs", "-l", help="Evaluation languages for LSAR/LAPE/drift, comma-separated (de,en,sw) or 'all'. Default: the study's seven (ar,de,en,es,ru,sw,zh).")),
    "text_source": (str, typer.Option("embedded", "--text-source", help="embedded (prunekit's parallel passages), mc4 or a PATH (dir with {lang}.txt/.jsonl/.parquet); the evaluation split is used.")),
    "only": (Optional[str], typer.Option(None, "--only", help="Analyses to run, comma-separated from masks,lsar,lape,drift (default: all).")),
    "max_tokens": (Optional[int], typer.Option(None, "--max-tokens", help="At most this many content tokens per language (default: all of the text).")),
    "max_length": (int, typer.Option(512, "--max-length", help="Tokens per document at most (longer ones are cut).")),
    "lsar_rank": (Optional[int], typer.Option(None, "--lsar-rank", help="Rank r of the LSAR subspace, 1..K−1 (default K−1).")),
    "subspace": (str, typer.Option("per_model", "--subspace", help="per_model (the study: one subspace per model) or dense (the reference's subspace for both).")),
    "lape_thresholds": (str, typer.Option("none", "--lape-thresholds", help="none (the study) or tang (Tang et al.: top 1 %, filter 0.95, activation bar 0.95) for selecting language-specific neurons.")),
    "deactivate": (bool, typer.Option(False, "--deactivate", help="Also switch off each language's specific neurons and measure the per-language perplexity change (K extra passes per model).")),
    "dtype": (str, typer.Option("auto", "--dtype", help="auto (each checkpoint's own dtype), float32, bfloat16 or float16.")),
    "device": (str, typer.Option("auto", "--device", help="auto, cpu or cuda[:i].")),
    "batch_size": (int, typer.Option(1, "--batch-size", help="Documents per forward pass (right-padded).")),
    "trust_remote_code": (bool, typer.Option(False, "--trust-remote-code", help="Allow model code from the Hub (off by default).")),
    "conventions": (Optional[str], typer.Option(None, "--conventions", help="study or prunekit: the conventions the checkpoints should have been pruned with (default: what their prunekit.json records); a checkpoint made with others gets a warning, and the choice is recorded in compare.json.")),
}


def compare_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """Add the options to ``command`` (before its ``out``); its first parameter receives them as a ``CompareSpec``."""
    own = list(inspect.signature(command).parameters.values())[1:]  # the first is the spec
    clash = {p.name for p in own} & set(OPTIONS)
    if clash:
        raise TypeError(f"{command.__name__} declares comparison options itself: {', '.join(sorted(clash))}")
    kw = inspect.Parameter.KEYWORD_ONLY
    own = [p.replace(kind=kw) for p in own]
    at = next((i for i, p in enumerate(own) if p.name == "out"), len(own))
    added = [inspect.Parameter(name, kw, annotation=annotation, default=default) for name, (annotation, default) in OPTIONS.items()]

    @functools.wraps(command)
    def with_options(**values: Any) -> Any:
        from prunekit.analysis.spec import CompareSpec

        spec = CompareSpec(**{name: values.pop(name) for name in OPTIONS})
        return command(spec, **values)

    with_options.__signature__ = inspect.signature(command).replace(parameters=[*own[:at], *added, *own[at:]])  # type: ignore[attr-defined]
    return with_options
