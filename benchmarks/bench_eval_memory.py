"""Peak memory and time of `prunekit eval` on a synthetic Llama-3-8B-shaped checkpoint.

    python benchmarks/bench_eval_memory.py [--layers 8] [--dense] [--in-memory] [--keep]

Builds a bf16 checkpoint with Llama-3-8B's shapes (hidden 4096, FFN 14336, 32 heads, 8 KV heads,
vocabulary 128256, untied head) and ``--layers`` decoder layers, one shard per decoder layer plus
one for the embedding and one for the final norm and head, written shard by shard (the generator
never holds more than one shard) under a temporary directory, with random weights and a small
BPE tokenizer trained on the repository's test text. Then it runs, each in its own process:

* ``prunekit eval CKPT --dtype bfloat16 --device cpu`` on a short English text (2 windows of 32
  tokens; bf16 GEMMs on a CPU are slow): perplexity through the layer-by-layer forward, the checkpoint streamed from its shards;
* with ``--dense``: the same with ``--dense CKPT`` (SNR / pruning error: a dense pass that fills
  the dense cache, and the evaluated pass against it);
* with ``--in-memory``: the same perplexity with the whole model loaded first (the path before
  streaming; needs about the checkpoint's size in RAM).

It prints each run's peak resident memory (VmHWM of the process, read at exit) and wall time, and
deletes the checkpoint unless ``--keep``. The target (issue 16): eval of the 8-layer checkpoint
peaks at <= 3.5 GB.
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

ROOT = Path(__file__).resolve().parents[1]
SHAPE = dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
             vocab_size=128256)

BUILD = r'''
import json, sys
from pathlib import Path
import torch
from safetensors.torch import save_file
from transformers import LlamaConfig

out, layers, shape = Path(sys.argv[1]), int(sys.argv[2]), json.loads(sys.argv[3])
config = LlamaConfig(**shape, num_hidden_layers=layers, max_position_embeddings=8192, rope_theta=500000.0,
                     bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False, dtype="bfloat16")
config.save_pretrained(out)
gen = torch.Generator().manual_seed(0)
d, f, v = shape["hidden_size"], shape["intermediate_size"], shape["vocab_size"]
kv = d // shape["num_attention_heads"] * shape["num_key_value_heads"]

def rand(*size, scale=0.02):
    t = torch.empty(size, dtype=torch.bfloat16)
    rows = max(1, (1 << 24) // size[-1])
    for start in range(0, size[0], rows):  # fp32 scratch of at most 64 MB
        t[start:start + rows] = (torch.randn((min(rows, size[0] - start), *size[1:]), generator=gen) * scale)
    return t

weight_map, total = {}, 0
def shard(name, tensors):
    global total
    save_file(tensors, out / name, metadata={"format": "pt"})
    for key, t in tensors.items():
        weight_map[key] = name
        total += t.numel() * t.element_size()

n = layers + 2
shard(f"model-00001-of-{n:05d}.safetensors", {"model.embed_tokens.weight": rand(v, d)})
for i in range(layers):
    p = f"model.layers.{i}."
    shard(f"model-{i + 2:05d}-of-{n:05d}.safetensors", {
        p + "self_attn.q_proj.weight": rand(d, d), p + "self_attn.k_proj.weight": rand(kv, d),
        p + "self_attn.v_proj.weight": rand(kv, d), p + "self_attn.o_proj.weight": rand(d, d),
        p + "mlp.gate_proj.weight": rand(f, d), p + "mlp.up_proj.weight": rand(f, d),
        p + "mlp.down_proj.weight": rand(d, f),
        p + "input_layernorm.weight": torch.ones(d, dtype=torch.bfloat16),
        p + "post_attention_layernorm.weight": torch.ones(d, dtype=torch.bfloat16),
    })
shard(f"model-{n:05d}-of-{n:05d}.safetensors", {"model.norm.weight": torch.ones(d, dtype=torch.bfloat16),
                                                 "lm_head.weight": rand(v, d)})
(out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
print(total)
'''

TOKENIZER = r'''
import sys
from pathlib import Path
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

out, text = Path(sys.argv[1]), Path(sys.argv[2])
tok = Tokenizer(models.BPE(unk_token="<unk>"))
tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
tok.decoder = decoders.ByteLevel()
tok.train_from_iterator(text.read_text(encoding="utf-8").splitlines(), trainers.BpeTrainer(
    vocab_size=512, special_tokens=["<pad>", "<bos>", "<eos>", "<unk>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                        unk_token="<unk>").save_pretrained(out)
'''

# Runs the CLI in this process and prints VmHWM at exit (the high-water mark of this exec'd process).
RUN_CLI = r'''
import atexit, sys, time
start = time.perf_counter()
def report():
    hwm = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:"))
    print(f"BENCH peak_rss_gb={hwm * 1024 / 1e9:.2f} wall_s={time.perf_counter() - start:.1f}", file=sys.stderr)
atexit.register(report)
from prunekit.cli.main import app
sys.argv = ["prunekit", *sys.argv[1:]]
app()
'''

RUN_IN_MEMORY = r'''
import atexit, sys, time
start = time.perf_counter()
def report():
    hwm = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:"))
    print(f"BENCH peak_rss_gb={hwm * 1024 / 1e9:.2f} wall_s={time.perf_counter() - start:.1f}", file=sys.stderr)
atexit.register(report)
from prunekit.evaluation import EvaluationSpec, evaluate_loaded
from prunekit.models import load_model
model, tok, source = load_model(sys.argv[1], "bfloat16")
res = evaluate_loaded(model, tok, EvaluationSpec(langs="en", ppl_source=sys.argv[2], seqlen=32, max_windows=2,
                      device="cpu"), source=source, progress=False)
print("ppl", res["perplexity"]["en"]["ppl"])
'''


def run(label: str, argv: list[str], env: dict[str, str]) -> dict[str, float]:
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", *argv], capture_output=True, text=True, env=env, cwd=ROOT)
    line = next((l for l in done.stderr.splitlines() if l.startswith("BENCH ")), None)
    if done.returncode != 0 or line is None:
        print(done.stdout[-2000:], done.stderr[-4000:], file=sys.stderr)
        raise SystemExit(f"{label}: failed (exit {done.returncode})")
    figures = dict(item.split("=") for item in line.split()[1:])
    result = {"peak_rss_gb": float(figures["peak_rss_gb"]), "wall_s": float(figures["wall_s"]),
              "process_s": time.perf_counter() - started}
    print(f"{label:<34} peak RSS {result['peak_rss_gb']:5.2f} GB   wall {result['wall_s']:6.1f} s")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--dense", action="store_true", help="also measure eval --dense (SNR / PE)")
    parser.add_argument("--in-memory", action="store_true", help="also measure the whole-model path")
    parser.add_argument("--keep", action="store_true", help="keep the synthetic checkpoint")
    parser.add_argument("--dir", default=None, help="where to build it (default: a temp dir under /tmp)")
    args = parser.parse_args()

    root = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="prunekit-bench-eval-"))
    ckpt, texts, cache = root / f"llama3-8b-shape-{args.layers}l", root / "texts", root / "cache"
    env = dict(os.environ, PRUNEKIT_CACHE=str(cache), HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    results: dict[str, dict[str, float]] = {}
    try:
        texts.mkdir(parents=True, exist_ok=True)
        lines = (ROOT / "tests/data/tatoeba/en.txt").read_text(encoding="utf-8").splitlines()
        (texts / "en.txt").write_text("\n".join(lines[:120]) + "\n", encoding="utf-8")
        if not (ckpt / "model.safetensors.index.json").exists():
            ckpt.mkdir(parents=True, exist_ok=True)
            t0 = time.perf_counter()
            size = subprocess.run([sys.executable, "-c", BUILD, str(ckpt), str(args.layers), json.dumps(SHAPE)],
                                  check=True, capture_output=True, text=True, env=env).stdout.split()[-1]
            subprocess.run([sys.executable, "-c", TOKENIZER, str(ckpt), str(texts / "en.txt")], check=True, env=env)
            print(f"built {ckpt.name}: {int(size) / 1e9:.2f} GB bf16 in {time.perf_counter() - t0:.0f} s")
        common = ["--langs", "en", "--ppl-source", str(texts), "--seqlen", "32", "--max-windows", "2",
                  "--dtype", "bfloat16", "--device", "cpu", "-q"]
        results["eval"] = run(f"eval ({args.layers} layers, streamed)",
                              [RUN_CLI, "eval", str(ckpt), *common, "--out", str(root / "results.json")], env)
        ppl = json.loads((root / "results.json").read_text())["perplexity"]["en"]["ppl"]
        print(f"  perplexity {ppl:.1f} (random weights)")
        if args.dense:
            results["eval_dense"] = run("eval --dense (dense pass + compare)",
                                        [RUN_CLI, "eval", str(ckpt), "--dense", str(ckpt), *common], env)
            results["eval_dense_cached"] = run("eval --dense (dense states cached)",
                                               [RUN_CLI, "eval", str(ckpt), "--dense", str(ckpt), *common], env)
        if args.in_memory:
            results["in_memory"] = run("eval (whole model in memory)", [RUN_IN_MEMORY, str(ckpt), str(texts)], env)
            print(f"streamed / in-memory: peak {results['eval']['peak_rss_gb'] / results['in_memory']['peak_rss_gb']:.2f}x, "
                  f"wall {results['eval']['wall_s'] / results['in_memory']['wall_s']:.2f}x")
        print(f"target: eval peak RSS <= 3.5 GB: {'met' if results['eval']['peak_rss_gb'] <= 3.5 else 'MISSED'}")
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
