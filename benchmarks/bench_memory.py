"""Peak host memory of pruning (and evaluating) a model far larger than a layer: layer streaming against
the in-memory path, on synthetic Llama-3-8B-shaped bf16 checkpoints (issue 16 §6).

The checkpoints are generated one shard at a time (hidden 4096, FFN 14336, 32 heads, 8 KV heads, vocab
128256, random weights, bf16, 2 GB shards with an index, as the Hub's are) with 4 and 8 decoder layers
(3.9 and 5.6 GB) and a small byte-level BPE tokenizer trained on prunekit's embedded texts. Each run is its
own subprocess, alone: peak RSS is that worker's VmHWM (benchmarks/_rss.py), wall time runs from spawn to
exit (imports, skeleton or load, calibration, pruning, writing). Each output is then checked: every tensor
keeps the base's dtype and shape, non-Linear tensors are bit-identical, total size against the base's.

usage (about 30 min on 2 cores; needs ~12 GB of disk under --root and ~6 GB of RAM for the in-memory run):
  python benchmarks/bench_memory.py                       # streamed at 4 and 8 layers, in-memory at 4, eval of 8
  python benchmarks/bench_memory.py --depths 4 --methods wanda --no-eval
  python benchmarks/bench_memory.py --one-run-sweep /work/ckpts/llama8b-4L /work/ckpts/llama8b-8L --eval-langs en,de,sw
                                                          # a one-run sweep at each depth, then a 3-language eval
The synthetic checkpoints and outputs are deleted at the end unless --keep.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
LLAMA3_8B = dict(
    hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
    max_position_embeddings=8192, rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=False,
    bos_token_id=1, eos_token_id=2, pad_token_id=0,
)
SHARD_BYTES = 2 * 10**9


# ------------------------------------------------------------------------------------ checkpoint

def _tokenizer(out: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    texts = []
    for file in sorted((HERE.parent / "prunekit" / "embedded" / "texts").glob("*.txt")):
        texts.extend(file.read_text(encoding="utf-8").splitlines())
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=4096, special_tokens=["<pad>", "<bos>", "<eos>", "<unk>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                            unk_token="<unk>").save_pretrained(out)


def generate(out: Path, layers: int, seed: int = 0) -> Path:
    """A synthetic Llama-3-8B-shaped bf16 checkpoint, written one shard at a time (never more than one
    shard of tensors in memory)."""
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    if (out / "model.safetensors.index.json").exists():  # generated before (--keep)
        return out
    out.mkdir(parents=True, exist_ok=True)
    config = LlamaConfig(**LLAMA3_8B, num_hidden_layers=layers, dtype="bfloat16")
    config.save_pretrained(out)
    _tokenizer(out)
    d, f = config.hidden_size, config.intermediate_size
    kv = config.num_key_value_heads * d // config.num_attention_heads
    shapes: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (config.vocab_size, d))]
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes += [(p + "self_attn.q_proj.weight", (d, d)), (p + "self_attn.k_proj.weight", (kv, d)),
                   (p + "self_attn.v_proj.weight", (kv, d)), (p + "self_attn.o_proj.weight", (d, d)),
                   (p + "mlp.gate_proj.weight", (f, d)), (p + "mlp.up_proj.weight", (f, d)),
                   (p + "mlp.down_proj.weight", (d, f)), (p + "input_layernorm.weight", (d,)),
                   (p + "post_attention_layernorm.weight", (d,))]
    shapes += [("model.norm.weight", (d,)), ("lm_head.weight", (config.vocab_size, d))]
    shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    for name, shape in shapes:
        nbytes = 2 * int(torch.tensor(shape).prod())
        if shards[-1] and size + nbytes > SHARD_BYTES:
            shards.append([])
            size = 0
        shards[-1].append((name, shape))
        size += nbytes
    generator = torch.Generator().manual_seed(seed)
    weight_map, total = {}, 0
    for k, members in enumerate(shards):
        file = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = {}
        for name, shape in members:
            if len(shape) == 1:
                tensors[name] = torch.ones(shape, dtype=torch.bfloat16)
            else:
                tensors[name] = (torch.randn(shape, generator=generator) * shape[1] ** -0.5).to(torch.bfloat16)
            weight_map[name] = file
            total += tensors[name].numel() * 2
        save_file(tensors, out / file, metadata={"format": "pt"})
        del tensors
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return out


# ---------------------------------------------------------------------------------------- workers

def worker(kind: str, spec: dict) -> dict:
    """Runs in the measured subprocess."""
    sys.path.insert(0, str(HERE))
    from _rss import peak_rss_bytes

    if kind == "quantize":
        return quantize_worker(spec) | {"peak_rss": peak_rss_bytes()}
    if kind == "prune":
        from prunekit.pipeline import prune
        from prunekit.recipe import CalibrationSpec, EngineSpec, OutputSpec

        result = prune(spec["model"], spec["method"], sparsity=0.5,
                       calibration=CalibrationSpec("en", "embedded", spec["nsamples"], spec["seqlen"]),
                       output=OutputSpec(spec["out"], overwrite=True, stream=spec["stream"]),
                       engine=EngineSpec("cpu", solve_threads=spec.get("solve_threads")), progress=False)
        extra = {"streamed": result.record["streamed"], "dtype": result.record["base_model"]["dtype"],
                 "sparsity": result.record["sparsity"]["overall"]}
    elif kind == "sweep":
        return sweep_worker(spec)
    else:
        from prunekit.evaluation import EvaluationSpec, evaluate

        langs = spec.get("langs", "en")
        result = evaluate(spec["model"], EvaluationSpec(langs=langs, seqlen=spec["seqlen"], device="cpu",
                                                        max_windows=spec["windows"], snr_tokens=spec.get("snr_tokens", 4096)),
                          dense=spec.get("dense"), progress=False)
        extra = {"perplexity": {k: round(v["ppl"], 3) for k, v in result["perplexity"].items()},
                 "snr_db": {k: round(v["snr_db"], 2) for k, v in result["hidden_states"].items()},
                 "dense_cache": sorted({v["dense_cache"]["status"] for v in result["hidden_states"].values()})}
    return {"peak_rss": peak_rss_bytes(), **extra}


# ------------------------------------------------- the one-run sweep and the multi-language eval (issue 25)

def sweep_config(base: str, spec: dict) -> dict:
    """A one-run sweep: Wanda 50 %, one calibration language, perplexity and SNR in two languages, the dense
    stage included, the model's dtype left at its default."""
    return {
        "name": "bench-one-run", "models": [{"path": base}], "methods": ["wanda"], "sparsities": [0.5],
        "calibration": {"sets": ["en"], "source": "embedded", "nsamples": spec["nsamples"], "seqlen": spec["seqlen"]},
        "evaluation": {"languages": ["en", "de"], "perplexity_source": "embedded", "seqlen": spec["seqlen"],
                       "max_windows": spec["windows"], "hidden_states": True},
        "execution": {"device": "cpu", "keep_checkpoints": spec.get("keep", False)},
    }


