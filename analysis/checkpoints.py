"""Read a checkpoint's weights one tensor (or one block of rows) at a time.

A checkpoint is anything :func:`prunekit.models.resolve_model` accepts. Its weights are
``model.safetensors`` or shards with their index, read through
``prunekit.checkpoint_files.SafetensorsCheckpoint`` (only the requested rows are read). Pickle-only checkpoints (``pytorch_model.bin``) are refused at the door
(``prunekit.models.check_model_files``), with how to convert them: prunekit loads no pickle.

The analysis never imports prunekit.engine / pipeline / methods: it reads checkpoints and runs
models, nothing more.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from prunekit.analysis.spec import DEFAULT_CHUNK_ELEMENTS
from prunekit.artifacts import overall_sparsity, read_record
from prunekit.checkpoint_files import SafetensorsCheckpoint
from prunekit.errors import ModelError
from prunekit.models import MODULE_NAMES, ModelSource, resolve_model

MODULE_ORDER = ["q", "k", "v", "attn.out", "ffn.gate", "ffn.up", "ffn.down"]
_LINEAR = re.compile(
    r"(?:^|\.)layers\.(\d+)\.(self_attn\.(?:q|k|v|o)_proj|mlp\.(?:gate|up|down)_proj)\.weight$"
)
# Tensors whose presence legitimately differs between saves of one architecture (tied embeddings).
_OPTIONAL = re.compile(r"(^|\.)lm_head\.weight$")


@dataclass(frozen=True)
class TensorKey:
    """One prunable linear: decoder layer index and canonical module name."""

    layer: int
    module: str

    @property
    def order(self) -> tuple[int, int]:
        return (self.layer, MODULE_ORDER.index(self.module))


def linear_key(name: str) -> TensorKey | None:
    """``model.layers.3.mlp.up_proj.weight`` -> TensorKey(3, 'ffn.up'); None for other tensors."""
    match = _LINEAR.search(name)
    if match is None:
        return None
    return TensorKey(int(match.group(1)), MODULE_NAMES[match.group(2)])


@dataclass
class Checkpoint:
    """A checkpoint's weight inventory (name -> file, shape, dtype) without its data."""

    label: str
    source: ModelSource
    files: dict[str, Path]  # tensor name -> file holding it
    shapes: dict[str, tuple[int, ...]]
    dtypes: dict[str, str]
    fmt: str  # "safetensors" (the one format prunekit reads)
    weights: SafetensorsCheckpoint  # the shards' reader
    config: dict[str, Any] = field(default_factory=dict)
    record: dict[str, Any] | None = None  # prunekit.json when prunekit wrote it

    @property
    def spec(self) -> str:
        return self.source.spec

    def linears(self) -> dict[TensorKey, str]:
        keys = {}
        for name in self.shapes:
            key = linear_key(name)
            if key is not None:
                keys[key] = name
        return keys

    def describe(self) -> dict[str, Any]:
        """What compare.json says about this checkpoint."""
        info: dict[str, Any] = {"label": self.label, **self.source.to_json(), "format": self.fmt,
                                "model_type": self.config.get("model_type")}
        if self.record is not None:
            recipe = self.record.get("recipe", {})
            calib = self.record.get("calibration") or {}
            info["prunekit"] = {
                "run_id": self.record.get("run_id"),
                "method": recipe.get("method"),
                "pattern": (recipe.get("pattern") or {}).get("name"),
                "calibration": calib.get("spec"),
                "calibration_languages": calib.get("languages"),
                "seed": calib.get("seed"),
                "sparsity": overall_sparsity(self.record),
            }
        return info


def open_checkpoint(spec: str | Path | ModelSource, label: str | None = None) -> Checkpoint:
    """Resolve ``spec`` (local dir or Hub id) and index its weights without reading them."""
    source = spec if isinstance(spec, ModelSource) else resolve_model(str(spec))
    path = source.path
    label = label or source.spec
    config = {}
    if (path / "config.json").exists():
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    weights = SafetensorsCheckpoint.open(path, source.spec)
    info = weights.tensor_info()  # from the headers: no weight is read
    missing = [name for name in weights.names if name not in info]
    if missing:
        raise ModelError(f"'{source.spec}': tensor '{missing[0]}' is named in the index but not in its shard")
    files = {name: weights.path(name) for name in weights.names}
    shapes = {name: shape for name, (_, shape) in info.items()}
    dtypes = {name: code for name, (code, _) in info.items()}
    ckpt = Checkpoint(label, source, files, shapes, dtypes, "safetensors", weights, config, read_record(path))
    if not ckpt.linears():
        raise ModelError(
            f"'{source.spec}' has no decoder-layer linears named like 'layers.N.self_attn.q_proj.weight' / "
            "'layers.N.mlp.up_proj.weight'; mask analysis supports Llama, Gemma, Cohere/Aya, Qwen and Mistral layouts"
        )
    return ckpt


