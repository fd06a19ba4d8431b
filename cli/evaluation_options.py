"""The options of ``prunekit eval`` that make its :class:`~prunekit.evaluation.spec.EvaluationSpec`, declared once.

A command decorated with :func:`evaluation_options` declares only its other options; these are added to
its signature after them and reach it as one ``EvaluationSpec`` (made, and so validated, here) in its
first parameter. Each option has the spec field's name (``--include-bos`` is ``include_bos``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import typer

from prunekit.cli.spec_options import spec_options

from prunekit.conventions import HELP as CONVENTIONS_HELP

OPTIONS: dict[str, tuple[Any, Any]] = {
    "langs": (Optional[str], typer.Option(None, "--langs", "-l", help="Evaluation languages, comma-separated (ar,de,en,es,ru,sw,zh) or 'all' (the study's seven). Default: the study's seven plus the checkpoint's calibration languages.")),
    "ppl_source": (str, typer.Option("embedded", "--ppl-source", help="Held-out text: embedded, mc4 (validation split, streamed) or a PATH (file, or dir with {lang}.txt/.jsonl/.parquet); 'none' skips perplexity and SNR.")),
    "tasks": (Optional[str], typer.Option(None, "--tasks", "-t", help="Downstream tasks, comma-separated: groups arc, hellaswag, mmlu, belebele, mkqa, xcopa, mgsm (or 'study'), or task names such as belebele_deu_Latn.")),
    "limit": (Optional[float], typer.Option(None, "--limit", help="At most N examples per task (a fraction if < 1); for quick checks only.")),
    "seqlen": (int, typer.Option(2048, "--seqlen", help="Tokens per perplexity window (BOS included; with --conventions study the last partial window is dropped).")),
    "dtype": (str, typer.Option("auto", "--dtype", help="auto (each checkpoint's own dtype), float32, bfloat16 or float16 (checkpoint and dense model alike).")),
    "device": (str, typer.Option("auto", "--device", help="auto, cpu or cuda[:i].")),
    "batch_size": (int, typer.Option(4, "--batch-size", help="Windows per forward pass for perplexity / SNR (and lm-eval's batch size on the CPU).")),
    "task_batch_size": (Optional[str], typer.Option(None, "--task-batch-size", help="lm-eval's batch size: N, auto or auto:N (default: auto on a GPU, --batch-size on the CPU).")),
    "backend": (str, typer.Option("hf", "--backend", help="lm-eval model for --tasks: hf (transformers) or vllm (needs vllm installed; GPU nodes).")),
    "parallelize": (bool, typer.Option(False, "--parallelize/--no-parallelize", help="Spread the task model over every GPU this process sees (CUDA_VISIBLE_DEVICES): hf: lm-eval's device_map=auto; vllm: tensor parallelism (the GPU count must divide the attention heads). Default: off, one GPU.")),
    "gpu_memory_utilization": (Optional[float], typer.Option(None, "--gpu-memory-utilization", help="--backend vllm: fraction of the GPU's memory vLLM may take (vLLM's default 0.9); lower it when something else shares the GPU.")),
    "max_model_len": (Optional[int], typer.Option(None, "--max-model-len", help="--backend vllm: longest sequence vLLM plans its KV cache for (default: the model's); lower it when vLLM says the KV cache does not fit.")),
    "model_args": (Optional[str], typer.Option(None, "--model-args", help="Extra keyword arguments of lm-eval's model (HFLM or vLLM), key=value,key=value, e.g. enforce_eager=true,swap_space=8; they win over prunekit's.")),
    "snr_tokens": (int, typer.Option(4096, "--snr-tokens", help="Token positions per language for SNR / pruning error (the dense states of these are cached).")),
    "include_bos": (bool, typer.Option(False, "--include-bos", help="Count the BOS position in SNR / pruning error (excluded by default: its massive activation dominates).")),
    "max_windows": (Optional[int], typer.Option(None, "--max-windows", help="At most N perplexity windows per language (default: all the text; mc4: 256).")),
    "task_data": (Optional[Path], typer.Option(None, "--task-data", help="Directory of local task data (offline): xcopa/{lang}/test.jsonl, mgsm/mgsm_{lang}.tsv, mkqa/mkqa.jsonl.gz, or {task}.jsonl for lm-eval tasks.")),
    "chat_template": (Optional[bool], typer.Option(None, "--chat-template/--no-chat-template", help="Wrap task prompts in the tokenizer's chat template (default: when the tokenizer has one, as the study did).")),
    "num_fewshot": (int, typer.Option(0, "--num-fewshot", help="Few-shot examples per task (the study: 0).")),
    "bootstrap_iters": (int, typer.Option(100, "--bootstrap-iters", help="lm-eval bootstrap iterations for stderr (mean metrics use the closed form whenever > 0).")),
    "trust_remote_code": (bool, typer.Option(False, "--trust-remote-code", help="Allow model code from the Hub (off by default).")),
    "conventions": (str, typer.Option("prunekit", "--conventions", help=CONVENTIONS_HELP)),
}


def _evaluation_spec() -> type:
    from prunekit.evaluation.spec import EvaluationSpec

    return EvaluationSpec


# Add the options to a command, after its argument (CHECKPOINT); its first parameter receives them as an
# ``EvaluationSpec``.
evaluation_options = spec_options(OPTIONS, _evaluation_spec, "evaluation", lambda own: 1)