def sweep_worker(spec: dict) -> dict:
    """Runs the sweep in this process and its worker processes (if any): each one's peak RSS."""
    import resource

    from _rss import peak_rss_bytes

    from prunekit.sweep import run_sweep

    summary = run_sweep(sweep_config(spec["model"], spec), spec["runs_dir"], executor="local", max_parallel=1,
                        progress=False)
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024  # the largest worker process (0: none)
    return {"peak_rss": peak_rss_bytes(), "peak_rss_children": children, "ok": summary.ok}


def bench_sweep_and_eval(args) -> None:
    """--one-run-sweep BASE... : the sweep at each depth (each process's peak RSS); then, with --eval-langs, a
    multi-language eval of the deepest run's pruned checkpoint against its base (dense cache miss, then hit)."""
    root = Path(args.root or tempfile.mkdtemp(prefix="prunekit-bench-sweep-"))
    root.mkdir(parents=True, exist_ok=True)
    os.environ["PRUNEKIT_CACHE"] = str(root / "cache")  # a cold dense cache; the workers inherit it
    rows = []
    if args.one_run_sweep is True:  # no BASE given: the synthetic 4- and 8-layer checkpoints, generated here
        args.one_run_sweep = [generate(root / f"llama3-8b-shaped-{n}L", n) for n in (4, 8)]
    try:
        for base in args.one_run_sweep:
            depth = json.loads((Path(base) / "config.json").read_text())["num_hidden_layers"]
            runs = root / f"runs-{depth}L"
            spec = {"model": str(base), "runs_dir": str(runs), "nsamples": args.nsamples, "seqlen": args.seqlen,
                    "windows": args.eval_windows, "keep": bool(args.eval_langs)}
            measured = run_worker("sweep", spec, root / f"sweep-{depth}L.log")
            rows.append({"what": f"one-run sweep, {depth} layers", **measured})
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
            if args.eval_langs and base == args.one_run_sweep[-1]:
                checkpoint = next(runs.glob("runs/*/checkpoint"))
                for attempt in ("cold dense cache", "warm dense cache"):
                    if attempt.startswith("cold"):
                        shutil.rmtree(root / "cache" / "dense", ignore_errors=True)
                    spec = {"model": str(checkpoint), "dense": str(base), "langs": args.eval_langs, "seqlen": args.seqlen,
                            "windows": args.eval_windows}
                    measured = run_worker("eval", spec, root / f"eval-{depth}L.log")
                    rows.append({"what": f"eval {args.eval_langs} vs dense, {depth} layers, {attempt}", **measured})
                    print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
            shutil.rmtree(runs, ignore_errors=True)
    finally:
        if args.root is None:
            shutil.rmtree(root, ignore_errors=True)
    print(f"\n{'what':<58} {'peak RSS GB':>11} {'workers GB':>10} {'wall s':>7}")
    for r in rows:
        print(f"{r['what']:<58} {r['peak_rss'] / 1e9:11.2f} {r.get('peak_rss_children', 0) / 1e9:10.2f} {r['wall_s']:7.1f}")
    sweeps = [r for r in rows if r["what"].startswith("one-run")]
    if len(sweeps) == 2:
        peak = lambda r: max(r["peak_rss"], r.get("peak_rss_children", 0))  # noqa: E731
        print(f"one-run sweep: peak RSS deeper / shallower = {peak(sweeps[1]) / peak(sweeps[0]):.3f}")


