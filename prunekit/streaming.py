"""Layer streaming: a checkpoint's own dtype, its safetensors shards read one decoder layer at a time, and
the pruned checkpoint written into a mirror of the base's shards.

- The base is read through ``prunekit.checkpoint_files.SafetensorsCheckpoint`` (safetensors' own lazy reads,
  opened per read so the mapped pages leave the process's resident set once a layer is read).
- ``MirrorWriter`` copies the base's shard files and index into the output and overwrites each solved
  Linear's bytes in place: dtype, shape, tensor names, sharding and every other tensor are the base's.
- ``StreamedLayers`` builds the model skeleton on the meta device (``checkpoint_files.empty_model``:
  accelerate's ``init_empty_weights``, buffers left to the model's own initialisation) and gives the
  engine each decoder layer when it reaches it, the next one read from disk (into the page cache) by a thread meanwhile.
- ``plan_activations`` decides where the calibration activations live, a pure function of sizes and free
  memory.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch

from prunekit.artifacts import INDEX_FILE
from prunekit.checkpoint_files import TORCH_DTYPES, SafetensorsCheckpoint, empty_model
from prunekit.errors import ConfigError, ModelError
from prunekit.models import find_decoder_layers, linear_sublayers

_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


# ------------------------------------------------------------------------------------------- writing

class MirrorWriter:
    """Writes a checkpoint with exactly the base's tensor names, dtypes, shapes and shards.

    ``start`` copies the base's safetensors files (and index) into ``staging``; ``write`` overwrites one
    tensor's bytes in place, after checking that its dtype and shape are the base's. Tensors never written
    stay bit-identical to the base.

    The interface a streamed writer offers the pipeline (a packed writer offers the same): ``start()``
    (a fresh staging), ``write(name, tensor)``, ``layer_done(index)`` (the layer's bytes are on disk: the
    staging may record it as finished), ``close()``; and, when ``resumable``, ``resume()`` (continue in a
    staging whose finished layers ``prunekit.staging`` recorded: their bytes are kept, the later layers
    are written again)."""

    resumable = True

    def __init__(self, base: SafetensorsCheckpoint, staging: Path):
        self.base = base
        self.staging = Path(staging)
        self.layout = base.layout()  # name -> file, start, end, dtype, shape
        self._handles: dict[str, int] = {}

    def start(self) -> None:
        for file in self.base.files:
            shutil.copyfile(self.base.directory / file, self.staging / file)  # sendfile: no copy in this process
        if self.base.index_file is not None:
            shutil.copyfile(self.base.index_file, self.staging / INDEX_FILE)

    def resume(self) -> None:
        """Continue in a staging that ``start`` filled: its shards must be the base's files, by size."""
        for file in self.base.files:
            copy = self.staging / file
            if not copy.is_file() or copy.stat().st_size != (self.base.directory / file).stat().st_size:
                raise ModelError(f"internal: the staging's {file} is not a whole copy of the base's")

    def layer_done(self, index: int) -> None:
        """Layer ``index``'s tensors are written: flush them to disk (a kill, or a crash of the node, after
        the staging records the layer as finished cannot lose them)."""
        for handle in self._handles.values():
            os.fdatasync(handle)

    def write(self, name: str, tensor: torch.Tensor, grid: Any = None) -> None:
        """``grid``: a quantizer's grid, unused here (fake-quantized weights are written as they are)."""
        file, begin, end, code, shape = self.layout[name]
        if TORCH_DTYPES.get(code) != tensor.dtype or tuple(tensor.shape) != shape:
            raise ModelError(f"internal: {name} is {tensor.dtype} {tuple(tensor.shape)}, the base holds {code} {shape}")
        data = tensor.detach().to("cpu").contiguous().view(torch.uint8).numpy()
        if data.nbytes != end - begin:
            raise ModelError(f"internal: {name} has {data.nbytes} bytes, the base {end - begin}")
        if file not in self._handles:
            self._handles[file] = os.open(self.staging / file, os.O_WRONLY)
        written = os.pwrite(self._handles[file], memoryview(data).cast("B"), begin)
        if written != data.nbytes:
            raise OSError(f"short write to {self.staging / file}")

    def close(self) -> None:
        for handle in self._handles.values():
            os.fsync(handle)
            os.close(handle)
        self._handles.clear()


# ------------------------------------------------------------------------------------------ skeleton

