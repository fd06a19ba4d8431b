"""The one reader of a checkpoint's safetensors shards, and the one place a model skeleton is built on the
meta device.

:class:`SafetensorsCheckpoint` opens a model directory (one ``model.safetensors`` or shards listed by the
index, :data:`prunekit.artifacts.INDEX_FILE`): tensor names and the shard holding each, dtype and shape from
the headers (no weight read), and lazy reads with safetensors' own ``safe_open``: named tensors, or row
blocks through :class:`OpenShards`.
Streaming (prune), the evaluation forward and the analysis read checkpoints through it alone
(tests/test_architecture.py checks that no other module opens a checkpoint's shards).

:func:`empty_model` builds a model with its parameters on the meta device (accelerate's
``init_empty_weights``), its non-persistent buffers (rotary ``inv_freq``, Gemma's ``embed_scale``) made by
the model's own initialisation on the CPU, as ``from_pretrained`` makes them.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any

import torch

from prunekit.artifacts import INDEX_FILE
from prunekit.errors import ModelError
from prunekit.io import safetensors_layout

SINGLE_FILE = "model.safetensors"
# safetensors' dtype codes (its headers' ``dtype``) -> torch, for the codes a model's tensors come in
TORCH_DTYPES = {"F64": torch.float64, "F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "I64": torch.int64,
                "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}


def check_safetensors(file: str | Path) -> None:
    """Open a .safetensors file's header with safetensors itself (no weights are read): a truncated or corrupt
    file fails here."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(file), framework="numpy") as handle:
            handle.keys()
    except (SafetensorError, OSError) as err:
        reason = str(err).replace("Error while deserializing header: ", "")
        raise ModelError(
            f"{file} is damaged ({reason}: truncated or corrupt); download or write the checkpoint again"
        ) from None


