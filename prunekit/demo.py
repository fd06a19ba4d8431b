"""``prunekit demo``: the embedded Gemma-3-270M pruned with every calibration language and method
on prunekit's own seven-language texts, evaluated in every language, reported as the study's
Table 1 (rows: calibration language, columns: evaluation language). It runs through the same
sweep and report code as ``prunekit sweep`` / ``prunekit report``, so it is resumable too."""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prunekit.artifacts import RUN_FILE, SWEEP_FILE, SWEEP_KIND, SWEEP_RUN_KIND
from prunekit.conventions import parse_conventions
from prunekit.embedded import embedded_languages
from prunekit.errors import ConfigError, did_you_mean
from prunekit.languages import parse_languages

DEMO_MODEL = "embedded:gemma-3-270m"
CHECKPOINTS_DIR = "checkpoints"  # OUT/checkpoints/<method>-<calibration>: each run's checkpoint by name
# Sized for a laptop CPU (the README gives the time measured on 2 cores): 12 × 128 calibration
# tokens per run (the embedded calibration split has ~2,500–4,100 Gemma tokens per language) and the
# first 3 windows of 128 tokens of each language's held-out split, scored for perplexity while the
# same forward measures SNR / pruning error. Evaluation dominates: every token is scored against
# Gemma's 262k vocabulary (14 runs × 7 languages). Pass --nsamples / --seqlen for a larger run.
DEMO_NSAMPLES = 12
DEMO_SEQLEN = 128
DEMO_EVAL_SEQLEN = 128
DEMO_EVAL_WINDOWS = 3


@dataclass
class DemoResult:
    out: Path
    report_dir: Path
    findings: list[str]
    exit_code: int
    checkpoints: list[tuple[str, Path]] = field(default_factory=list)  # (method-calibration, its link)
    seconds: float = 0.0
    conversion_seconds: float = 0.0  # the one-time GGUF conversion of the embedded model (0 when cached)


def demo_config(
    langs: list[str], methods: list[str], nsamples: int, seqlen: int, dtype: str, device: str, conventions: str = "prunekit"
) -> dict[str, Any]:
    return ({"conventions": conventions} if conventions != "prunekit" else {}) | {
        "name": "prunekit-demo",
        "models": [{"id": DEMO_MODEL, "dtype": dtype}],
        "methods": methods,
        "sparsities": [0.5],
        "calibration": {"sets": langs, "source": "embedded", "nsamples": nsamples, "seqlen": seqlen, "seeds": [0]},
        "evaluation": {"languages": langs, "perplexity_source": "embedded", "seqlen": DEMO_EVAL_SEQLEN,
                       "max_windows": DEMO_EVAL_WINDOWS, "hidden_states": True},
        "execution": {"device": device},
    }


def run_demo(
    langs: str | None = None,
    methods: str = "wanda,sparsegpt",
    out: str | Path = "prunekit-demo",
    nsamples: int = DEMO_NSAMPLES,
    seqlen: int = DEMO_SEQLEN,
    dtype: str = "auto",
    device: str = "auto",
    progress: bool = True,
    conventions: str = "prunekit",
) -> DemoResult:
    from prunekit.methods import available_methods  # torch: loaded by the command, not by `prunekit --help`
    from prunekit.models import resolve_device
    from prunekit.recipe import check_calibration_size
    from prunekit.report import build_report, diagonal_finding
    from prunekit.sweep import run_sweep

    codes = [lang.code for lang in parse_languages(langs)] if langs else embedded_languages()
    missing = [c for c in codes if c not in embedded_languages()]
    if missing:
        raise ConfigError(f"the demo runs on the embedded texts, which have no '{missing[0]}'; choose from {', '.join(embedded_languages())}")
    if len(codes) < 2:
        raise ConfigError("the demo compares calibration languages: give at least two with --langs, e.g. --langs de,sw")
    method_list = [m.strip() for m in methods.split(",") if m.strip()]
    pruning = available_methods("prune")
    for method in method_list:
        if method not in pruning:
            raise ConfigError(f"unknown pruning method '{method}' in --methods{did_you_mean(method, pruning)}; choose from {', '.join(pruning)}")
    check_calibration_size(nsamples, seqlen)
    resolve_device(device)  # the demo runs here: a missing GPU fails now, not once per run
    out = Path(out).expanduser()
    config = demo_config(codes, method_list, nsamples, seqlen, dtype, device, parse_conventions(conventions))
    started = time.perf_counter()
    conversion = _convert_once()
    summary = run_sweep(config, out / "runs", progress=progress)
    report = build_report(out / "runs", out / "report")
    findings = diagonal_finding(report, "perplexity")
    checkpoints = name_checkpoints(out / "runs", out / CHECKPOINTS_DIR)
    return DemoResult(out, out / "report", findings, summary.exit_code, checkpoints,
                      time.perf_counter() - started, conversion)


def _convert_once() -> float:
    """Seconds spent converting the embedded GGUF into the cache now (0.0 when it was there already)."""
    from prunekit.embedded import embedded_model_path
    from prunekit.models import resolve_model

    if (embedded_model_path(DEMO_MODEL.split(":", 1)[1]) / "config.json").exists():
        return 0.0
    started = time.perf_counter()
    resolve_model(DEMO_MODEL)
    return time.perf_counter() - started


def name_checkpoints(runs_dir: Path, target: Path) -> list[tuple[str, Path]]:
    """Give the last sweep's pruned checkpoints readable names: ``target/<method>-<calibration>`` (``wanda-sw``), a
    relative symbolic link to ``runs/<run hash>/checkpoint``, replaced atomically on a rerun; links that no longer
    lead to a checkpoint are removed. ``target/README.md`` lists the same names and paths (for file systems
    without links). Returns (name, link) in the sweep's order; (name, the checkpoint itself) where no link could
    be made."""
    from prunekit.io import read_versioned, write_text_atomic

    sweep = read_versioned(runs_dir / SWEEP_FILE, SWEEP_KIND)
    target.mkdir(parents=True, exist_ok=True)
    named: list[tuple[str, Path]] = []
    rows = ["# The demo's checkpoints", "", "| name | checkpoint |", "|---|---|"]
    for run_id in sweep.get("runs", []):
        run = read_versioned(runs_dir / "runs" / run_id / RUN_FILE, SWEEP_RUN_KIND)
        checkpoint = runs_dir / "runs" / run_id / "checkpoint"
        if not checkpoint.is_dir():
            continue
        name = f"{run['method']['label']}-{run['calibration']}"
        relative = os.path.relpath(checkpoint, target)
        link = target / name
        staging = target / f".{name}.{os.getpid()}.link"
        try:
            with contextlib.suppress(FileNotFoundError):
                staging.unlink()
            os.symlink(relative, staging, target_is_directory=True)
            os.replace(staging, link)
        except OSError:  # no symbolic links here: the README below maps each name to its path, and so do we
            link = checkpoint
        named.append((name, link))
        rows.append(f"| `{name}` | `{relative}` |")
    for entry in target.iterdir():
        if entry.is_symlink() and not entry.exists():
            entry.unlink()
    write_text_atomic(target / "README.md", "\n".join(rows) + "\n")
    return named