def build_skeleton(path: Path, dtype: torch.dtype, trust_remote_code: bool = False) -> torch.nn.Module:
    """The model with every parameter on the meta device; buffers (rotary ``inv_freq``, Gemma's
    ``embed_scale``; non-persistent, not in the checkpoint) are created by the model's own initialisation
    on the CPU, as ``from_pretrained`` creates them."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    model = empty_model(config, dtype, trust_remote_code)
    model.eval()
    model.config.use_cache = False
    model.config._name_or_path = str(path)
    return model


def _set_tensors(module: torch.nn.Module, tensors: dict[str, torch.Tensor], device: torch.device | str) -> None:
    from accelerate.utils import set_module_tensor_to_device

    for name, value in tensors.items():
        set_module_tensor_to_device(module, name, device, value=value, clear_cache=False)


def _release(module: torch.nn.Module) -> None:
    """Every parameter back to the meta device (buffers stay: the model created them)."""
    from accelerate.utils import set_module_tensor_to_device

    for name, _ in list(module.named_parameters()):
        set_module_tensor_to_device(module, name, "meta", clear_cache=False)


def _module_name(model: torch.nn.Module, target: torch.nn.Module) -> str:
    return next(name for name, module in model.named_modules() if module is target)


class StreamedLayers:
    """The engine's layer source for a skeleton model whose weights stay in the base's safetensors shards.

    ``inputs`` reads the embedding for the forward that builds layer 0's inputs (the lm_head is never
    read); ``load`` puts a decoder layer's tensors on the compute device (read from disk by a thread while
    the previous layer was solved); ``done`` writes its Linear weights into the output shards and releases it."""

    def __init__(self, model: torch.nn.Module, checkpoint: SafetensorsCheckpoint, writer: MirrorWriter | None,
                 prefetch: bool = True):
        self.model = model
        self.checkpoint = checkpoint
        self.writer = writer
        prefix, self.layers = find_decoder_layers(model)
        self.layer_names = [
            {f"{prefix}.{i}.{name}": name for name, _ in layer.named_parameters()} for i, layer in enumerate(self.layers)
        ]
        self.linear_weights = [[f"{name}.weight" for name in linear_sublayers(layer)] for layer in self.layers]
        self.prefixes = [f"{prefix}.{i}." for i in range(len(self.layers))]
        embedding = model.get_input_embeddings()
        self.embedding_name = _module_name(model, embedding)
        self._reader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="prunekit-read") if prefetch else None
        self._pending: dict[int, Future] = {}
        self._grids: dict[str, Any] = {}  # the grids of the layer being solved (``solved``)

    def missing(self) -> list[str]:
        """Tensors the skeleton needs that the checkpoint lacks or holds with another dtype or shape
        (then the checkpoint cannot be streamed as it is)."""
        info = self.checkpoint.tensor_info()
        wanted = {f"{self.embedding_name}.weight": self.model.get_input_embeddings().weight}
        for layer, names in zip(self.layers, self.layer_names):
            params = dict(layer.named_parameters())
            wanted.update({key: params[name] for key, name in names.items()})
        bad = []
        for key, param in wanted.items():
            code, shape = info.get(key, (None, None))
            if TORCH_DTYPES.get(code) != param.dtype or shape != tuple(param.shape):
                bad.append(key)
        return bad

    @contextlib.contextmanager
    def inputs(self) -> Iterator[None]:
        embedding = self.model.get_input_embeddings()
        name = f"{self.embedding_name}.weight"  # a view of the mapped file: only the rows looked up are read
        _set_tensors(embedding, {"weight": self.checkpoint.read([name], materialise=False)[name]}, "cpu")
        try:
            yield
        finally:
            _release(embedding)

    def _read_ahead(self, index: int) -> None:
        """Have the reader thread bring layer ``index``'s bytes from disk into the page cache."""
        if self._reader is not None and index < len(self.layers) and index not in self._pending:
            self._pending[index] = self._reader.submit(self.checkpoint.warm, list(self.layer_names[index]))

    def load(self, index: int, layer: torch.nn.Module, device: torch.device) -> None:
        """Layer ``index`` on ``device``, read from the shards (from the page cache when read ahead); the
        next layer is read from disk by the reader thread meanwhile. Host memory holds one layer."""
        ahead = self._pending.pop(index, None)
        if ahead is not None:
            ahead.result()
        self._read_ahead(index + 1)
        names = self.layer_names[index]
        tensors = {names[key]: tensor for key, tensor in self.checkpoint.read(list(names)).items()}
        _set_tensors(layer, tensors, device)
        del tensors
        layer.to(device)  # the layer's own buffers, if any

    def solved(self, result: Any) -> None:
        """The engine's result of the layer about to be ``done``: its quantizers' grids go to the writer."""
        self._grids = {module.name: module.info.get("grid") for module in result.modules}

    def done(self, index: int, layer: torch.nn.Module) -> None:
        if self.writer is not None:
            params = dict(layer.named_parameters())
            grids, self._grids = self._grids, {}
            for name in self.linear_weights[index]:
                self.writer.write(self.prefixes[index] + name, params[name], grids.get(name.removesuffix(".weight")))
        _release(layer)

    def close(self) -> None:
        if self._reader is not None:
            for future in self._pending.values():
                future.cancel()
            self._reader.shutdown(wait=True)
            self._pending.clear()


