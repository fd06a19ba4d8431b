"""The first GPU node works the first time: one script that runs every GPU path of prunekit once.

On one H100 (under 8 minutes):
  python benchmarks/gpu_check.py                       # --device cuda: tiny test model + embedded Gemma-3-270M
  python benchmarks/gpu_check.py --task-data DIR       # arc_easy from local files (DIR/arc_easy/{test,...}.jsonl)
On a laptop (the same steps, smaller: the tiny model only, a few samples; tests/test_gpu_node.py runs it):
  python benchmarks/gpu_check.py --device cpu

Steps, per model: prune with Wanda and SparseGPT (bf16, 128 × 2048 calibration tokens on cuda), evaluate
perplexity and SNR against the dense model in two languages (en, sw), run lm-eval (arc_easy --limit 100
on cuda; on the CPU the local XCOPA slice the test suite uses) on the HF backend and, when vllm is
installed, on vLLM; quantize GPTQ w4 (group 128, packed), load it in plain transformers in a fresh
process, and (Gemma, when vllm is installed) in vLLM. A step that cannot run here (vllm missing, task
data not reachable offline) is "skipped" with the reason.

Prints one JSON: per step its status, seconds, peak GPU memory (torch's max_memory_allocated; null on
the CPU) and the memory plan's predicted peak (prunekit.placement.prune_memory_plan, for prune and
quantize steps). Exits 1 if any step failed.

Calibration text: the embedded texts, repeated until they hold the calibration tokens (the node is
offline; this checks memory and time, not quality).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import math
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
LANGS = ("en", "sw")
FRESH_LOAD = (
    "import json, sys, torch\n"
    "from transformers import AutoModelForCausalLM\n"
    "model = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.bfloat16)\n"
    "device = 'cuda' if torch.cuda.is_available() else 'cpu'\n"
    "logits = model.to(device)(torch.tensor([[1, 5, 9, 14, 3]], device=device)).logits\n"
    "print(json.dumps({'finite': bool(torch.isfinite(logits).all()), 'prunekit': 'prunekit' in sys.modules}))\n"
)
VLLM_LOAD = (
    "import json, sys\n"
    "from vllm import LLM, SamplingParams\n"
    "llm = LLM(sys.argv[1], dtype='bfloat16', max_model_len=512, gpu_memory_utilization=0.5)\n"
    "out = llm.generate(['The capital of France is'], SamplingParams(max_tokens=8, temperature=0))\n"
    "print(json.dumps({'text': out[0].outputs[0].text}))\n"
)


class Skip(Exception):
    """A step that cannot run on this machine; recorded with its reason."""


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


class Steps:
    def __init__(self, device: str):
        import torch

        self.cuda = device.startswith("cuda")
        self.torch = torch
        self.steps: list[dict[str, Any]] = []

    def run(self, name: str, fn: Callable[[], Any], predicted: int | None = None) -> Any:
        torch = self.torch
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        entry: dict[str, Any] = {"name": name, "status": "ok", "seconds": None, "peak_gpu_bytes": None,
                                 "predicted_peak_bytes": predicted}
        log(f"gpu_check: {name} ...")
        started = time.perf_counter()
        value = None
        try:
            value = fn()
            if value is not None:
                entry["detail"] = value
        except Skip as skip:
            entry.update(status="skipped", reason=str(skip))
        except Exception as err:  # noqa: BLE001 - every failure is recorded, the next step still runs
            entry.update(status="failed", error=f"{type(err).__name__}: {err}"[:2000])
            log(traceback.format_exc())
        entry["seconds"] = round(time.perf_counter() - started, 3)
        if self.cuda:
            torch.cuda.synchronize()
            entry["peak_gpu_bytes"] = int(torch.cuda.max_memory_allocated())
        log(f"gpu_check: {name}: {entry['status']} in {entry['seconds']} s")
        self.steps.append(entry)
        return value


def tiny_model(directory: Path) -> Path:
    """The test suite's tiny Llama (its BPE tokenizer trained on tests/data), hidden 128 so that every
    Linear packs at group size 128."""
    sys.path.insert(0, str(ROOT))
    from tests.conftest import build_tiny_model, train_tokenizer

    return build_tiny_model("llama", train_tokenizer(), directory, hidden_size=128, intermediate_size=256,
                            num_hidden_layers=2)


def calibration_text(directory: Path, tokens_needed: int) -> Path:
    """{lang}.txt per language: the embedded text repeated until it holds ``tokens_needed`` tokens at any
    tokenizer (2 characters per token is a generous bound)."""
    from prunekit.textsources import load_texts

    directory.mkdir(parents=True, exist_ok=True)
    for lang in LANGS:
        documents = [d.text.strip() for d in load_texts("embedded", lang, "calibration").documents]
        text = "\n\n".join(documents)
        repeats = max(1, math.ceil(2 * tokens_needed / max(1, len(text))))
        (directory / f"{lang}.txt").write_text("\n\n".join([text] * repeats) + "\n", encoding="utf-8")
    return directory


def predicted_peak(spec: str, nsamples: int, seqlen: int, method: str, cuda: bool) -> int | None:
    """The memory plan's prediction of the GPU peak of a layer-by-layer prune (None on the CPU)."""
    if not cuda:
        return None
    import torch
    from transformers import AutoConfig

    from prunekit.models import resolve_model
    from prunekit.placement import ModelShape, prune_memory_plan

    config = AutoConfig.from_pretrained(str(resolve_model(spec).path))
    config = getattr(config, "text_config", None) or config
    free, _ = torch.cuda.mem_get_info()
    return prune_memory_plan(ModelShape.from_config(config, spec), nsamples, seqlen, "bfloat16", method, free).peak


