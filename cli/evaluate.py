"""``prunekit eval``."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Optional

import typer
from rich.console import Console
from rich.table import Table

from prunekit.cli.app import app, user_errors
from prunekit.conventions import HELP as CONVENTIONS_HELP
from prunekit.conventions import parse_conventions

stdout = Console()


def _fmt(value: Any, spec: str = ".4f") -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and math.isinf(value):
        return "+inf" if value > 0 else "-inf"
    return format(value, spec)


def print_results(results: dict[str, Any], out: Path | None) -> None:
    """Per-language perplexity / SNR / PE table and the task table."""
    model = results["model"]["spec"]
    if results["perplexity"]:
        table = Table(title=f"{model} · perplexity" + (" and hidden-state error vs " + results["dense"]["spec"] if results["dense"] else ""))
        for column in ("lang", "PPL", "tokens", "windows"):
            table.add_column(column, justify="right")
        if results["hidden_states"]:
            for column in ("SNR dB", "PE ×10⁶", "SNR tokens"):
                table.add_column(column, justify="right")
        for lang in results["languages"]:
            ppl = results["perplexity"].get(lang)
            if ppl is None:
                continue
            row = [lang, _fmt(ppl["ppl"], ".3f"), str(ppl["tokens"]), str(ppl["windows"])]
            hidden = results["hidden_states"].get(lang)
            if hidden is not None:
                row += [_fmt(hidden["snr_db"], ".2f"), _fmt(hidden["pruning_error"] * 1e6, ".2f"), str(hidden["tokens"])]
            table.add_row(*row)
        stdout.print(table)
    if results["tasks"]:
        table = Table(title=f"{model} · downstream tasks")
        for column in ("task", "group", "lang", "status", "metrics (± stderr)", "samples / note"):
            table.add_column(column)
        for name, cell in results["tasks"].items():
            metrics = ", ".join(
                f"{metric} {_fmt(value)}" + (f" ± {_fmt(cell['stderr'][metric])}" if cell["stderr"].get(metric) is not None else "")
                for metric, value in cell["metrics"].items()
            )
            tail = str(cell["samples"]) if cell["status"] == "ok" else (cell["note"] or "")
            table.add_row(name, cell["group"], cell["language"] or "-", cell["status"], metrics or "-", tail)
        stdout.print(table)
    if out is not None:
        stdout.print(f"results written to [bold]{out}[/bold]")


def _limit(value: Optional[float]) -> int | float | None:
    if value is None:
        return None
    return int(value) if value >= 1 and float(value).is_integer() else value


@app.command("eval")
@user_errors
def evaluate_command(
    checkpoint: str = typer.Argument(..., help="Checkpoint to evaluate: a local dir (e.g. from `prunekit prune`), Hub id, .gguf file or embedded:gemma-3-270m."),
    dense: Optional[str] = typer.Option(None, "--dense", help="The dense model CHECKPOINT was pruned from: enables SNR / pruning error of hidden states (cached per dense model)."),
    langs: Optional[str] = typer.Option(None, "--langs", "-l", help="Evaluation languages, comma-separated (ar,de,en,es,ru,sw,zh) or 'all' (the study's seven). Default: the study's seven plus the checkpoint's calibration languages."),
    ppl_source: str = typer.Option("embedded", "--ppl-source", help="Held-out text: embedded, mc4 (validation split, streamed) or a PATH (file, or dir with {lang}.txt/.jsonl/.parquet); 'none' skips perplexity and SNR."),
    tasks: Optional[str] = typer.Option(None, "--tasks", "-t", help="Downstream tasks, comma-separated: groups arc, hellaswag, mmlu, belebele, mkqa, xcopa, mgsm (or 'study'), or task names such as belebele_deu_Latn."),
    limit: Optional[float] = typer.Option(None, "--limit", help="At most N examples per task (a fraction if < 1); for quick checks only."),
    seqlen: int = typer.Option(2048, "--seqlen", help="Tokens per perplexity window (BOS included; with --conventions study the last partial window is dropped)."),
    dtype: str = typer.Option("auto", "--dtype", help="auto (each checkpoint's own dtype), float32, bfloat16 or float16 (checkpoint and dense model alike)."),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda[:i]."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Write the results JSON here (written atomically; schema in prunekit/evaluation/SCHEMA.md)."),
    batch_size: int = typer.Option(4, "--batch-size", help="Windows per forward pass for perplexity / SNR (and lm-eval's batch size on the CPU)."),
    task_batch_size: Optional[str] = typer.Option(None, "--task-batch-size", help="lm-eval's batch size: N, auto or auto:N (default: auto on a GPU, --batch-size on the CPU)."),
    backend: str = typer.Option("hf", "--backend", help="lm-eval model for --tasks: hf (transformers) or vllm (needs vllm installed; GPU nodes)."),
    parallelize: bool = typer.Option(False, "--parallelize/--no-parallelize", help="Spread the task model over every GPU this process sees (CUDA_VISIBLE_DEVICES): hf: lm-eval's device_map=auto; vllm: tensor parallelism (the GPU count must divide the attention heads). Default: off, one GPU."),
    gpu_memory_utilization: Optional[float] = typer.Option(None, "--gpu-memory-utilization", help="--backend vllm: fraction of the GPU's memory vLLM may take (vLLM's default 0.9); lower it when something else shares the GPU."),
    max_model_len: Optional[int] = typer.Option(None, "--max-model-len", help="--backend vllm: longest sequence vLLM plans its KV cache for (default: the model's); lower it when vLLM says the KV cache does not fit."),
    model_args: Optional[str] = typer.Option(None, "--model-args", help="Extra keyword arguments of lm-eval's model (HFLM or vLLM), key=value,key=value, e.g. enforce_eager=true,swap_space=8; they win over prunekit's."),
    snr_tokens: int = typer.Option(4096, "--snr-tokens", help="Token positions per language for SNR / pruning error (the dense states of these are cached)."),
    include_bos: bool = typer.Option(False, "--include-bos", help="Count the BOS position in SNR / pruning error (excluded by default: its massive activation dominates)."),
    max_windows: Optional[int] = typer.Option(None, "--max-windows", help="At most N perplexity windows per language (default: all the text; mc4: 256)."),
    task_data: Optional[Path] = typer.Option(None, "--task-data", help="Directory of local task data (offline): xcopa/{lang}/test.jsonl, mgsm/mgsm_{lang}.tsv, mkqa/mkqa.jsonl.gz, or {task}.jsonl for lm-eval tasks."),
    chat_template: Optional[bool] = typer.Option(None, "--chat-template/--no-chat-template", help="Wrap task prompts in the tokenizer's chat template (default: when the tokenizer has one, as the study did)."),
    num_fewshot: int = typer.Option(0, "--num-fewshot", help="Few-shot examples per task (the study: 0)."),
    bootstrap_iters: int = typer.Option(100, "--bootstrap-iters", help="lm-eval bootstrap iterations for stderr (mean metrics use the closed form whenever > 0)."),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code", help="Allow model code from the Hub (off by default)."),
    conventions: str = typer.Option("prunekit", "--conventions", help=CONVENTIONS_HELP),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars or tables."),
    force: bool = typer.Option(False, "--force", help="Run --tasks even when the memory check says the whole model will not fit in host or GPU memory (PRUNEKIT_FORCE=1 does the same for every command and sweep)."),
) -> None:
    """Evaluate CHECKPOINT per language: perplexity, SNR / pruning error against --dense, lm-eval tasks.

    Example: prunekit eval gemma-sw --dense embedded:gemma-3-270m --langs sw,en --ppl-source embedded --tasks belebele,xcopa --task-data data/ --limit 50 --out results.json

    Shortest: prunekit eval gemma-sw --out results.json (the study's seven languages plus gemma-sw's calibration languages)
    """
    from prunekit.evaluation import evaluate
    from prunekit.io import check_output_location

    check_output_location(out, kind="file")  # before the model loads
    conventions = parse_conventions(conventions)  # a typo fails before anything is read or printed
    if langs is None:
        from prunekit.languages import default_evaluation_languages
        from prunekit.models import resolve_model
        from prunekit.artifacts import read_record

        codes, note = default_evaluation_languages(read_record(resolve_model(checkpoint).path))
        langs = ",".join(codes)
        typer.echo(note, err=True)

    from prunekit.models import check_task_memory, memory_check_forced

    with memory_check_forced(force):
        if tasks:  # lm-eval holds the whole model: refuse now what cannot fit, not after perplexity
            check_task_memory(checkpoint, dtype, device, backend, parallelize)
        results = evaluate(
            checkpoint, dense=dense, langs=langs, ppl_source=None if ppl_source == "none" else ppl_source,
            tasks=tasks, limit=_limit(limit), seqlen=seqlen, dtype=dtype, device=device, out=out, progress=not quiet,
            task_data=task_data, chat_template=chat_template, batch_size=batch_size, snr_tokens=snr_tokens,
            exclude_bos=not include_bos, max_windows=max_windows, num_fewshot=num_fewshot,
            task_batch_size=task_batch_size, backend=backend, parallelize=parallelize,
            gpu_memory_utilization=gpu_memory_utilization, max_model_len=max_model_len, model_args=model_args,
            bootstrap_iters=bootstrap_iters, trust_remote_code=trust_remote_code, conventions=conventions,
        )
    if not quiet:
        print_results(results, out)
