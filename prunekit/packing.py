"""Quantized checkpoints serving engines load: compressed-tensors "pack-quantized" (W4A16 / W8A16).

prunekit's quantizers (``methods/gptq.py``) return the grids each weight lies on (``QuantGrid``:
scales and zero points). This module writes them through the compressed-tensors library — its
``QuantizationScheme``/``QuantizationConfig`` for the ``quantization_config`` in config.json, its
pack-quantized compressor for the tensors, ``ModelCompressor.update_config`` for the config — so
the checkpoint is laid out exactly as llm-compressor writes it: per quantized Linear
``weight_packed`` int32 [out, in·bits/32], ``weight_scale`` [out, groups] in the model's dtype,
``weight_shape`` int64 [2], and for an asymmetric grid ``weight_zero_point`` int32 packed along the
rows. vLLM serves it (``vllm serve DIR``); transformers loads it when compressed-tensors is
installed (and dequantizes to the very weights prunekit's fake-quantized model holds).

Conventions: prunekit's grid is ``scale·(q − zero)`` with q ∈ {0 … 2^b − 1}; compressed-tensors
stores signed codes q − 2^(b−1) and zero points zero − 2^(b−1), which is the same grid.

What cannot be packed stays a plain Linear in the base dtype and is listed in the config's
``ignore`` and in ``prunekit.json`` (``quantization.kept_dense``): a Linear whose input width is not a
multiple of the group size (compressed-tensors 0.19 has no partial groups), a Linear of a skipped
layer, and the LM head. Act-order with groups refitted in activation order needs a column → group
map (g_idx) that compressed-tensors no longer stores: that recipe is refused unless
``--format dense``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable

import torch

from prunekit.errors import ConfigError
from prunekit.recipe import Quantization, check_format_name

PACKED_FORMAT = "pack-quantized"  # compressed-tensors' name of the format
MAX_SHARD_SIZE = "50GB"  # the safetensors files' size limit, transformers' save_pretrained default


def check_format(checkpoint_format: str, quantization: Quantization | None) -> str:
    """Validate ``--format`` against the recipe before anything loads."""
    check_format_name(checkpoint_format)
    if quantization is not None and checkpoint_format == "packed" and quantization.act_order and not quantization.static_groups and quantization.group_size != -1:
        raise ConfigError(
            "--dynamic-groups (act-order groups refitted in activation order) cannot be written as a "
            "compressed-tensors pack-quantized checkpoint (it has no column-to-group map any more): drop "
            "--dynamic-groups (static groups) or pass --format dense for fake-quantized weights"
        )
    if quantization is not None and checkpoint_format == "packed":
        require_compressed_tensors("writing a pack-quantized checkpoint needs compressed-tensors (or pass --format dense for fake-quantized weights)")
    return checkpoint_format


def require_compressed_tensors(why: str) -> None:
    try:
        import compressed_tensors  # noqa: F401
    except ImportError:
        raise ConfigError(f"{why}: pip install compressed-tensors") from None


def quantization_scheme(quantization: Quantization):
    """The compressed-tensors scheme of prunekit's recipe: int weights only (WxA16), targets Linear."""
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    grouped = quantization.group_size != -1
    weights = QuantizationArgs(
        num_bits=quantization.bits,
        type="int",
        symmetric=quantization.symmetric,
        strategy="group" if grouped else "channel",
        group_size=quantization.group_size if grouped else None,
        # static groups: grids fixed in the original column order, columns solved by activation order
        actorder="static" if quantization.act_order else None,
        dynamic=False,
        observer="minmax",
    )
    return QuantizationScheme(targets=["Linear"], weights=weights, format=PACKED_FORMAT)


def unpackable_reason(quantization: Quantization, in_features: int) -> str | None:
    """Why a Linear of this input width cannot be packed with ``quantization`` (None: it can)."""
    if quantization.group_size != -1 and in_features % quantization.group_size:
        return (
            f"input width {in_features} is not a multiple of the group size {quantization.group_size} "
            "(compressed-tensors has no partial groups)"
        )
    return None


def grid_multiples(weight: torch.Tensor, grid: Any) -> torch.Tensor:
    """``scale·(q − zero)`` in fp32 with the integer q − zero that ``weight`` (fake-quantized, in its own
    dtype) was rounded from: round(w/scale), or its neighbour where the dtype's rounding of a large
    multiple (8-bit asymmetric grids reach ±255·scale, beyond bf16's 8 significant bits) moved w by
    half a step or more. Exact: scale is a value of the dtype and the product fits fp32."""
    scale = grid.scale.to(weight.device)
    if grid.group_size != -1:
        scale = scale.repeat_interleave(grid.group_size, dim=1)[:, : weight.shape[1]]
    steps = torch.round(weight.float() / scale)
    for neighbour in (steps - 1, steps + 1):
        better = ((scale * steps).to(weight.dtype) != weight) & ((scale * neighbour).to(weight.dtype) == weight)
        steps = torch.where(better, neighbour, steps)
    return scale * steps