def check_finite(values: dict[str, Any], what: str) -> None:
    bad = {k: v for k, v in values.items() if not isinstance(v, (int, float)) or not math.isfinite(v)}
    if bad:
        raise RuntimeError(f"{what} not finite: {bad}")


def fresh_process(code: str, path: Path, timeout: int = 600) -> dict[str, Any]:
    done = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        raise RuntimeError(f"exit {done.returncode}: {done.stderr.strip().splitlines()[-1:] or ''}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def check_model(steps: Steps, name: str, spec: str, args, work: Path, calib: Path) -> None:
    import prunekit
    from prunekit.evaluation import EvaluationSpec, evaluate
    from prunekit.recipe import Quantization

    common = dict(calibration=prunekit.CalibrationSpec("en", str(calib), args.nsamples, args.seqlen),
                  engine=prunekit.EngineSpec(args.device), progress=False)
    pruned: dict[str, Path] = {}
    for method in ("wanda", "sparsegpt"):
        out = work / f"{name}-{method}"

        def prune(method=method, out=out):
            result = prunekit.prune(spec, method, sparsity=0.5, output=prunekit.OutputSpec(out, "bfloat16", overwrite=True),
                                    **common)
            pruned[method] = out
            return {"sparsity": result.record["sparsity"]["overall"]}

        steps.run(f"prune {name} {method}", prune, predicted_peak(spec, args.nsamples, args.seqlen, method, steps.cuda))

        def perplexity_and_snr(out=out):
            if out not in pruned.values():
                raise Skip("its prune failed")
            res = evaluate(out, EvaluationSpec(langs=LANGS, ppl_source="embedded", seqlen=args.eval_seqlen,
                                               max_windows=args.max_windows, snr_tokens=args.snr_tokens, dtype="bfloat16",
                                               device=args.device), dense=spec, progress=False)
            ppl = {lang: res["perplexity"][lang]["ppl"] for lang in LANGS}
            snr = {lang: res["hidden_states"][lang]["snr_db_finite_layers"] for lang in LANGS}
            check_finite(ppl, "perplexity")
            return {"ppl": ppl, "snr_db": snr}

        steps.run(f"perplexity+snr {name} {method} ({','.join(LANGS)})", perplexity_and_snr)

    for backend in ("hf", "vllm"):
        def tasks(backend=backend):
            if backend == "vllm" and importlib.util.find_spec("vllm") is None:
                raise Skip("vllm is not installed (pip install 'prunekit[vllm]')")
            if "wanda" not in pruned:
                raise Skip("the wanda prune failed")
            res = evaluate(pruned["wanda"], EvaluationSpec(langs=args.task_lang, ppl_source=None, tasks=args.task, limit=args.limit,
                                                           task_data=args.task_data, device=args.device, backend=backend,
                                                           dtype="bfloat16"), progress=False)
            rows = res["tasks"]
            unavailable = {k: v["note"] for k, v in rows.items() if v["status"] != "ok"}
            if unavailable:
                raise Skip(f"task data not available here: {unavailable}")
            return {k: v["metrics"] for k, v in rows.items()}

        steps.run(f"lm-eval {backend} {name} {args.task} --limit {args.limit}", tasks)

    quantized = work / f"{name}-gptq-w4"

    def quantize():
        result = prunekit.prune(spec, "gptq", quantization=Quantization(4, 128),
                                output=prunekit.OutputSpec(quantized, "bfloat16", overwrite=True), **common)
        return {"format": result.record["quantization"]["format"], "packed": result.record["quantization"].get("packed_linears")}

    steps.run(f"quantize {name} gptq w4g128 packed", quantize, predicted_peak(spec, args.nsamples, args.seqlen, "gptq", steps.cuda))

    def load_transformers():
        if not (quantized / "config.json").exists():
            raise Skip("the quantization failed")
        seen = fresh_process(FRESH_LOAD, quantized)
        if not seen["finite"] or seen["prunekit"]:
            raise RuntimeError(f"plain transformers: {seen}")
        return seen

    steps.run(f"load {name} w4 in plain transformers (fresh process)", load_transformers)
    if name != "tiny":  # vLLM's W4A16 kernels want real widths; the tiny model's 64-wide KV projections are not that
        def load_vllm():
            if importlib.util.find_spec("vllm") is None:
                raise Skip("vllm is not installed (pip install 'prunekit[vllm]')")
            if not steps.cuda:
                raise Skip("vLLM runs on a GPU")
            return fresh_process(VLLM_LOAD, quantized)

        steps.run(f"load {name} w4 in vLLM", load_vllm)


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", help="cuda (default; the full check) or cpu (the same steps, smaller)")
    parser.add_argument("--models", default=None, help="tiny,gemma (default: both on cuda, tiny on the CPU)")
    parser.add_argument("--nsamples", type=int, default=None, help="calibration sequences (default: 128 on cuda, 4 on the CPU)")
    parser.add_argument("--seqlen", type=int, default=None, help="tokens per calibration sequence (default: 2048 / 32)")
    parser.add_argument("--task", default=None, help="lm-eval task (default: arc_easy on cuda, xcopa on the CPU)")
    parser.add_argument("--task-data", default=None, help="local task data (default on the CPU: tests/data)")
    parser.add_argument("--limit", type=int, default=None, help="examples per task (default: 100 on cuda, 3 on the CPU)")
    parser.add_argument("--tiny", default=None, help="an already built tiny test model (hidden 128) instead of building one")
    parser.add_argument("--work", default=None, help="directory for the checkpoints (default: a temporary one, removed)")
    args = parser.parse_args(argv)
    cuda = args.device.startswith("cuda")
    args.models = (args.models or ("tiny,gemma" if cuda else "tiny")).split(",")
    args.nsamples = args.nsamples or (128 if cuda else 4)
    args.seqlen = args.seqlen or (2048 if cuda else 32)
    args.task = args.task or ("arc_easy" if cuda else "xcopa")
    args.task_lang = "en" if args.task == "arc_easy" else "sw"
    if args.task_data is None and not cuda:
        args.task_data = str(ROOT / "tests" / "data")
    args.limit = args.limit or (100 if cuda else 3)
    args.eval_seqlen = 512 if cuda else 32
    args.max_windows = 16 if cuda else 2
    args.snr_tokens = 2048 if cuda else 32
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    import torch

    import prunekit

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print(json.dumps({"ok": False, "error": "no CUDA device is visible; run with --device cpu"}))
        return 1
    steps = Steps(args.device)
    models = {"tiny": None, "gemma": "embedded:gemma-3-270m"}
    unknown = [m for m in args.models if m not in models]
    if unknown:
        print(json.dumps({"ok": False, "error": f"unknown model(s) {unknown}: use tiny, gemma"}))
        return 1
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="prunekit-gpu-check-") as tmp, contextlib.redirect_stdout(sys.stderr):  # stdout: the JSON only
        work = Path(args.work) if args.work else Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        calib = steps.run("calibration text", lambda: str(calibration_text(work / "calib", args.nsamples * args.seqlen)))
        for name in args.models:
            spec = models[name]
            if spec is None:
                spec = args.tiny or steps.run("build the tiny test model", lambda: str(tiny_model(work / "tiny")))
            if spec is not None and calib is not None:
                check_model(steps, name, spec, args, work, Path(calib))
    report = {
        "ok": all(s["status"] != "failed" for s in steps.steps),
        "device": args.device,
        "gpu": torch.cuda.get_device_name() if steps.cuda else None,
        "versions": {"prunekit": prunekit.__version__, "torch": torch.__version__},
        "settings": {k: v for k, v in vars(args).items() if k != "work"},
        "total_seconds": round(time.perf_counter() - started, 1),
        "steps": steps.steps,
    }
    print(json.dumps(report, indent=2, default=str))
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