def run_worker(kind: str, spec: dict, log: Path) -> dict:
    spec_file = log.with_suffix(".json")
    spec_file.write_text(json.dumps(spec))
    start = time.perf_counter()
    with open(log, "w") as handle:
        done = subprocess.run([sys.executable, __file__, "--worker", kind, str(spec_file)], stdout=subprocess.PIPE,
                              stderr=handle, text=True)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{kind} worker failed (exit {done.returncode}); see {log}")
    return json.loads(done.stdout.strip().splitlines()[-1]) | {"wall_s": wall}


# ------------------------------------------------------------------------------------------ checks

def check_output(base: Path, out: Path) -> dict:
    """Dtype and shape of every tensor, bit-identity of the non-Linear ones, size against the base's."""
    import torch
    from safetensors import safe_open

    def tensors(directory: Path) -> dict[str, Path]:
        names = {}
        for file in sorted(directory.glob("*.safetensors")):
            with safe_open(file, "pt") as handle:
                names.update({name: file for name in handle.keys()})
        return names

    a, b = tensors(base), tensors(out)
    same_names = set(a) == set(b)
    dtype_shape = identical = True
    for name in sorted(set(a) & set(b)):
        with safe_open(a[name], "pt") as x, safe_open(b[name], "pt") as y:
            ta, tb = x.get_tensor(name), y.get_tensor(name)
        dtype_shape &= ta.dtype == tb.dtype == torch.bfloat16 and ta.shape == tb.shape
        if not name.endswith("proj.weight"):
            identical &= torch.equal(ta, tb)
    size = lambda d: sum(f.stat().st_size for f in d.glob("*.safetensors"))  # noqa: E731
    return {"names": same_names, "dtype_shape": dtype_shape, "non_linear_identical": identical,
            "size_ratio": size(out) / size(base), "out_gb": size(out) / 1e9, "shards": len(list(out.glob("*.safetensors")))}


# -------------------------------------------------------------------------------- packed quantize

