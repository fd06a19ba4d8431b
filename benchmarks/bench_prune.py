"""prunekit against llm-compressor: whole-process time, peak RSS, per-layer error, perplexity, matmul bound.

Each tool runs in its own subprocess with its own venv python, alone, on the same model dir and the
same calibration token tensor (a .safetensors file both read). Whole-process time runs from the
moment the parent spawns the worker to the moment pruning has finished (imports, model load,
pruning; not the writing of the pruned weights that the evaluation reads back). Peak RSS is the
worker's VmHWM at that moment (benchmarks/_rss.py: not ru_maxrss, which Linux carries across exec
from the parent); "RSS+save" is its VmHWM after that write. Quality is measured afterwards, identically for both, by one evaluation subprocess.

Example (a few minutes):
  python benchmarks/bench_prune.py --models gemma --methods wanda --patterns unstructured --dtypes float32
Full matrix (~1 h on 2 cores):
  python benchmarks/bench_prune.py

See benchmarks/README.md for the peer's venv.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
PATTERNS = {"unstructured": (0.5, 0, 0), "2:4": (0.5, 2, 4)}
LANGUAGES = ["ar", "de", "en", "es", "ru", "sw", "zh"]
# A random "wide" Llama: few layers, large matrices (GEMM-bound, large SparseGPT solves).
WIDE_LLAMA = dict(
    hidden_size=2048, intermediate_size=5632, num_hidden_layers=2, num_attention_heads=16,
    num_key_value_heads=4, vocab_size=32000, max_position_embeddings=4096, tie_word_embeddings=False,
    bos_token_id=1, eos_token_id=2, pad_token_id=0,
)


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def load_average() -> float:
    return os.getloadavg()[0]


def busy_cpu_seconds() -> float:
    """CPU seconds all processes of the machine have used since boot (/proc/stat)."""
    fields = open("/proc/stat").readline().split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(v) for v in fields[:8])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def run_child(argv: list[str], log_path: Path, env: dict[str, str] | None = None) -> tuple[float, float, int, float]:
    """Run one child alone; return (spawn wall-clock time, its wall seconds, its peak RSS in bytes, its CPU seconds)."""
    global FOREIGN_CPU
    with open(log_path, "w") as log_file:
        busy = busy_cpu_seconds()
        spawn = time.time()
        process = subprocess.Popen(argv, stdout=log_file, stderr=subprocess.STDOUT, env=env)
        _, status, usage = os.wait4(process.pid, 0)
        process.returncode = os.waitstatus_to_exitcode(status)
        wall = time.time() - spawn
        # CPU time other processes took while the child ran: > a few % of the wall time = noisy numbers
        FOREIGN_CPU = max(0.0, busy_cpu_seconds() - busy - usage.ru_utime - usage.ru_stime)
    if process.returncode != 0:
        tail = log_path.read_text(errors="replace")[-3000:]
        raise RuntimeError(f"{argv[1]} failed (exit {process.returncode}); log {log_path}:\n{tail}")
    return spawn, wall, usage.ru_maxrss * 1024, usage.ru_utime + usage.ru_stime


def prepare_models(names: list[str], work: Path) -> dict[str, dict]:
    import torch
    from safetensors.torch import save_file

    from prunekit.calibration import build_calibration_set
    from prunekit.models import load_tokenizer, resolve_model

    gemma = resolve_model("embedded:gemma-3-270m")
    tokenizer = load_tokenizer(gemma)
    models = {}
    calib = None

    def calibration() -> torch.Tensor:
        nonlocal calib
        if calib is None:
            calib = build_calibration_set(tokenizer, "all", "embedded", ARGS.nsamples, ARGS.seqlen, ARGS.seed).input_ids
        return calib

    for name in names:
        if name == "gemma":
            path = gemma.path
            ids = calibration()
            languages = LANGUAGES
        elif name == "llama":
            path = work / "wide-llama"
            if not (path / "model.safetensors").exists():  # written whole or not at all
                from transformers import LlamaConfig, LlamaForCausalLM

                torch.manual_seed(0)
                model = LlamaForCausalLM(LlamaConfig(**WIDE_LLAMA))
                staging = work / "wide-llama.partial"
                shutil.rmtree(staging, ignore_errors=True)
                model.save_pretrained(staging)
                tokenizer.save_pretrained(staging)  # the peer loads a processor; ids are given directly
                del model
                shutil.rmtree(path, ignore_errors=True)
                os.replace(staging, path)
            ids = calibration() % WIDE_LLAMA["vocab_size"]
            languages = []  # perplexity of a random model means nothing
        else:
            raise SystemExit(f"unknown model '{name}' (choose gemma, llama)")
        calib_file = work / f"calib-{name}-{ARGS.nsamples}x{ARGS.seqlen}.safetensors"
        save_file({"input_ids": ids.contiguous()}, str(calib_file))
        models[name] = {"path": str(path), "calib_file": str(calib_file), "languages": languages}
    return models


def keep_weights(path: str) -> str:
    """Move a run's pruned weights aside so that a repeat does not overwrite them."""
    kept = path.replace(".safetensors", ".best.safetensors")
    os.replace(path, kept)
    return kept


