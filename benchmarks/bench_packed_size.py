"""Sizes of pack-quantized checkpoints (compressed-tensors), and their round trip through transformers.

Quantizes a model (default: the embedded Gemma-3-270M, bf16) with prunekit at each recipe, writes the
pack-quantized checkpoint, and prints, from the safetensors file itself:
- the bytes of the quantized Linears (weight_packed + weight_scale + weight_zero_point) against the
  same weights in bf16, and the whole checkpoint against the dense bf16 one;
- the round trip: transformers.AutoModelForCausalLM.from_pretrained(checkpoint) against the
  fake-quantized model prunekit holds in memory (max relative logit difference, bit-equal weights).

The sizes depend on the recipe and the shapes only, not on the method: `--method rtn` (no
calibration) gives the same bytes as GPTQ in seconds.

  python benchmarks/bench_packed_size.py                       # GPTQ, w4g128 and w8g128, bf16
  python benchmarks/bench_packed_size.py --method rtn --recipes w4g128,w8g128,w8,w4g128-sym
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PACKED_SUFFIXES = ("weight_packed", "weight_scale", "weight_zero_point")


def checkpoint_bytes(directory: Path) -> dict[str, int]:
    from safetensors import safe_open

    sizes = {"packed_linears": 0, "total": 0, "original_bf16": 0, "total_as_bf16": 0}
    for path in directory.glob("*.safetensors"):
        with safe_open(path, "pt") as handle:
            for key in handle.keys():
                tensor = handle.get_tensor(key)
                nbytes = tensor.numel() * tensor.element_size()
                sizes["total"] += nbytes
                sizes["total_as_bf16"] += tensor.numel() * 2
                if key.endswith(PACKED_SUFFIXES):
                    sizes["packed_linears"] += nbytes
                if key.endswith("weight_shape"):
                    rows, cols = tensor.tolist()
                    sizes["original_bf16"] += rows * cols * 2
    return sizes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="embedded:gemma-3-270m")
    parser.add_argument("--recipes", default="w4g128,w8g128", help="sweep slugs, comma-separated (w4g128, w8, w4g128-sym, ...)")
    parser.add_argument("--method", default="gptq", choices=["gptq", "rtn"])
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--nsamples", type=int, default=16)
    parser.add_argument("--seqlen", type=int, default=256)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    from transformers import AutoModelForCausalLM

    from prunekit.models import resolve_model
    from prunekit.packing import enable_loading
    from prunekit.pipeline import prune
    from prunekit.recipe import CalibrationSpec, OutputSpec, quantization_from_name

    dense_dir = resolve_model(args.model).path
    dense_bytes = checkpoint_bytes(dense_dir)["total_as_bf16"]  # the dense checkpoint, in bf16
    enable_loading()
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-packed-") as work:
        for slug in args.recipes.split(","):
            quantization = quantization_from_name(f"{args.method}-{slug}")
            out = Path(work) / slug
            calibration = (CalibrationSpec("all", nsamples=args.nsamples, seqlen=args.seqlen) if args.method == "gptq"
                           else CalibrationSpec())
            start = time.perf_counter()
            result = prune(args.model, args.method, quantization=quantization, calibration=calibration,
                           output=OutputSpec(out, args.dtype), progress=False)
            seconds = time.perf_counter() - start
            sizes = checkpoint_bytes(out)
            recorded = result.record["quantization"]["bytes"]
            assert recorded["packed"] == sizes["packed_linears"], (recorded, sizes)  # the record's bytes are the file's

            loaded = AutoModelForCausalLM.from_pretrained(out)
            ids = result.tokenizer("Die Katze schläft auf dem Sofa. The cat sleeps on the sofa.", return_tensors="pt").input_ids
            with torch.no_grad():
                expected, got = result.model(ids).logits.float(), loaded(ids).logits.float()
            fake = dict(result.model.named_parameters())
            equal = all(torch.equal(p, fake[n]) for n, p in loaded.named_parameters() if n in fake)
            row = {
                "recipe": slug, "method": args.method, "dtype": args.dtype, "seconds": round(seconds, 1),
                "packed_linears": result.record["quantization"]["packed_linears"],
                "kept_dense": [entry["name"] for entry in result.record["quantization"]["kept_dense"]],
                "linear_bytes_packed": sizes["packed_linears"], "linear_bytes_bf16": sizes["original_bf16"],
                "linear_ratio": sizes["packed_linears"] / sizes["original_bf16"],
                "checkpoint_bytes": sizes["total"], "dense_checkpoint_bytes": dense_bytes,
                "logits_max_rel_diff": float((got - expected).abs().max() / expected.abs().max()),
                "finite": bool(torch.isfinite(got).all()), "weights_bit_equal": equal,
            }
            rows.append(row)
            print(
                f"{args.model} {args.method}-{slug} ({args.dtype}): {row['packed_linears']} Linears, "
                f"{row['linear_bytes_packed'] / 2**20:.2f} MiB packed vs {row['linear_bytes_bf16'] / 2**20:.2f} MiB bf16 "
                f"= {row['linear_ratio']:.3f}×; checkpoint {row['checkpoint_bytes'] / 2**20:.1f} MiB "
                f"(dense bf16 {dense_bytes / 2**20:.1f} MiB); kept dense: {', '.join(row['kept_dense'])}; "
                f"transformers round trip: max rel logit diff {row['logits_max_rel_diff']:.1e}, "
                f"weights bit-equal {equal}; quantize+save {seconds:.0f}s",
                flush=True,
            )
            del loaded, result
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
