"""One prunekit run, whole process: imports, model load, pruning. Launched by bench_prune.py.

usage: python _prunekit_worker.py SPEC.json
SPEC: {model_dir, dtype, method, sparsity, n, m, calib_file, out_weights, out_json, batch_size}
Timestamps are wall-clock (time.time()) so the parent can measure from the moment it spawned us.
Peak RSS is read at the end of pruning (before the pruned weights are written for evaluation).
"""

import time

T_START = time.time()

import json  # noqa: E402

from _rss import peak_rss_bytes  # noqa: E402
import sys  # noqa: E402


def main() -> None:
    spec = json.loads(open(sys.argv[1]).read())
    import torch
    from safetensors.torch import load_file, save_file

    from prunekit.engine import Engine
    from prunekit.methods import get_method
    from prunekit.models import find_decoder_layers, linear_sublayers, load_model
    from prunekit.recipe import Pattern, Recipe

    t_imports = time.time()
    input_ids = load_file(spec["calib_file"])["input_ids"]
    model, _tokenizer, _source = load_model(spec["model_dir"], spec["dtype"], with_tokenizer=False)
    t_loaded = time.time()

    pattern = Pattern(spec["sparsity"], spec["n"], spec["m"])
    recipe = Recipe(spec["method"], pattern=pattern)
    engine = Engine(get_method(spec["method"]), recipe, "cpu", batch_size=spec.get("batch_size"), solve_threads=spec.get("solve_threads"))
    layers = engine.run(model, input_ids)
    t_pruned = time.time()
    rss = peak_rss_bytes()

    prefix, decoder_layers = find_decoder_layers(model)
    weights = {}
    for index, layer in enumerate(decoder_layers):
        for name, module in linear_sublayers(layer).items():
            weights[f"{prefix}.{index}.{name}.weight"] = module.weight.detach().contiguous()
    save_file(weights, spec["out_weights"])
    result = {
        "tool": "prunekit",
        "t_start": T_START,
        "t_imports": t_imports,
        "t_loaded": t_loaded,
        "t_pruned": t_pruned,
        "peak_rss_at_pruned": rss,
        "peak_rss_with_save": peak_rss_bytes(),
        "layer_seconds": [layer.seconds for layer in layers],
        "recorded_errors": [
            {m.name: m.relative_error for m in layer.modules} for layer in layers
        ],
        "threads": torch.get_num_threads(),
    }
    with open(spec["out_json"], "w") as handle:
        json.dump(result, handle)


if __name__ == "__main__":
    main()