def write_spec(work: Path, stem: str, spec: dict) -> Path:
    path = work / f"{stem}.spec.json"
    path.write_text(json.dumps(spec))
    return path


def run_tool(tool: str, model: str, info: dict, dtype: str, method: str, pattern: str, work: Path) -> dict:
    sparsity, n, m = PATTERNS[pattern]
    stem = f"{tool}-{model}-{dtype}-{method}-{pattern.replace(':', 'of')}"
    spec = {
        "model_dir": info["path"], "dtype": dtype, "method": method, "sparsity": sparsity, "n": n, "m": m,
        "calib_file": info["calib_file"], "out_weights": str(work / f"{stem}.safetensors"),
        "out_json": str(work / f"{stem}.result.json"),
        "batch_size": ARGS.batch_size if tool == "prunekit" else ARGS.peer_batch_size,
        "solve_threads": ARGS.solve_threads,
    }
    python = ARGS.prunekit_python if tool == "prunekit" else ARGS.peer_python
    worker = HERE / ("_prunekit_worker.py" if tool == "prunekit" else "_llmc_worker.py")
    load = load_average()
    log(f"[{time.strftime('%H:%M:%S')}] {stem} (load {load:.2f}) ...")
    spawn, wall, rss_total, cpu = run_child([python, str(worker), str(write_spec(work, stem, spec))], work / f"{stem}.log")
    result = json.loads(Path(spec["out_json"]).read_text())
    result.update(
        weights=spec["out_weights"], load_before=load, load_after=load_average(), wall_with_save=wall, cpu_with_save=cpu,
        peak_rss_total=result.get("peak_rss_with_save", rss_total), whole_seconds=result["t_pruned"] - spawn, foreign_cpu=FOREIGN_CPU,
        startup_seconds=result["t_imports"] - spawn, load_seconds=result["t_loaded"] - result["t_imports"],
        prune_seconds=result["t_pruned"] - result["t_loaded"],
    )
    log(f"    whole {result['whole_seconds']:.1f} s (prune {result['prune_seconds']:.1f} s, CPU {cpu:.1f} s incl. save), "
        f"peak RSS {result['peak_rss_at_pruned'] / 1e9:.2f} GB; other processes used {FOREIGN_CPU:.1f} CPU s meanwhile")
    return result


def measure(command: str, spec: dict, work: Path, stem: str) -> dict:
    out = work / f"{stem}.json"
    run_child([ARGS.prunekit_python, str(HERE / "_measure.py"), command, str(write_spec(work, stem, spec)), str(out)],
              work / f"{stem}.log")
    return json.loads(out.read_text())