def quantize_worker(spec: dict) -> dict:
    """``prunekit quantize BASE --method METHOD --bits 4 --out OUT`` (packed, streamed), in the measured worker."""
    from prunekit.pipeline import prune
    from prunekit.recipe import CalibrationSpec, EngineSpec, OutputSpec, Quantization

    calibration = (CalibrationSpec("en", "embedded", spec["nsamples"], spec["seqlen"]) if spec["method"] == "gptq"
                   else CalibrationSpec())
    result = prune(spec["model"], spec["method"], quantization=Quantization(bits=4), calibration=calibration,
                   output=OutputSpec(spec["out"], overwrite=True, stream=spec["stream"]), engine=EngineSpec("cpu"),
                   progress=False)
    return {"streamed": result.record["streamed"], "packed_linears": result.record["quantization"]["packed_linears"]}


def bench_quantize(args: argparse.Namespace) -> None:
    """``--quantize [BASE]``: a packed 4-bit quantize (streamed) of BASE, or of a generated 8-layer checkpoint, for
    each quantization method in --methods (rtn when none is); prints peak RSS and output bytes / base bytes
    (issue 25's reach: ≤ 3.0 GB and ≤ 0.35× with RTN at 8 layers)."""
    root = args.root or Path(tempfile.mkdtemp(prefix="prunekit-bench-quantize-"))
    root.mkdir(parents=True, exist_ok=True)
    base = Path(args.quantize) if args.quantize is not True else generate(root / "llama3-8b-shaped-8L", 8)
    size = lambda d: sum(f.stat().st_size for f in Path(d).glob("*.safetensors"))  # noqa: E731
    rows = []
    try:
        for method in [m for m in args.methods if m in ("rtn", "gptq")] or ["rtn"]:
            out = root / f"out-{base.name}-{method}-packed"
            spec = {"model": str(base), "method": method, "nsamples": args.nsamples, "seqlen": args.seqlen, "out": str(out),
                    "stream": True}
            measured = run_worker("quantize", spec, root / f"{out.name}.log")
            rows.append({"base": base.name, "base_gb": size(base) / 1e9, "method": method, **measured,
                         "out_gb": size(out) / 1e9, "size_ratio": size(out) / size(base)})
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
            if not args.keep:
                shutil.rmtree(out)
    finally:
        if not args.keep and args.root is None:
            shutil.rmtree(root, ignore_errors=True)
    print(f"\n{'base':>22} {'base GB':>8} {'method':>7} {'streamed':>8} {'peak RSS GB':>11} {'wall s':>7} {'out GB':>7} {'out/base':>8}")
    for r in rows:
        print(f"{r['base']:>22} {r['base_gb']:8.2f} {r['method']:>7} {str(r['streamed']):>8} {r['peak_rss'] / 1e9:11.2f} "
              f"{r['wall_s']:7.1f} {r['out_gb']:7.2f} {r['size_ratio']:8.4f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, default=None, help="where the synthetic checkpoints go (default: a temp dir)")
    parser.add_argument("--depths", type=int, nargs="+", default=[4, 8])
    parser.add_argument("--methods", nargs="+", default=["wanda", "sparsegpt"])
    parser.add_argument("--in-memory-depths", type=int, nargs="*", default=[4], help="depths also run on the in-memory path")
    parser.add_argument("--nsamples", type=int, default=8)
    parser.add_argument("--seqlen", type=int, default=128)
    parser.add_argument("--no-eval", action="store_true")
    parser.add_argument("--eval-only", type=Path, default=None, help="only evaluate this (pruned) checkpoint")
    parser.add_argument("--eval-windows", type=int, default=2, help="perplexity windows of --seqlen tokens")
    parser.add_argument("--solve-threads", type=int, default=None,
                        help="SparseGPT's solve threads on the CPU (default: prunekit's own choice; 1 holds one Hessian at a time)")
    parser.add_argument("--keep", action="store_true")
    parser.add_argument("--one-run-sweep", type=Path, nargs="*", default=None, metavar="BASE",
                        help="run the one-run sweep (Wanda 50 %%, en, ppl+SNR in en,de, dense stage) on these existing "
                             "checkpoints, e.g. /work/ckpts/llama8b-4L /work/ckpts/llama8b-8L (none: 4- and 8-layer ones "
                             "generated under --root)")
    parser.add_argument("--eval-langs", default=None,
                        help="with --one-run-sweep: then evaluate the last one's pruned checkpoint in these languages "
                             "against its base (e.g. en,de,sw)")
    parser.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    parser.add_argument("--quantize", nargs="?", const=True, default=None, metavar="BASE",
                        help="packed 4-bit quantize, streamed, of BASE (default: a generated 8-layer checkpoint) with the "
                             "quantization methods in --methods (default rtn): peak RSS and output bytes / base bytes")
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker[0], json.loads(Path(args.worker[1]).read_text()))), flush=True)
        return
    if args.quantize:
        bench_quantize(args)
        return
    if args.one_run_sweep is not None:
        if not args.one_run_sweep:
            args.one_run_sweep = True
        bench_sweep_and_eval(args)
        return

    if args.eval_only:
        measured = run_worker("eval", {"model": str(args.eval_only), "seqlen": args.seqlen, "windows": args.eval_windows},
                              args.eval_only.parent / "eval.log")
        print(json.dumps({"checkpoint": str(args.eval_only), **measured}))
        return
    root = args.root or Path(tempfile.mkdtemp(prefix="prunekit-bench-memory-"))
    root.mkdir(parents=True, exist_ok=True)
    rows = []
    try:
        for depth in args.depths:
            base = root / f"llama3-8b-shaped-{depth}L"
            start = time.perf_counter()
            generate(base, depth)
            base_gb = sum(f.stat().st_size for f in base.glob("*.safetensors")) / 1e9
            print(f"generated {base.name}: {base_gb:.2f} GB in {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
            for method in args.methods:
                for stream in [True] + ([False] if depth in args.in_memory_depths else []):
                    out = root / f"out-{depth}L-{method}-{'stream' if stream else 'memory'}"
                    spec = {"model": str(base), "method": method, "nsamples": args.nsamples, "seqlen": args.seqlen,
                            "out": str(out), "stream": stream, "solve_threads": args.solve_threads}
                    measured = run_worker("prune", spec, root / f"{out.name}.log")
                    checks = check_output(base, out)
                    row = {"layers": depth, "base_gb": base_gb, "method": method,
                           "path": "streamed" if measured["streamed"] else "in-memory", **measured, **checks}
                    rows.append(row)
                    print(json.dumps(row), file=sys.stderr, flush=True)
                    if not (args.keep or (not args.no_eval and depth == max(args.depths) and stream and method == args.methods[0])):
                        shutil.rmtree(out)
            if not args.no_eval and depth == max(args.depths):
                out = root / f"out-{depth}L-{args.methods[0]}-stream"
                measured = run_worker("eval", {"model": str(out), "seqlen": args.seqlen, "windows": args.eval_windows},
                                      root / "eval.log")
                rows.append({"layers": depth, "base_gb": base_gb, "method": "eval", "path": "eval", **measured})
                print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
            if not args.keep:
                shutil.rmtree(base)
    finally:
        if not args.keep and args.root is None:
            shutil.rmtree(root, ignore_errors=True)

    print(f"\n{'layers':>6} {'base GB':>8} {'method':>9} {'path':>9} {'peak RSS GB':>11} {'wall s':>7} {'out GB':>7} "
          f"{'size/base':>9} {'dtype+shape':>11} {'non-Linear =':>12}")
    for r in rows:
        out_cols = (f"{r['out_gb']:7.2f} {r['size_ratio']:9.4f} {str(r['dtype_shape']):>11} {str(r['non_linear_identical']):>12}"
                    if "out_gb" in r else f"{'':>7} {'':>9} {'':>11} {'':>12}")
        print(f"{r['layers']:6d} {r['base_gb']:8.2f} {r['method']:>9} {r['path']:>9} {r['peak_rss'] / 1e9:11.2f} "
              f"{r['wall_s']:7.1f} {out_cols}")
    by = {(r["layers"], r["method"], r["path"]): r for r in rows}
    for method in args.methods:
        four, eight = by.get((4, method, "streamed")), by.get((8, method, "streamed"))
        if four and eight:
            print(f"{method}: streamed peak RSS 8 layers / 4 layers = {eight['peak_rss'] / four['peak_rss']:.3f}")
        for depth in args.in_memory_depths:
            s, m = by.get((depth, method, "streamed")), by.get((depth, method, "in-memory"))
            if s and m:
                print(f"{method}, {depth} layers: streamed / in-memory: peak RSS {s['peak_rss'] / m['peak_rss']:.2f}, "
                      f"wall time {s['wall_s'] / m['wall_s']:.2f}")


if __name__ == "__main__":
    main()
