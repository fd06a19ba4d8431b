"""One llm-compressor run, whole process: imports, model load, oneshot pruning. Launched by bench_prune.py
with the peer's own venv python (it must not import prunekit).

usage: python _llmc_worker.py SPEC.json
SPEC: {model_dir, dtype, method, sparsity, n, m, calib_file, out_weights, out_json, batch_size}
The model is loaded the way the peer's examples do (AutoModelForCausalLM.from_pretrained), the
calibration tokens are handed over as a DataLoader (the peer's documented path for pre-built data),
and the modifier targets the decoder layers (the peer's 2:4 example), so lm_head is not pruned.
"""

import time

T_START = time.time()

import json  # noqa: E402

from _rss import peak_rss_bytes  # noqa: E402
import sys  # noqa: E402


def main() -> None:
    spec = json.loads(open(sys.argv[1]).read())
    import torch
    from llmcompressor import oneshot
    from llmcompressor.modifiers.pruning import SparseGPTModifier, WandaPruningModifier
    from safetensors.torch import load_file, save_file
    from torch.utils.data import DataLoader
    from transformers import AutoModelForCausalLM

    t_imports = time.time()
    input_ids = load_file(spec["calib_file"])["input_ids"]
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[spec["dtype"]]
    model = AutoModelForCausalLM.from_pretrained(spec["model_dir"], dtype=dtype)
    model.eval()
    t_loaded = time.time()

    structure = f"{spec['n']}:{spec['m']}" if spec["n"] else "0:0"
    modifier_cls = {"wanda": WandaPruningModifier, "sparsegpt": SparseGPTModifier}[spec["method"]]
    modifier = modifier_cls(sparsity=spec["sparsity"], mask_structure=structure, targets=[r"re:model.layers.\d+$"])
    rows = [{"input_ids": row} for row in input_ids]
    loader = DataLoader(rows, batch_size=spec.get("batch_size") or 1, shuffle=False)
    oneshot(model=model, dataset=loader, recipe=modifier, num_calibration_samples=len(rows),
            max_seq_length=input_ids.shape[1], pipeline="sequential")
    t_pruned = time.time()
    rss = peak_rss_bytes()

    weights = {}
    for index, layer in enumerate(model.model.layers):
        for name, module in layer.named_modules():
            if isinstance(module, torch.nn.Linear):
                weights[f"model.layers.{index}.{name}.weight"] = module.weight.detach().contiguous()
    save_file(weights, spec["out_weights"])
    result = {
        "tool": "llm-compressor",
        "t_start": T_START,
        "t_imports": t_imports,
        "t_loaded": t_loaded,
        "t_pruned": t_pruned,
        "peak_rss_at_pruned": rss,
        "peak_rss_with_save": peak_rss_bytes(),
        "threads": torch.get_num_threads(),
    }
    with open(spec["out_json"], "w") as handle:
        json.dump(result, handle)


if __name__ == "__main__":
    main()
