"""prunekit's pack-quantized checkpoints against the ones llm-compressor writes for the same scheme.

For each scheme (W4A16: int4 symmetric group 128; W4A16_ASYM: int4 asymmetric group 128; both act-order
static, GPTQModifier's default), quantizes one tiny random Llama (hidden 128, two layers) with llm-compressor 0.14's
GPTQModifier in the peer's own venv (it pins another transformers; see benchmarks/README.md) and with
prunekit (GPTQ, the same recipe, the same calibration tokens), then prints every difference in:
tensor names, dtypes and shapes, and the quantization_config's format, ignore list and weight args.
Last, prunekit's loader reads llm-compressor's checkpoint.

  python benchmarks/bench_packed_layout.py --peer-python /tmp/llmc/bin/python
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

SCHEMES = {  # llm-compressor preset -> the prunekit recipe it names
    "W4A16": dict(bits=4, group_size=128, act_order=True, symmetric=True),
    "W4A16_ASYM": dict(bits=4, group_size=128, act_order=True, symmetric=False),  # GPTQModifier: actorder static by default
}
WEIGHT_ARGS = ("num_bits", "type", "symmetric", "strategy", "group_size", "actorder", "dynamic")


def layout(directory: Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    from safetensors import safe_open

    out = {}
    for path in sorted(directory.glob("*.safetensors")):
        with safe_open(path, "pt") as handle:
            for key in handle.keys():
                tensor = handle.get_slice(key)
                out[key] = (tensor.get_dtype(), tuple(tensor.get_shape()))
    return out


def config_summary(directory: Path) -> dict:
    config = json.loads((directory / "config.json").read_text())["quantization_config"]
    groups = config["config_groups"]
    (group,) = groups.values()
    return {
        "quant_method": config["quant_method"], "format": config["format"], "status": config["quantization_status"],
        "ignore": sorted(config["ignore"]), "targets": group["targets"], "group_format": group.get("format"),
        "input_activations": group["input_activations"],
        **{f"weights.{k}": group["weights"].get(k) for k in WEIGHT_ARGS},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--peer-python", default="/work/venv-llmc/bin/python")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--schemes", default=",".join(SCHEMES))
    args = parser.parse_args()

    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, LlamaConfig

    from prunekit.models import load_model
    from prunekit.pipeline import prune
    from prunekit.recipe import CalibrationSpec, OutputSpec, Quantization
    from tests.conftest import TATOEBA, train_tokenizer

    differences = 0
    with tempfile.TemporaryDirectory(prefix="bench-layout-") as work:
        work = Path(work)
        tokenizer = train_tokenizer()
        torch.manual_seed(0)
        config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, bos_token_id=1, eos_token_id=2, pad_token_id=0)
        model_dir = work / "model"
        AutoModelForCausalLM.from_config(config).save_pretrained(model_dir)
        tokenizer.save_pretrained(model_dir)
        text = (TATOEBA / "en.txt").read_text(encoding="utf-8")
        ids = tokenizer(text, return_tensors="pt").input_ids[0]
        calib = torch.stack([ids[i * 64 : (i + 1) * 64] for i in range(8)])
        save_file({"input_ids": calib.contiguous()}, work / "calib.safetensors")
        for scheme in args.schemes.split(","):
            peer_out, own_out = work / f"llmc-{scheme}", work / f"prunekit-{scheme}"
            spec = {"model_dir": str(model_dir), "dtype": args.dtype, "scheme": scheme,
                    "calib_file": str(work / "calib.safetensors"), "out": str(peer_out)}
            (work / "spec.json").write_text(json.dumps(spec))
            subprocess.run([args.peer_python, str(HERE / "_llmc_quantize_worker.py"), str(work / "spec.json")], check=True,
                           stdout=subprocess.DEVNULL)
            prune(str(model_dir), "gptq", quantization=Quantization(**SCHEMES[scheme]),
                  calibration=CalibrationSpec("en", str(TATOEBA), nsamples=8, seqlen=64),
                  output=OutputSpec(own_out, args.dtype), progress=False)

            peer, own = layout(peer_out), layout(own_out)
            for key in sorted(set(peer) | set(own)):
                if peer.get(key) != own.get(key):
                    differences += 1
                    print(f"{scheme} tensor {key}: llm-compressor {peer.get(key)} | prunekit {own.get(key)}")
            peer_config, own_config = config_summary(peer_out), config_summary(own_out)
            for key in peer_config:
                if peer_config[key] != own_config[key]:
                    differences += 1
                    print(f"{scheme} quantization_config {key}: llm-compressor {peer_config[key]!r} | prunekit {own_config[key]!r}")
            packed = [k for k in own if k.endswith("weight_packed")]
            print(f"{scheme}: {len(own)} tensors ({len(packed)} packed Linears) compared, "
                  f"quantization_config {', '.join(f'{k}={v}' for k, v in own_config.items() if k.startswith('weights.'))}")

            loaded, _, _ = load_model(str(peer_out), args.dtype, with_tokenizer=False)  # prunekit reads llm-compressor's checkpoint
            with torch.no_grad():
                logits = loaded(tokenizer("The cat sleeps.", return_tensors="pt").input_ids).logits
            print(f"{scheme}: prunekit's loader read llm-compressor's checkpoint, logits finite: {bool(torch.isfinite(logits).all())}")
    print(f"{differences} differences in names, dtypes, shapes and quantization_config")


if __name__ == "__main__":
    main()