# ----------------------------------------------------------------------------- activation placement

GB = 1e9


@dataclass(frozen=True)
class ActivationPlan:
    """Where the calibration activations (one buffer of inputs, one of outputs) live."""

    nsamples: int
    seqlen: int
    hidden: int
    bytes_per: int
    where: str  # "device" (the compute device) or "host" (CPU RAM; pinned and streamed per micro-batch to a GPU)
    device_type: str

    @property
    def per_buffer(self) -> int:
        return self.nsamples * self.seqlen * self.hidden * self.bytes_per

    def estimate(self) -> str:
        """The line's formula and its size, in GB from 0.1 GB and in MB below (never "0.0 GB")."""
        return (f"calibration activations: {self.nsamples} × {self.seqlen} tokens × {self.hidden} × {self.bytes_per} B"
                f" = {_decimal_size(self.per_buffer)} per buffer")

    def describe(self) -> str:
        estimate = self.estimate()
        if self.device_type == "cpu":
            return f"{estimate}, in host RAM"
        if self.where == "device":
            return f"{estimate}, on the {self.device_type.upper()} device"
        return f"{estimate}, in pinned host RAM, streamed to the {self.device_type.upper()} device per micro-batch"


def layer_reserve(layer_params: int, widest_in: int, widest_out: int, batch_tokens: int, bytes_per: int,
                  statistics: bool) -> int:
    """Compute-device memory one decoder layer needs beside the activations: its weights and their deltas
    (the error measurement), the forward's widest intermediates for one micro-batch (three, as a gated MLP
    holds), and, for methods with statistics, an fp32 Hessian of the widest input and its factor."""
    return (2 * layer_params * bytes_per + 3 * batch_tokens * widest_out * bytes_per
            + (2 * widest_in * widest_in * 4 if statistics else 0))


def plan_activations(nsamples: int, seqlen: int, hidden: int, bytes_per: int, device_type: str,
                     device_free: int | None, host_free: int | None, reserve: int = 0) -> ActivationPlan:
    """Place the activations: on the GPU when both buffers (2 × N × T × d × bytes) and ``reserve`` (one
    layer's weights and statistics) fit its free memory, else in host RAM when both buffers fit there;
    otherwise refuse with what to lower. ``None`` for a free size means unknown (assumed to fit)."""
    plan = ActivationPlan(nsamples, seqlen, hidden, bytes_per, "host", device_type)
    both = 2 * plan.per_buffer
    if device_type != "cpu" and (device_free is None or both + reserve <= device_free):
        return ActivationPlan(nsamples, seqlen, hidden, bytes_per, "device", device_type)
    host_needed = both + (reserve if device_type == "cpu" else 0)
    if host_free is None or host_needed <= host_free:
        return plan
    where = f"the {host_free / GB:.1f} GB of available host RAM"
    if device_type != "cpu":
        where = f"the {device_free / GB:.1f} GB free on the GPU nor {where}"
    hint = "" if bytes_per <= 2 else ", or use --dtype bfloat16"
    raise ConfigError(
        f"{plan.estimate()}: the two buffers ({both / GB:.1f} GB) fit {'neither' if device_type != 'cpu' else 'not'} "
        f"{where}; lower --nsamples or --seqlen{hint}"
    )


def host_available() -> int | None:
    """MemAvailable of /proc/meminfo in bytes (None where there is none)."""
    with contextlib.suppress(OSError, ValueError, StopIteration):
        with open("/proc/meminfo", encoding="ascii") as handle:
            line = next(line for line in handle if line.startswith("MemAvailable:"))
        return int(line.split()[1]) * 1024
    return None


def device_available(device: torch.device) -> int | None:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    return None


def _decimal_size(n: float) -> str:
    """8.6 GB, 3.9 MB, 512 kB: decimal units, one decimal, the largest unit with a non-zero first digit."""
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= 0.1 * size:
            return f"{n / size:.1f} {unit}"
    return f"{int(n)} B"