def check_same_layout(checkpoints: list[Checkpoint]) -> None:
    """Every checkpoint must have the same tensors with the same shapes; name the first that differs."""
    first = checkpoints[0]
    for other in checkpoints[1:]:
        names = sorted(set(first.shapes) | set(other.shapes), key=_natural)
        for name in names:
            a, b = first.shapes.get(name), other.shapes.get(name)
            if a == b:
                continue
            if (a is None or b is None) and _OPTIONAL.search(name):
                continue
            arch = ""
            ta, tb = first.config.get("model_type"), other.config.get("model_type")
            if ta != tb:
                arch = f" (model_type '{ta}' vs '{tb}')"
            what = (
                f"missing in '{first.label}'" if a is None
                else f"missing in '{other.label}'" if b is None
                else f"shape {list(a)} in '{first.label}' vs {list(b)} in '{other.label}'"
            )
            raise ModelError(
                f"'{first.label}' and '{other.label}' are not the same architecture{arch}: first mismatching tensor "
                f"'{name}': {what}. Compare checkpoints pruned from the same base model"
            )


def _natural(name: str) -> list:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


class TensorReader:
    """Open handles on a checkpoint's files; read row blocks of one tensor at a time.

    Only the requested rows are materialized. ``on_read`` (if set) is called with every block read,
    which tests use to account for the bytes alive at once.
    """

    def __init__(self, checkpoint: Checkpoint):
        self.checkpoint = checkpoint
        self._shards = checkpoint.weights.open_shards()

    def __enter__(self) -> TensorReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._shards.close()

    def zero_blocks(self, name: str, chunk_elements: int = DEFAULT_CHUNK_ELEMENTS) -> Iterator[np.ndarray]:
        """Yield ``W == 0`` as flat bool arrays, block of rows by block of rows (blocks hold a multiple of 8
        elements except the last, so their packed bits concatenate into the packed bits of the whole)."""
        shape = self.checkpoint.shapes[name]
        rows = shape[0]
        cols = int(np.prod(shape[1:])) if len(shape) > 1 else 1
        step = max(1, chunk_elements // max(cols, 1))
        align = 8 // math.gcd(cols, 8)
        step = max(align, step - step % align)
        for start in range(0, rows, step):
            stop = min(rows, start + step)
            yield self._zero_rows(name, start, stop)

    def _zero_rows(self, name: str, start: int, stop: int) -> np.ndarray:
        dtype = self.checkpoint.dtypes[name]
        if dtype in ("F64", "F32", "F16", "I64", "I32", "I16", "I8", "U8", "BOOL"):
            block = self._shards.slice(name)[start:stop]
            zero = np.equal(block, 0).reshape(-1)
            del block
            return zero
        # bfloat16 / float8: numpy has no such dtype; compare in torch
        block = self._shards.slice(name, "pt")[start:stop]
        return (block == 0).reshape(-1).numpy()


def packed_zero_mask(reader: TensorReader, name: str, chunk_elements: int = DEFAULT_CHUNK_ELEMENTS) -> np.ndarray:
    """``W == 0`` of one tensor packed as bits (numpy.packbits, big-endian bit order)."""
    numel = int(np.prod(reader.checkpoint.shapes[name]))
    packed = np.empty((numel + 7) // 8, dtype=np.uint8)
    offset = 0
    for block in reader.zero_blocks(name, chunk_elements):
        bits = np.packbits(block)
        packed[offset: offset + bits.size] = bits
        offset += bits.size
        del block, bits
    assert offset == packed.size, (offset, packed.size)
    return packed


_POPCOUNT_TABLE = np.array([bin(i).count("1") for i in range(256)], dtype=np.uint8)


def popcount(packed: np.ndarray) -> int:
    """Number of set bits of a packed mask."""
    if hasattr(np, "bitwise_count"):  # numpy >= 2.0
        return int(np.bitwise_count(packed).sum(dtype=np.int64))
    return int(_POPCOUNT_TABLE[packed].sum(dtype=np.int64))