def prunekit_batch(seqlen: int) -> int:
    from prunekit.engine import CPU_BATCH_TOKENS

    return min(ARGS.nsamples, ARGS.batch_size or max(1, CPU_BATCH_TOKENS // seqlen))


def fmt_ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.3f}" if a is not None and b else "n/a"


def report(results: list[dict]) -> None:
    print()
    print("=" * 100)
    print(f"prunekit vs llm-compressor — {ARGS.nsamples} × {ARGS.seqlen} calibration tokens, "
          f"{os.cpu_count()} CPU cores")
    for r in results:
        p, q = r["prunekit"], r.get("llm-compressor")
        print("-" * 100)
        print(f"{r['model']}  {r['dtype']}  {r['method']}  {r['pattern']}")
        bound = r["bound"]
        print(f"  matmul bound: {bound['bound_seconds']:.1f} s  ({bound['flops'] / 1e12:.2f} TFLOP for 2 passes at "
              f"{bound['gflops']:.0f} GFLOP/s measured on the model's shapes)")
        if bound["native_bound_seconds"] != bound["bound_seconds"]:
            print(f"  (with native {r['dtype']} GEMMs at {bound['native_gflops']:.0f} GFLOP/s: {bound['native_bound_seconds']:.1f} s;"
                  " the bound above uses fp32 GEMMs on bf16 operands, faster on this CPU)")
        header = (f"  {'':16}{'whole s':>9}{'startup':>9}{'load':>8}{'prune':>8}{'CPU s*':>8}{'RSS GB':>8}{'RSS+save':>9}"
                  f"{'layer err':>11}{'ppl(gmean)':>11}{'others':>8}")
        print(header)
        for name, x in (("prunekit", p), ("llm-compressor", q)):
            if x is None:
                continue
            ppl = x.get("ppl_gmean")
            print(f"  {name:16}{x['whole_seconds']:9.1f}{x['startup_seconds']:9.1f}{x['load_seconds']:8.1f}"
                  f"{x['prune_seconds']:8.1f}{x['cpu_with_save']:8.1f}{x['peak_rss_at_pruned'] / 1e9:8.2f}{x['peak_rss_total'] / 1e9:9.2f}"
                  + (f"{x['mean_layer_error']:11.5f}" if "mean_layer_error" in x else f"{'n/a':>11}")
                  + (f"{ppl:11.3f}" if ppl else f"{'n/a':>11}")
                  + f"{x['foreign_cpu']:8.1f}")
        print("  (* CPU s: user+sys of the whole process including the write of the pruned weights;"
              " others: CPU s other processes used during the run — keep it near 0)")
        if p.get("perplexity"):
            langs = sorted(p["perplexity"])
            print("  perplexity      " + "".join(f"{lang:>9}" for lang in langs))
            for name, x in (("dense", r.get("dense")), ("prunekit", p), ("llm-compressor", q)):
                if x and x.get("perplexity"):
                    print(f"  {name:16}" + "".join(f"{x['perplexity'][lang]:9.2f}" for lang in langs))
        if q is not None and p.get("layer_errors") and q.get("layer_errors"):
            per_layer = [a / b if b else float("nan") for a, b in zip(p["layer_errors"], q["layer_errors"])]
            print("  per-layer error prunekit/peer: " + " ".join(f"{v:.3f}" for v in per_layer))
        print("  RATIOS:")
        if q is not None:
            print(f"    time prunekit/llm-compressor (whole process) = {fmt_ratio(p['whole_seconds'], q['whole_seconds'])}")
            print(f"    time prunekit/llm-compressor (pruning only)  = {fmt_ratio(p['prune_seconds'], q['prune_seconds'])}")
            print(f"    CPU time prunekit/llm-compressor             = {fmt_ratio(p['cpu_with_save'], q['cpu_with_save'])}")
            print(f"    peak RSS prunekit/llm-compressor             = {fmt_ratio(p['peak_rss_at_pruned'], q['peak_rss_at_pruned'])}")
            if p.get("layer_errors") and q.get("layer_errors"):
                print(f"    mean layer error prunekit/llm-compressor     = {fmt_ratio(p['mean_layer_error'], q['mean_layer_error'])}"
                      f"  (worst layer {max(per_layer):.3f})")
            if p.get("ppl_gmean") and q.get("ppl_gmean"):
                print(f"    perplexity (gmean) prunekit/llm-compressor   = {fmt_ratio(p['ppl_gmean'], q['ppl_gmean'])}")
        print(f"    prunekit pruning time / matmul bound          = {fmt_ratio(p['prune_seconds'], bound['bound_seconds'])}")
        if q is not None:
            print(f"    llm-compressor pruning time / matmul bound    = {fmt_ratio(q['prune_seconds'], bound['bound_seconds'])}")


def main() -> None:
    global ARGS
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="gemma,llama", help="comma list: gemma (embedded Gemma-3-270M), llama (random wide Llama)")
    parser.add_argument("--methods", default="wanda,sparsegpt")
    parser.add_argument("--patterns", default="unstructured,2:4")
    parser.add_argument("--dtypes", default="float32,bfloat16", help="compute dtype (statistics are fp32 in both tools)")
    parser.add_argument("--nsamples", type=int, default=32)
    parser.add_argument("--seqlen", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--peer-python", default="/work/venv-llmc/bin/python", help="python of the llm-compressor venv")
    parser.add_argument("--prunekit-python", default=sys.executable)
    parser.add_argument("--skip-peer", action="store_true", help="run prunekit only")
    parser.add_argument("--batch-size", type=int, default=None, help="prunekit sequences per batch (default: its own)")
    parser.add_argument("--solve-threads", type=int, default=None, help="prunekit SparseGPT solve threads (default: all cores, the widest Hessians factorised on a second thread; 1 = one thread)")
    parser.add_argument("--peer-batch-size", type=int, default=1, help="llm-compressor calibration batch size (its default: 1)")
    parser.add_argument("--eval-windows", type=int, default=4, help="perplexity windows per language")
    parser.add_argument("--error-samples", type=int, default=8, help="calibration samples for the per-layer error")
    parser.add_argument("--skip-eval", action="store_true", help="time and memory only")
    parser.add_argument("--repeat", type=int, default=1, help="runs per tool, alternating; the fastest of each is kept")
    parser.add_argument("--work-dir", default=None, help="scratch dir (default: $PRUNEKIT_CACHE/bench)")
    parser.add_argument("--json", default=None, help="also write all numbers to this JSON file")
    ARGS = parser.parse_args()

    from prunekit.io import cache_dir

    work = Path(ARGS.work_dir) if ARGS.work_dir else cache_dir("bench")
    work.mkdir(parents=True, exist_ok=True)
    models = prepare_models(ARGS.models.split(","), work)
    results = []
    for model, info in models.items():
        for dtype in ARGS.dtypes.split(","):
            batch = prunekit_batch(ARGS.seqlen)
            bound = measure("bound", {"model_dir": info["path"], "dtype": dtype, "nsamples": ARGS.nsamples,
                                      "seqlen": ARGS.seqlen, "batch": batch}, work, f"bound-{model}-{dtype}")
            group = []
            for method in ARGS.methods.split(","):
                for pattern in ARGS.patterns.split(","):
                    entry = {"model": model, "dtype": dtype, "method": method, "pattern": pattern, "bound": bound}
                    tools = ["prunekit"] + ([] if ARGS.skip_peer else ["llm-compressor"])
                    for _ in range(ARGS.repeat):  # alternate the tools; keep each one's fastest run
                        for tool in tools:
                            result = run_tool(tool, model, info, dtype, method, pattern, work)
                            if tool not in entry or result["whole_seconds"] < entry[tool]["whole_seconds"]:
                                entry[tool] = result
                                entry[tool]["weights_kept"] = keep_weights(result["weights"])
                    for tool in tools:
                        entry[tool]["weights"] = entry[tool].pop("weights_kept")
                    group.append(entry)
            if not ARGS.skip_eval:
                variants = {"dense": None}
                for entry in group:
                    for tool in ("prunekit", "llm-compressor"):
                        if tool in entry:
                            variants[f"{tool}/{entry['method']}/{entry['pattern']}"] = entry[tool]["weights"]
                log(f"[{time.strftime('%H:%M:%S')}] evaluating {len(variants)} variants of {model} {dtype} ...")
                evaluation = measure("evaluate", {
                    "model_dir": info["path"], "dtype": dtype, "calib_file": info["calib_file"], "variants": variants,
                    "languages": info["languages"], "seqlen": ARGS.seqlen, "eval_windows": ARGS.eval_windows,
                    "error_samples": ARGS.error_samples}, work, f"eval-{model}-{dtype}")
                for entry in group:
                    entry["dense"] = evaluation["dense"]
                    for tool in ("prunekit", "llm-compressor"):
                        if tool in entry:
                            ev = evaluation[f"{tool}/{entry['method']}/{entry['pattern']}"]
                            entry[tool].update(ev)
                            entry[tool]["mean_layer_error"] = sum(ev["layer_errors"]) / len(ev["layer_errors"])
                            ppl = list(ev["perplexity"].values())
                            if ppl:
                                import math

                                entry[tool]["ppl_gmean"] = math.exp(sum(math.log(v) for v in ppl) / len(ppl))
            results.extend(group)
    report(results)
    if ARGS.json:
        Path(ARGS.json).write_text(json.dumps(results, indent=1))


ARGS: argparse.Namespace
FOREIGN_CPU = 0.0

if __name__ == "__main__":
    main()
