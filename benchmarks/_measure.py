"""Measurements that bench_prune.py runs in their own prunekit-venv subprocess.

usage: python _measure.py bound SPEC.json     -> matmul bound of one (model, dtype, token count)
       python _measure.py evaluate SPEC.json  -> per-layer reconstruction error + per-language perplexity

bound: times F.linear on every Linear shape of one decoder layer and causal SDPA on the layer's
attention shape, in the run's dtype, best of a few repeats; the bound is two passes of every
decoder layer over all calibration tokens at that measured speed (see ``bound``).

evaluate: the same evaluation for every pruned variant (and the dense model): for each decoder
Linear, ‖(W_dense − W_pruned)·X‖² / ‖W_dense·X‖² with X the Linear's inputs when the pruned model
runs over the first calibration samples (the layer-wise objective both tools minimise, measured
identically for both), averaged per decoder layer; and perplexity on the embedded evaluation texts
(text joined with blank lines, tokenized once, non-overlapping windows; lm_head in chunks).
"""

from __future__ import annotations

import json
import math
import sys
import time

import torch
import torch.nn.functional as F


def _meta_model(model_dir: str):
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_dir)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return model, config


def _best_time(fn, repeats: int) -> float:
    fn()  # warm-up
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def _gemm_seconds(tokens: int, fan_in: int, fan_out: int, dtype: torch.dtype, upcast: bool, repeats: int) -> float:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(tokens, fan_in, generator=gen).to(dtype)
    w = torch.randn(fan_out, fan_in, generator=gen).to(dtype)
    if upcast:  # a half-precision GEMM done as an fp32 GEMM (conversions included)
        return _best_time(lambda: F.linear(x.float(), w.float()).to(dtype), repeats)
    return _best_time(lambda: F.linear(x, w), repeats)


def bound(spec: dict) -> dict:
    """Two passes of every decoder layer over all calibration tokens at the measured GEMM speed.

    Each Linear shape is timed at the token count of one prunekit batch and at 8192 tokens, and the
    faster per-token time is used (the bound never profits from a batch size). For bf16 it is
    reported twice: with native bf16 GEMMs (the dtype's own speed) and with the fastest GEMM that
    computes a bf16 product (native, or fp32 on bf16 operands: the same on CPUs without bf16 units).
    """
    from prunekit.models import find_decoder_layers, linear_sublayers, text_config

    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[spec["dtype"]]
    model, config = _meta_model(spec["model_dir"])
    cfg = text_config(config)
    _, layers = find_decoder_layers(model)
    nsamples, seqlen, batch = spec["nsamples"], spec["seqlen"], spec["batch"]
    total_tokens = nsamples * seqlen
    repeats = spec.get("repeats", 3)
    token_counts = sorted({batch * seqlen, min(8192, total_tokens)})
    per_shape = {}
    native_layer = best_layer = 0.0
    layer_flops = 0.0
    for name, module in linear_sublayers(layers[0]).items():
        fan_in, fan_out = module.in_features, module.out_features
        native = min(_gemm_seconds(t, fan_in, fan_out, dtype, False, repeats) / t for t in token_counts) * total_tokens
        best = native
        if dtype != torch.float32:
            upcast = min(_gemm_seconds(t, fan_in, fan_out, dtype, True, repeats) / t for t in token_counts) * total_tokens
            best = min(native, upcast)
        flops = 2.0 * total_tokens * fan_in * fan_out
        per_shape[name] = {"in": fan_in, "out": fan_out, "native_gflops": flops / native / 1e9, "best_gflops": flops / best / 1e9}
        native_layer += native
        best_layer += best
        layer_flops += flops
    heads = cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(batch, heads, seqlen, head_dim, generator=gen).to(dtype) for _ in range(3))
    batches = math.ceil(nsamples / batch)
    attention = _best_time(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True), repeats) * batches
    attention_flops = 2.0 * 2.0 * nsamples * heads * seqlen * seqlen * head_dim / 2  # QKᵀ and AV, causal half
    per_shape["attention"] = {"batch": batch, "heads": heads, "seqlen": seqlen, "head_dim": head_dim,
                              "gflops": attention_flops / attention / 1e9}
    passes = 2 * len(layers)
    total_flops = passes * (layer_flops + attention_flops)
    return {
        "dtype": spec["dtype"],
        "tokens_per_batch": batch * seqlen,
        "token_counts_timed": token_counts,
        "num_layers": len(layers),
        "per_shape": per_shape,
        "flops": total_flops,
        "bound_seconds": passes * (best_layer + attention),
        "native_bound_seconds": passes * (native_layer + attention),
        "gflops": total_flops / (passes * (best_layer + attention)) / 1e9,
        "native_gflops": total_flops / (passes * (native_layer + attention)) / 1e9,
        "threads": torch.get_num_threads(),
    }


