"""One llm-compressor GPTQ run that writes a pack-quantized checkpoint. Launched by bench_packed_layout.py
with the peer's own venv python (it must not import prunekit).
usage: python _llmc_quantize_worker.py SPEC.json
SPEC: {model_dir, dtype, scheme, calib_file, out}
"""

import json
import sys


def main() -> None:
    spec = json.loads(open(sys.argv[1]).read())
    import torch
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import GPTQModifier
    from safetensors.torch import load_file
    from torch.utils.data import DataLoader
    from transformers import AutoModelForCausalLM

    input_ids = load_file(spec["calib_file"])["input_ids"]
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[spec["dtype"]]
    model = AutoModelForCausalLM.from_pretrained(spec["model_dir"], dtype=dtype)
    rows = [{"input_ids": row} for row in input_ids]
    loader = DataLoader(rows, batch_size=1, shuffle=False)
    oneshot(model=model, dataset=loader, recipe=GPTQModifier(scheme=spec["scheme"], targets="Linear", ignore=["lm_head"]),
            num_calibration_samples=len(rows), max_seq_length=input_ids.shape[1], pipeline="sequential")
    model.save_pretrained(spec["out"], save_compressed=True)


if __name__ == "__main__":
    main()