def pack_linear(weight: torch.Tensor, grid: Any, scheme) -> dict[str, torch.Tensor]:
    """The compressed-tensors tensors of one Linear: its fake-quantized ``weight`` [out, in] (every value
    on ``grid``) becomes ``weight_packed``, ``weight_scale``, ``weight_shape`` (+ ``weight_zero_point``).

    compressed-tensors' compressor quantizes the exact grid multiples (``grid_multiples``) with the
    solver's scales and zero points; the packed tensors are then checked to dequantize to ``weight``
    bit for bit."""
    from compressed_tensors.compressors import BaseCompressor

    if grid.g_idx is not None:
        raise ValueError("a grid with a column-to-group map (act-order, dynamic groups) cannot be packed")
    offset = 2 ** (grid.bits - 1)
    scale = grid.scale.to(weight.device)
    state = {
        "weight": grid_multiples(weight, grid),
        "weight_scale": scale,
        "weight_zero_point": (grid.zero.to(weight.device) - offset).to(torch.int8),
    }
    compressor = BaseCompressor.get_value_from_registry(PACKED_FORMAT)
    packed = compressor.compress(state, scheme)
    del state  # the fp32 multiples, before decompression makes its own fp32 copy
    packed["weight_scale"] = scale.to(weight.dtype)
    restored = compressor.decompress(dict(packed), scheme)["weight"].to(weight.dtype)
    if not torch.equal(restored, weight):
        raise RuntimeError("the packed weights do not dequantize to the quantized model's weights")  # prunekit's bug
    return {name: tensor.contiguous().cpu() for name, tensor in packed.items()}


def take_grids(layer_results: Iterable[Any], layers_prefix: str) -> dict[str, Any]:
    """Remove the quantizers' grids from the engine's per-module infos (they are not JSON) and return
    them by full module name, e.g. ``model.layers.3.self_attn.q_proj``."""
    grids = {}
    for layer in layer_results:
        for module in layer.modules:
            grid = module.info.pop("grid", None)
            if grid is not None:
                grids[f"{layers_prefix}.{layer.index}.{module.name}"] = grid
    return grids


@dataclass
class PackingPlan:
    """Which Linears are packed and which stay in the base dtype (with why), and the bytes of each."""

    packed: list[str] = field(default_factory=list)
    kept_dense: list[dict[str, str]] = field(default_factory=list)
    packed_bytes: int = 0  # weight_packed + weight_scale + weight_zero_point of the packed Linears
    bf16_bytes: int = 0  # the same Linears' weights in bf16

    def to_json(self) -> dict[str, Any]:
        return {
            "format": PACKED_FORMAT,
            "packed_linears": len(self.packed),
            "kept_dense": self.kept_dense,
            "bytes": {
                "packed": self.packed_bytes,
                "bf16": self.bf16_bytes,
                "ratio_to_bf16": self.packed_bytes / self.bf16_bytes if self.bf16_bytes else None,
            },
        }


def packed_linear_bytes(shape: tuple[int, int], quantization: Quantization, scale_bytes: int) -> int:
    """Bytes of weight_packed + weight_scale + weight_zero_point of one [out, in] Linear (weight_shape,
    16 bytes, left out)."""
    rows, cols = shape
    groups = 1 if quantization.group_size == -1 else cols // quantization.group_size
    total = rows * math.ceil(cols * quantization.bits / 32) * 4 + rows * groups * scale_bytes
    if not quantization.symmetric:
        total += math.ceil(rows * quantization.bits / 32) * groups * 4
    return total


def plan_packing(model: torch.nn.Module, grids: dict[str, Any], quantization: Quantization) -> PackingPlan:
    """Decide, for every Linear of ``model``, whether it is packed (it was quantized and fits the format)."""
    plan = PackingPlan()
    scale_bytes = next(model.parameters()).element_size()
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear):
            continue
        if name not in grids:
            plan.kept_dense.append({"name": name, "reason": "not quantized (outside the decoder layers or a skipped layer)"})
            continue
        reason = unpackable_reason(quantization, module.in_features)
        if reason is not None:
            plan.kept_dense.append({"name": name, "reason": reason})
            continue
        plan.packed.append(name)
        plan.packed_bytes += packed_linear_bytes((module.out_features, module.in_features), quantization, scale_bytes)
        plan.bf16_bytes += module.out_features * module.in_features * 2
    return plan


def quantization_config(quantization: Quantization, plan: PackingPlan):
    """The compressed-tensors QuantizationConfig: one group targeting Linear, every unpacked Linear ignored."""
    from compressed_tensors.quantization import QuantizationConfig

    return QuantizationConfig(
        config_groups={"group_0": quantization_scheme(quantization)},
        format=PACKED_FORMAT,
        quantization_status="compressed",
        ignore=[entry["name"] for entry in plan.kept_dense],
    )