def _perplexity(model, tokenizer, texts: dict[str, str], seqlen: int, windows: int, chunk: int = 1024) -> dict[str, float]:
    base = model.get_decoder()
    softcap = getattr(model.config, "final_logit_softcapping", None)
    result = {}
    for lang, text in texts.items():
        ids = tokenizer(text, return_tensors="pt")["input_ids"][0]
        n = min(windows, ids.numel() // seqlen)
        if n == 0:
            continue
        batch = ids[: n * seqlen].view(n, seqlen)
        hidden = base(input_ids=batch, use_cache=False).last_hidden_state
        hidden = hidden[:, :-1].reshape(-1, hidden.shape[-1])
        labels = batch[:, 1:].reshape(-1)
        nll = 0.0
        for start in range(0, hidden.shape[0], chunk):
            logits = model.lm_head(hidden[start : start + chunk]).float()
            if softcap:
                logits = torch.tanh(logits / softcap) * softcap
            nll += F.cross_entropy(logits, labels[start : start + chunk], reduction="sum").item()
        result[lang] = math.exp(nll / labels.numel())
    return result


def _layer_errors(model, input_ids, dense: dict[str, torch.Tensor], batch: int) -> list[float]:
    from prunekit.engine import capture_layer_inputs, run_layer
    from prunekit.models import find_decoder_layers, linear_sublayers

    prefix, layers = find_decoder_layers(model)
    hidden, kwargs_per_layer = capture_layer_inputs(model, input_ids, batch)
    per_layer = []
    for index, layer in enumerate(layers):
        sums: dict[str, list[float]] = {}

        def hook(name, module):
            def pre_hook(mod, args):
                x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
                reference = F.linear(x, dense[f"{prefix}.{index}.{name}.weight"].float())
                delta = F.linear(x, dense[f"{prefix}.{index}.{name}.weight"].float() - mod.weight.float())
                acc = sums.setdefault(name, [0.0, 0.0])
                acc[0] += delta.square().sum().item()
                acc[1] += reference.square().sum().item()

            return pre_hook

        handles = [m.register_forward_pre_hook(hook(n, m)) for n, m in linear_sublayers(layer).items()]
        try:
            hidden = [run_layer(layer, h, kwargs_per_layer[index]) for h in hidden]
        finally:
            for handle in handles:
                handle.remove()
        errors = [num / den if den > 0 else 0.0 for num, den in sums.values()]
        per_layer.append(sum(errors) / len(errors))
    return per_layer


def evaluate(spec: dict) -> dict:
    from safetensors.torch import load_file

    from prunekit.models import load_model
    from prunekit.textsources import load_texts

    model, tokenizer, _ = load_model(spec["model_dir"], spec["dtype"])
    calib = load_file(spec["calib_file"])["input_ids"][: spec["error_samples"]]
    texts = {}
    if spec.get("languages"):
        for lang in spec["languages"]:
            docs = load_texts("embedded", lang, "evaluation").documents
            texts[lang] = "\n\n".join(d.text for d in docs)
    params = dict(model.named_parameters())
    results = {}
    dense_weights = None
    with torch.no_grad():
        for variant, weights_file in spec["variants"].items():
            start = time.perf_counter()
            if weights_file is None:
                state = {}
            else:
                state = load_file(weights_file)
                if dense_weights is None:
                    dense_weights = {k: params[k].detach().clone() for k in state}
                for key, value in state.items():
                    params[key].data.copy_(value)
            entry = {"perplexity": _perplexity(model, tokenizer, texts, spec["seqlen"], spec["eval_windows"])}
            if state:
                entry["layer_errors"] = _layer_errors(model, calib, dense_weights, spec["error_samples"])
                for key in state:
                    params[key].data.copy_(dense_weights[key])
            entry["seconds"] = time.perf_counter() - start
            results[variant] = entry
    return results


def main() -> None:
    command, spec_path, out_path = sys.argv[1], sys.argv[2], sys.argv[3]
    spec = json.loads(open(spec_path).read())
    result = {"bound": bound, "evaluate": evaluate}[command](spec)
    with open(out_path, "w") as handle:
        json.dump(result, handle, indent=1)


if __name__ == "__main__":
    main()