class SafetensorsCheckpoint:
    """The safetensors weights of a model directory: one file, or shards with an index.

    ``weight_map``: tensor name -> file name (relative to ``directory``); ``index_file``: the index, None for
    one file. Headers are read once, when first needed."""

    def __init__(self, directory: str | Path, weight_map: dict[str, str], index_file: Path | None):
        self.directory = Path(directory)
        self.weight_map = weight_map
        self.index_file = index_file
        self._headers: dict[str, tuple[int, dict[str, Any]]] = {}

    @classmethod
    def find(cls, directory: str | Path, label: str | None = None) -> SafetensorsCheckpoint | None:
        """The checkpoint in ``directory``; None when it has no safetensors weights (neither the index nor
        ``model.safetensors``). Raises ModelError when a shard the index lists is missing (``label`` names
        the checkpoint in that message; the directory when not given)."""
        directory = Path(directory)
        index = directory / INDEX_FILE
        if index.exists():
            weight_map = dict(json.loads(index.read_text(encoding="utf-8"))["weight_map"])
            for file in sorted(set(weight_map.values())):
                if not (directory / file).is_file():
                    raise ModelError(f"'{label or directory}': shard {file} named in the index is missing")
            return cls(directory, weight_map, index)
        single = directory / SINGLE_FILE
        if single.exists():
            checkpoint = cls(directory, {}, None)
            header = checkpoint._header(SINGLE_FILE)[1]
            checkpoint.weight_map = {name: SINGLE_FILE for name in sorted(header)}
            return checkpoint
        return None

    @classmethod
    def open(cls, directory: str | Path, label: str | None = None) -> SafetensorsCheckpoint:
        """:meth:`find`, raising ModelError when the directory has no safetensors weights."""
        checkpoint = cls.find(directory, label)
        if checkpoint is None:
            raise ModelError(f"'{label or directory}' ({directory}) has no {SINGLE_FILE} or {INDEX_FILE}")
        return checkpoint

    # ------------------------------------------------------------------------------ inventory

    @property
    def names(self) -> list[str]:
        return list(self.weight_map)

    @property
    def files(self) -> list[str]:
        """The shard file names, sorted."""
        return sorted(set(self.weight_map.values()))

    def path(self, name: str) -> Path:
        """The file holding tensor ``name``."""
        return self.directory / self.weight_map[name]

    def _header(self, file: str) -> tuple[int, dict[str, Any]]:
        if file not in self._headers:
            start, header = safetensors_layout(self.directory / file)
            self._headers[file] = (start, {k: v for k, v in header.items() if k != "__metadata__"})
        return self._headers[file]

    def layout(self) -> dict[str, tuple[str, int, int, str, tuple[int, ...]]]:
        """name -> (file, first byte, end byte, safetensors dtype code, shape) of every tensor in the shards,
        from the headers only."""
        found = {}
        for file in self.files:
            start, header = self._header(file)
            for name, meta in header.items():
                begin, end = meta["data_offsets"]
                found[name] = (file, start + begin, start + end, meta["dtype"], tuple(meta["shape"]))
        return found

    def tensor_info(self) -> dict[str, tuple[str, tuple[int, ...]]]:
        """name -> (safetensors dtype code, shape), from the headers only."""
        return {name: (code, shape) for name, (_, _, _, code, shape) in self.layout().items()}

    def dtype(self, name: str) -> str:
        return self._header(self.weight_map[name])[1][name]["dtype"]

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._header(self.weight_map[name])[1][name]["shape"])

    # -------------------------------------------------------------------------------- reading

    def read(self, names: list[str], materialise: bool = True) -> dict[str, torch.Tensor]:
        """The named tensors, on the CPU. ``safe_open`` maps the file and returns views of the mapping.
        With ``materialise`` each is copied into process memory and its file closed at once (one open per
        tensor), so the mapped pages leave the resident set one tensor at a time; without, one handle per
        file and the views as they are (a caller moving them to another device copies them anyway)."""
        from safetensors import safe_open

        tensors: dict[str, torch.Tensor] = {}
        if materialise:
            for name in names:
                with safe_open(self.path(name), "pt", device="cpu") as handle:
                    view = handle.get_tensor(name)
                    tensors[name] = view.clone()
                    del view
            return tensors
        by_file: dict[str, list[str]] = {}
        for name in names:
            by_file.setdefault(self.weight_map[name], []).append(name)
        for file, wanted in by_file.items():
            with safe_open(self.directory / file, "pt", device="cpu") as handle:
                for name in wanted:
                    tensors[name] = handle.get_tensor(name)
        return {name: tensors[name] for name in names}

    def open_shards(self) -> OpenShards:
        """Handles kept open on the shards, for reading row blocks of one tensor at a time."""
        return OpenShards(self)

    def byte_ranges(self, names: list[str]) -> dict[str, list[tuple[int, int]]]:
        """file -> the (start, end) byte ranges the named tensors occupy in it."""
        ranges: dict[str, list[tuple[int, int]]] = {}
        for name in names:
            file = self.weight_map[name]
            start, header = self._header(file)
            begin, end = header[name]["data_offsets"]
            ranges.setdefault(file, []).append((start + begin, start + end))
        return ranges

    def warm(self, names: list[str], chunk: int = 8 << 20) -> None:
        """Read the named tensors' bytes from disk into the page cache (not into this process: one small
        buffer is reused), so that ``read`` copies them from memory. Run by a read-ahead thread."""
        buffer = bytearray(chunk)
        for file, ranges in self.byte_ranges(names).items():
            fd = os.open(self.directory / file, os.O_RDONLY)
            try:
                for begin, end in ranges:
                    if hasattr(os, "posix_fadvise"):
                        os.posix_fadvise(fd, begin, end - begin, os.POSIX_FADV_WILLNEED)
                    for offset in range(begin, end, chunk):
                        os.preadv(fd, [memoryview(buffer)[: min(chunk, end - offset)]], offset)
            finally:
                os.close(fd)


class OpenShards:
    """``safe_open`` handles kept open on a checkpoint's shards (one per file and framework) until
    :meth:`close`; :meth:`slice` reads only the rows asked of it."""

    def __init__(self, checkpoint: SafetensorsCheckpoint):
        self.checkpoint = checkpoint
        self._stack = contextlib.ExitStack()
        self._handles: dict[tuple[str, str], Any] = {}

    def __enter__(self) -> OpenShards:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._stack.close()
        self._handles.clear()

    def slice(self, name: str, framework: str = "numpy"):
        """safetensors' lazy slice of tensor ``name`` (``[start:stop]`` reads those rows), as numpy arrays or
        (``framework="pt"``, for bfloat16 and float8 which numpy lacks) torch tensors."""
        from safetensors import safe_open

        key = (self.checkpoint.weight_map[name], framework)
        if key not in self._handles:
            self._handles[key] = self._stack.enter_context(safe_open(str(self.checkpoint.path(name)), framework=framework))
        return self._handles[key].get_slice(name)


def empty_model(config: Any, dtype: torch.dtype, trust_remote_code: bool = False) -> torch.nn.Module:
    """The causal LM of ``config`` with every parameter on the meta device (accelerate's
    ``init_empty_weights``); buffers are made by the model's own initialisation on the CPU."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights(include_buffers=False):
        return AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)

