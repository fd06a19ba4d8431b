"""The options of ``prunekit compare`` that make its :class:`~prunekit.analysis.spec.CompareSpec`, declared once.

A command decorated with :func:`compare_options` declares only its other options; these are added to its
signature before its ``out`` option and reach it as one ``CompareSpec`` (made, and so validated, here) in its
first parameter. Each option has the spec field's name (``--lape-thresholds`` is ``lape_thresholds``).
"""

from __future__ import annotations

from typing import Any, Optional

import typer

from prunekit.cli.spec_options import spec_options

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


def _compare_spec() -> type:
    from prunekit.analysis.spec import CompareSpec

    return CompareSpec


# Add the options to a command, before its ``out``; its first parameter receives them as a ``CompareSpec``.
compare_options = spec_options(OPTIONS, _compare_spec, "comparison",
                               lambda own: next((i for i, p in enumerate(own) if p.name == "out"), len(own)))