def summarize_quantization(
    layer_results: list[Any], model: torch.nn.Module, grids: dict[str, Any], quantization: Quantization, packed: bool,
    module_names: dict[str, str] | None = None,
) -> dict[str, Any]:
    """The ``quantization`` section of a quantized checkpoint's record: the recipe's bits, group size,
    symmetry and act-order, the format, the per-Linear relative output error (and GPTQ loss) per
    layer, its mean per module (``module_names``: the records' short names), and for a packed
    checkpoint what stayed dense and the bytes."""
    module_names = module_names or {}
    errors: dict[str, list[float]] = {}
    for layer in layer_results:
        for module in layer.modules:
            if module.relative_error is not None:
                errors.setdefault(module_names.get(module.name, module.name), []).append(module.relative_error)
    summary = {
        "bits": quantization.bits,
        "group_size": quantization.group_size,
        "symmetric": quantization.symmetric,
        "scheme": quantization.scheme,  # what the grid is and what loads it
        "act_order": quantization.act_order,
        "static_groups": quantization.act_order and quantization.static_groups,
        "format": "dense",  # fake-quantized weights in the model's dtype
        "relative_error_per_module": {name: sum(v) / len(v) for name, v in errors.items()},
        "per_layer": [asdict(layer) for layer in layer_results],
    }
    if packed:
        summary.update(plan_packing(model, grids, quantization).to_json())
    return summary


_LOADING_FIXED = False


def enable_loading() -> None:
    """Let transformers load asymmetric pack-quantized checkpoints (zero points) in this process.

    transformers builds the compressed modules on the meta device before reading the weights, and
    compressed-tensors (0.19, 0.20) gives an asymmetric Linear an unpacked int8 zero point there,
    while the checkpoint (as its own compressor writes it, and vLLM reads it) holds the zero point
    packed into int32 along the rows: the load fails with a size mismatch. This gives the meta
    zero point the packed shape; the checkpoint and its dequantization are unchanged. Symmetric
    checkpoints (no zero point) load without it. Idempotent."""
    global _LOADING_FIXED
    if _LOADING_FIXED:
        return
    from compressed_tensors.compressors.pack_quantized.base import PACK_ZP_STRATS, PackedQuantizationCompressor

    original = PackedQuantizationCompressor.compress.__func__

    def compress(cls, state_dict, scheme):
        compressed = original(cls, state_dict, scheme)
        zero_point, weights = compressed.get("weight_zero_point"), scheme.weights
        if (
            zero_point is not None and zero_point.device.type == "meta" and zero_point.dtype != torch.int32
            and not weights.symmetric and weights.strategy in PACK_ZP_STRATS
        ):
            rows = math.ceil(zero_point.shape[0] * weights.num_bits / 32)
            compressed["weight_zero_point"] = torch.empty((rows, *zero_point.shape[1:]), dtype=torch.int32, device="meta")
        return compressed

    PackedQuantizationCompressor.compress = classmethod(compress)
    _LOADING_FIXED = True


def prepare_loading(quantization_config: Any, spec: str) -> dict[str, Any]:
    """Before transformers loads a checkpoint whose config has a ``quantization_config``: a clear error
    when compressed-tensors is missing for a compressed-tensors checkpoint, and ``enable_loading``.
    Returns the extra ``from_pretrained`` arguments: prunekit dequantizes on load (plain Linear
    weights, exactly the fake-quantized values), so evaluation and analysis can run the model one
    layer at a time like any other."""
    config = quantization_config if isinstance(quantization_config, dict) else quantization_config.to_dict()
    if config.get("quant_method") != "compressed-tensors":
        return {}
    require_compressed_tensors(f"'{spec}' is a compressed-tensors ({config.get('format', 'quantized')}) checkpoint; loading it needs compressed-tensors")
    enable_loading()
    from transformers import CompressedTensorsConfig

    return {"quantization_config": CompressedTensorsConfig(dequantize=True)}


def save_packed(model: torch.nn.Module, grids: dict[str, Any], quantization: Quantization, out_dir: str | Path) -> PackingPlan:
    """Write ``model`` (fake-quantized, every quantized Linear's weight on its grid in ``grids``) into
    ``out_dir`` as a pack-quantized checkpoint: safetensors + config.json with ``quantization_config``.
    ``out_dir`` is a staging directory (the caller makes the write atomic); the model is not changed.
    The whole-model path (``stream=False``); a streamed run writes the same bytes with
    ``packed_writer.PackedWriter``."""
    from compressed_tensors.compressors import ModelCompressor

    plan = plan_packing(model, grids, quantization)
    if not plan.packed:
        raise ConfigError("no Linear of this model can be packed with this recipe; pass --format dense")
    scheme = quantization_scheme(quantization)
    state_dict = dict(model.state_dict())
    modules = dict(model.named_modules())
    for name in plan.packed:
        del state_dict[f"{name}.weight"]
        for key, tensor in pack_linear(modules[name].weight.detach(), grids[name], scheme).items():
            state_dict[f"{name}.{key}"] = tensor
    model.save_pretrained(out_dir, state_dict=state_dict, safe_serialization=True, max_shard_size=MAX_SHARD_SIZE)
    ModelCompressor(quantization_config=quantization_config(quantization, plan)).update_config(str(out_dir))
    return plan
