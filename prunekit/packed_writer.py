"""A pack-quantized checkpoint written layer by layer, byte-identical to ``packing.save_packed``.

``PackedWriter`` has ``MirrorWriter``'s interface (``start`` / ``write`` / ``close``) and is the writer of a
streamed packed run. ``write(name, tensor, grid)`` comes for each Linear of a decoder layer when the layer
is done: a quantized Linear whose width the format holds is packed at once (``packing.pack_linear``, on the
device the layer was solved on) and every other Linear kept as it is; either goes to its own small
safetensors file in ``staging/.packed-parts`` (written atomically, so a finished Linear survives an
interruption). Host memory holds one layer and its packed tensors.

``close`` assembles the final checkpoint without holding it: the tensor set and the shards are what
transformers' ``save_pretrained`` makes of the old path's state dict (its tied-weight removal and
huggingface_hub's ``split_torch_state_dict_into_shards``, run on meta tensors), each file's header is the one
safetensors' serializer writes (its tensor order, probed from safetensors itself on empty tensors; compact
JSON padded with spaces to 8 bytes), and the data is copied by the kernel (``sendfile``) from the parts and,
for every tensor the run did not change (embeddings, norms, the LM head), from the base's shards. config.json
and generation_config.json are transformers' own (``save_pretrained`` with no weights), then
compressed-tensors adds the ``quantization_config``, as ``save_packed`` does.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from pathlib import Path
from typing import Any

import torch

from prunekit.artifacts import INDEX_FILE
from prunekit.errors import ConfigError, ModelError
from prunekit.models import find_decoder_layers, linear_sublayers
from prunekit import packing
from prunekit.packing import pack_linear, plan_packing, quantization_config, quantization_scheme, unpackable_reason
from prunekit.recipe import Quantization
from prunekit.checkpoint_files import TORCH_DTYPES, SafetensorsCheckpoint

PARTS_DIR = ".packed-parts"  # inside the staging directory; removed by ``close``


class PackedWriter:
    """Writes a streamed quantize run's pack-quantized checkpoint into ``staging`` (see the module docstring).

    Args:
        base: the base's safetensors, where every tensor the run does not write is copied from.
        staging: the output's staging directory.
        model: the run's skeleton (meta device): names, dtypes, shapes, config, tied weights.
        quantization: the recipe's grid, for the packing scheme and the config.
        max_shard_size: as ``save_pretrained``'s; None: ``packing.MAX_SHARD_SIZE``, as the in-memory path.
    """

    def __init__(self, base: SafetensorsCheckpoint, staging: Path, model: torch.nn.Module, quantization: Quantization,
                 max_shard_size: int | str | None = None):
        self.base = base
        self.staging = Path(staging)
        self.parts = self.staging / PARTS_DIR
        self.model = model
        self.quantization = quantization
        self.max_shard_size = packing.MAX_SHARD_SIZE if max_shard_size is None else max_shard_size
        self.scheme = quantization_scheme(quantization)

    def start(self) -> None:
        """Refuse, before any layer is solved, a recipe that packs no Linear or a base that lacks a tensor the
        checkpoint needs; make the parts directory."""
        _, layers = find_decoder_layers(self.model)
        widths = {module.in_features for layer in layers for module in linear_sublayers(layer).values()}
        if all(unpackable_reason(self.quantization, width) is not None for width in widths):
            raise ConfigError("no Linear of this model can be packed with this recipe; pass --format dense")
        self._check_sources(self._model_state_dict(), self.base.weight_map)
        self.parts.mkdir(parents=True, exist_ok=True)

    def write(self, name: str, tensor: torch.Tensor, grid: Any = None) -> None:
        """One decoder-layer Linear's weight (``name`` ends in ``.weight``) as the run left it; ``grid``: the
        quantizer's grid when it quantized it (then it is packed if the format holds its width)."""
        from safetensors.torch import save_file

        module = name.removesuffix(".weight")
        tensor = tensor.detach()
        if grid is not None and unpackable_reason(self.quantization, tensor.shape[1]) is None:
            tensors = {f"{module}.{key}": value for key, value in pack_linear(tensor, grid, self.scheme).items()}
        else:
            tensors = {name: tensor.to("cpu").contiguous()}
        target = self.parts / f"{module}.safetensors"
        temporary = target.with_suffix(".tmp")
        save_file(tensors, temporary, metadata={"keys": json.dumps(list(tensors))})  # the order the state dict had
        os.replace(temporary, target)

    def close(self) -> None:
        """Assemble the checkpoint's weights, config and index from the parts and the base; remove the parts."""
        from compressed_tensors.compressors import ModelCompressor

        written = self._written()
        packed = {module: keys for module, keys in written.items() if keys != [f"{module}.weight"]}
        plan = plan_packing(self.model, dict.fromkeys(packed), self.quantization)
        if not plan.packed:
            raise ConfigError("no Linear of this model can be packed with this recipe; pass --format dense")
        parts = SafetensorsCheckpoint(self.parts, {key: f"{module}.safetensors" for module, keys in written.items()
                                                   for key in keys}, None)
        sources = dict.fromkeys(self.base.weight_map, self.base) | dict.fromkeys(parts.weight_map, parts)
        state = self._state_dict(plan.packed, written, parts.tensor_info())
        self._check_sources(state, sources)
        self.model.save_pretrained(self.staging, state_dict={})  # config.json and generation_config.json, as transformers writes them
        for file in list(self.staging.glob("model*.safetensors")) + [self.staging / INDEX_FILE]:
            file.unlink(missing_ok=True)
        self._assemble(state, sources)
        ModelCompressor(quantization_config=quantization_config(self.quantization, plan)).update_config(str(self.staging))
        shutil.rmtree(self.parts)

    # ------------------------------------------------------------------------------------------ parts

    def _written(self) -> dict[str, list[str]]:
        """module name -> the tensor names its part file holds, in the order they were made."""
        from safetensors import safe_open

        written = {}
        for file in sorted(self.parts.glob("*.safetensors")):
            with safe_open(file, "pt", device="cpu") as handle:
                written[file.name.removesuffix(".safetensors")] = json.loads(handle.metadata()["keys"])
        return written

    def _model_state_dict(self) -> dict[str, torch.Tensor]:
        """The skeleton's state dict (meta tensors) less the tied weights ``save_pretrained`` leaves out: the
        skeleton's weights are tied first, as ``from_pretrained`` ties a loaded model's."""
        from transformers.modeling_utils import remove_tied_weights_from_state_dict

        self.model.tie_weights()
        return remove_tied_weights_from_state_dict(dict(self.model.state_dict()), self.model)

    def _state_dict(self, packed: list[str], written: dict[str, list[str]], info) -> dict[str, torch.Tensor]:
        """The state dict ``save_pretrained`` shards in the in-memory path, as meta tensors: the model's own
        (tied weights removed), each packed Linear's weight replaced by its packed tensors, in the order
        transformers' ``revert_weight_conversion`` gives a loaded model's (a model whose checkpoint needed
        no conversion: the streamed base holds the model's own names)."""
        from transformers.core_model_loading import revert_weight_conversion

        state = self._model_state_dict()
        for module in packed:
            del state[f"{module}.weight"]
            for key in written[module]:
                code, shape = info[key]
                state[key] = torch.empty(shape, dtype=TORCH_DTYPES[code], device="meta")
        had = getattr(self.model, "_weight_conversions", None)
        self.model._weight_conversions = [] if had is None else had  # from_pretrained keeps the conversions it used
        try:
            return revert_weight_conversion(self.model, state)
        finally:
            self.model._weight_conversions = had

    @staticmethod
    def _check_sources(state: dict[str, torch.Tensor], sources: dict[str, Any]) -> None:
        missing = [name for name in state if name not in sources]
        if missing:
            raise ModelError(f"cannot stream the packed checkpoint: the base does not hold {missing[0]} "
                             f"({len(missing)} such tensors); quantize with stream=False")

    # -------------------------------------------------------------------------------------- assembly

    def _assemble(self, state: dict[str, torch.Tensor], sources) -> None:
        """The safetensors files (and the index when sharded) that ``save_pretrained`` writes for ``state``."""
        from huggingface_hub import split_torch_state_dict_into_shards

        split = split_torch_state_dict_into_shards(state, filename_pattern="model{suffix}.safetensors",
                                                   max_shard_size=self.max_shard_size)
        for file, names in split.filename_to_tensors.items():
            self._write_file(self.staging / file, {name: state[name] for name in names}, sources)
        if split.is_sharded:
            index = {"metadata": {"total_parameters": self.model.num_parameters(), **split.metadata},
                     "weight_map": split.tensor_to_filename}
            (self.staging / INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n", encoding="utf-8")

    def _write_file(self, target: Path, tensors: dict[str, torch.Tensor], sources) -> None:
        header, order = safetensors_header(tensors, {"format": "pt"})
        by_checkpoint: dict[int, tuple[SafetensorsCheckpoint, list[str]]] = {}
        for name in order:
            checkpoint = sources[name]
            by_checkpoint.setdefault(id(checkpoint), (checkpoint, []))[1].append(name)
        spans = {}
        for checkpoint, names in by_checkpoint.values():
            spans.update(_spans(checkpoint, names))
        with open(target, "wb", buffering=0) as out:
            out.write(header)
            for name in order:
                checkpoint = sources[name]
                begin, end = spans[name]
                if end - begin != tensors[name].numel() * tensors[name].element_size():
                    raise ModelError(f"internal: {name} has {end - begin} bytes in {checkpoint.directory}, expected another size")
                _copy_range(checkpoint.directory / checkpoint.weight_map[name], out.fileno(), begin, end)
            os.fsync(out.fileno())


def _spans(checkpoint: SafetensorsCheckpoint, names: list[str]) -> dict[str, tuple[int, int]]:
    """name -> the (start, end) bytes its data occupies in its file of ``checkpoint``."""
    ranges = checkpoint.byte_ranges(names)
    by_file: dict[str, list[str]] = {}
    for name in names:
        by_file.setdefault(checkpoint.weight_map[name], []).append(name)
    return {name: span for file, file_names in by_file.items() for name, span in zip(file_names, ranges[file])}


def safetensors_header(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> tuple[bytes, list[str]]:
    """The 8-byte length and JSON header that ``safetensors.torch.save_file(tensors, metadata=metadata)``
    writes, and the order of the tensors' data after it, from the tensors' names, dtypes and shapes only
    (meta tensors do). The order (by dtype, then name) and the dtype codes are safetensors' own: probed by
    serialising empty tensors of the same names and dtypes."""
    from safetensors.torch import save

    probe = save({name: torch.empty(0, dtype=tensor.dtype) for name, tensor in tensors.items()})
    (length,) = struct.unpack("<Q", probe[:8])
    probed = json.loads(probe[8 : 8 + length])
    header: dict[str, Any] = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for name, info in probed.items():
        tensor = tensors[name]
        size = tensor.numel() * tensor.element_size()
        header[name] = {"dtype": info["dtype"], "shape": list(tensor.shape), "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text, list(probed)


def _copy_range(source: Path, out: int, begin: int, end: int) -> None:
    """Copy bytes [begin, end) of ``source`` to file descriptor ``out`` at its position, in the kernel (no
    copy in this process)."""
    with open(source, "rb") as handle:
        offset = begin
        while offset < end:
            sent = os.sendfile(out, handle.fileno(), offset, min(end - offset, 1 << 30))
            if sent == 0:
                raise OSError(f"{source} ended before byte {end}")
            offset += sent
