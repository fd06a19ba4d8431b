"""Resolve what the user calls a MODEL (local dir, GGUF file, Hub id, ``embedded:NAME``) and load it."""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import math
import json
import os
import re
import warnings
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from prunekit.artifacts import CHECKPOINT_PATTERNS as HUB_ALLOW_PATTERNS  # what a checkpoint repo on the Hub holds
from prunekit.artifacts import INDEX_FILE
from prunekit.errors import ConfigError, ModelError, SchemaError
from prunekit.checkpoint_files import check_safetensors
from prunekit.gguf_conversion import convert_gguf, gguf_source, has_config
from prunekit.io import cache_dir, format_size, read_json, safetensors_header
from prunekit.recipe import AUTO_DTYPE, DTYPE_NAMES, check_dtype_name
from prunekit.remote import download_snapshot, repository_size

EMBEDDED_PREFIX = "embedded:"
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")
# Canonical names of the prunable Linears (analysis-spec §0.4), shared by records, analysis and reports.
MODULE_NAMES = {
    "self_attn.q_proj": "q",
    "self_attn.k_proj": "k",
    "self_attn.v_proj": "v",
    "self_attn.o_proj": "attn.out",
    "mlp.gate_proj": "ffn.gate",
    "mlp.up_proj": "ffn.up",
    "mlp.down_proj": "ffn.down",
}
DTYPES = dict(zip(DTYPE_NAMES, (torch.float32, torch.bfloat16, torch.float16)))


# PyTorch pickle weights (not training_args.bin and the like, which are not weights)
PICKLE_WEIGHTS = ("pytorch_model*.bin", "pytorch_model.bin.index.json", "model*.bin", "*.pt", "*.pth", "*.ckpt")
PICKLE_ADVICE = (
    "prunekit loads only safetensors, which hold tensors and no code; convert it once, in an environment you trust "
    "with the file's origin: `AutoModelForCausalLM.from_pretrained(DIR).save_pretrained(NEW_DIR, "
    "safe_serialization=True)` (and the tokenizer's save_pretrained(NEW_DIR)), then give prunekit NEW_DIR"
)


def pickle_only(directory: Path) -> list[str]:
    """The pickle weight files of a directory that has no safetensors weights, else []."""
    if any(directory.glob("*.safetensors")):
        return []
    return sorted({f.name for pattern in PICKLE_WEIGHTS for f in directory.glob(pattern) if f.is_file()})


def check_model_files(directory: str | Path) -> Path:
    """Check a model directory before anything runs: its JSON files parse, every shard its safetensors index
    lists is present, every safetensors file is whole (its size agrees with its header; headers only, no
    weights read), and it has safetensors weights at all (a pickle-only checkpoint is refused with how to
    convert it)."""
    directory = Path(directory)
    for file in sorted(directory.glob("*.json")):  # config, record, shard index, tokenizer settings
        if file.is_file() and file.name != "tokenizer.json":  # the vocabulary (tens of MB) is parsed by its loader
            try:
                read_json(file)
            except SchemaError as err:
                raise ModelError(str(err)) from None
    pickles = pickle_only(directory)
    if pickles:
        raise ModelError(
            f"'{directory}' holds its weights only as PyTorch pickle files ({', '.join(pickles[:3])}"
            f"{', …' if len(pickles) > 3 else ''}), which can run code when loaded; {PICKLE_ADVICE}"
        )
    index = directory / INDEX_FILE
    if not index.is_file() and not any(directory.glob("*.safetensors")):
        raise ModelError(f"'{directory}' has no weights (no *.safetensors file and no {INDEX_FILE}); "
                         "give the directory that holds the model's weights, or download or copy them again")
    if index.is_file():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise ModelError(f"{index} has no 'weight_map'; download or write the checkpoint again")
        listed = sorted(set(map(str, weight_map.values())))
        missing = [name for name in listed if not (directory / name).is_file()]
        if missing:
            raise ModelError(
                f"'{directory}' is incomplete: {len(missing)} of the {len(listed)} shards its {INDEX_FILE} "
                f"lists {'is' if len(missing) == 1 else 'are'} missing ({', '.join(missing[:3])}"
                f"{', …' if len(missing) > 3 else ''}); an interrupted download or copy? download or copy it again "
                "(for a Hub model: `prunekit pull` or `hf download`)"
            )
    for file in sorted(directory.glob("*.safetensors")):
        safetensors_header(file)  # cut short (an interrupted download or copy), or a header that is not JSON
        check_safetensors(file)
    return directory


@dataclass
class ModelSource:
    """Where a model came from: what the user typed, the local dir it resolved to, and the Hub revision."""

    spec: str
    path: Path
    kind: str  # "local", "hub", "gguf", "embedded"
    revision: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"spec": self.spec, "path": str(self.path), "kind": self.kind, "revision": self.revision, **self.extra}




def parse_dtype(name: str) -> torch.dtype | None:
    """The torch dtype of a --dtype name; None for ``auto`` (the checkpoint's own, resolved on loading)."""
    return None if check_dtype_name(name) == AUTO_DTYPE else DTYPES[name]


def resolve_device(device: str) -> torch.device:
    """``auto`` is ``$PRUNEKIT_DEVICE`` when set (a sweep worker's own GPU, or ``cpu`` to pin a test
    suite), else ``cuda`` when a GPU is visible, else ``cpu``."""
    if device == "auto":
        device = os.environ.get("PRUNEKIT_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as err:
        raise ConfigError(f"unknown --device '{device}': use auto, cpu or cuda[:i]") from err
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {device} was asked for, but no CUDA device is available; use --device cpu")
    return dev


def _file_fingerprint(path: Path) -> str:
    stat = path.stat()
    return hashlib.sha256(f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:16]


def _gguf_model_dir(gguf_path: Path) -> Path:
    target = cache_dir("models") / f"gguf-{gguf_path.stem}-{_file_fingerprint(gguf_path)}"
    return target if has_config(target) else convert_gguf(gguf_path, target)


def _embedded_model_dir(name: str) -> Path:
    from prunekit.embedded import embedded_model_dir

    return embedded_model_dir(name)


def resolve_model(spec: str, revision: str | None = None) -> ModelSource:
    """Turn a MODEL argument into a local directory with config and weights."""
    spec = str(spec)
    if spec.startswith(EMBEDDED_PREFIX):
        name = spec[len(EMBEDDED_PREFIX):]
        directory = _embedded_model_dir(name)
        extra = gguf_source(directory)
        if "gguf_quantization" not in extra:  # converted by an older prunekit from a GGUF file since removed
            from prunekit.embedded import embedded_gguf_file
            from prunekit.gguf_conversion import record_gguf_source

            extra = record_gguf_source(directory, embedded_gguf_file(name))
        return ModelSource(spec, directory, "embedded", extra=extra)
    path = Path(spec).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        directory = _gguf_model_dir(path)
        return ModelSource(spec, directory, "gguf", extra=gguf_source(directory) | {"gguf_file": str(path.resolve())})
    if path.is_dir():
        if not (path / "config.json").exists():
            raise ModelError(f"model directory '{spec}' has no config.json; is it a Hugging Face model folder?")
        return ModelSource(spec, check_model_files(path.resolve()), "local")
    looks_local = spec.startswith((".", "/", "~")) or os.sep in spec.strip("/").split("/", 1)[-1] or path.suffix
    if HUB_ID.match(spec) and not looks_local:
        local, sha = download_snapshot(spec, revision)
        return ModelSource(spec, check_model_files(local), "hub", revision=sha)
    raise ModelError(
        f"model '{spec}' not found: give a local model directory, a .gguf file, a Hub id such as "
        "'google/gemma-3-270m', or 'embedded:gemma-3-270m'"
    )


_TOKENIZERS: dict[tuple, Any] = {}
TOKENIZERS_KEPT = 2


def load_tokenizer(source: ModelSource, trust_remote_code: bool = False):
    """The model's tokenizer. A process that loads the same tokenizer files again (a sweep: every run
    of a model) gets the object it loaded before: Gemma's 262k-entry tokenizer takes ~5 s to build.
    prunekit never modifies a tokenizer; code that would (lm-eval's pad-token set-up) works on a copy."""
    from transformers import AutoTokenizer

    path = Path(source.path)
    files = tuple(
        (f.name, f.stat().st_size, f.stat().st_mtime_ns)
        for f in sorted(path.iterdir())
        if f.is_file() and not f.name.endswith((".safetensors", ".bin", ".gguf", ".pt", ".pth"))
    ) if path.is_dir() else ()
    key = (str(path.resolve()), trust_remote_code, files)
    if key not in _TOKENIZERS:
        while len(_TOKENIZERS) >= TOKENIZERS_KEPT:
            _TOKENIZERS.pop(next(iter(_TOKENIZERS)))
        _TOKENIZERS[key] = AutoTokenizer.from_pretrained(str(source.path), trust_remote_code=trust_remote_code)
    return _TOKENIZERS[key]


def load_model(
    spec: str | ModelSource,
    dtype: str | torch.dtype = AUTO_DTYPE,
    trust_remote_code: bool = False,
    revision: str | None = None,
    with_tokenizer: bool = True,
):
    """Load (model on CPU in eval mode, tokenizer, ModelSource). Weights stay on CPU; the engine moves layers.
    ``dtype="auto"`` loads the checkpoint's own dtype.

    ``with_tokenizer=False`` skips the tokenizer (returned as None) when the caller already has it."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    source = spec if isinstance(spec, ModelSource) else resolve_model(spec, revision)
    if isinstance(dtype, str):
        dtype = parse_dtype(resolve_dtype(dtype, source.path))
    torch_dtype = dtype
    check_host_memory(source, torch_dtype)  # the whole model is about to be held in memory
    try:
        config = AutoConfig.from_pretrained(str(source.path), trust_remote_code=trust_remote_code)
        extra: dict[str, Any] = {}
        if getattr(config, "quantization_config", None) is not None:  # e.g. a pack-quantized checkpoint
            from prunekit.packing import prepare_loading

            extra = prepare_loading(config.quantization_config, source.spec)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="You passed `quantization_config`")  # loading attributes only
            model = AutoModelForCausalLM.from_pretrained(
                str(source.path), config=config, dtype=torch_dtype, trust_remote_code=trust_remote_code, **extra
            )
    except ValueError as err:
        raise ModelError(f"cannot load '{source.spec}' as a causal language model: {err}") from err
    model.eval()
    model.config.use_cache = False
    tokenizer = load_tokenizer(source, trust_remote_code) if with_tokenizer else None
    return model, tokenizer, source


def text_config(config):
    """The decoder's own config (multimodal configs nest it as ``text_config``)."""
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def find_decoder_layers(model: torch.nn.Module) -> tuple[str, torch.nn.ModuleList]:
    """Find the list of decoder layers generically: the ModuleList of num_hidden_layers blocks with Linears."""
    n_layers = getattr(text_config(model.config), "num_hidden_layers", None)
    candidates = []
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) > 0:
            if n_layers is not None and len(module) != n_layers:
                continue
            if any(isinstance(m, torch.nn.Linear) for m in module[0].modules()):
                candidates.append((name, module))
    if not candidates:
        raise ModelError(f"could not find the decoder layers of {type(model).__name__}")
    return min(candidates, key=lambda item: item[0].count("."))


def linear_sublayers(layer: torch.nn.Module) -> dict[str, torch.nn.Linear]:
    return {name: m for name, m in layer.named_modules() if isinstance(m, torch.nn.Linear)}


def layer_output(output: Any) -> torch.Tensor:
    """A decoder layer's hidden state: ``out[0]`` for layers that return tuples."""
    return output[0] if isinstance(output, (tuple, list)) else output


@contextlib.contextmanager
def layer_hooks(model: torch.nn.Module, callback: Callable[[int, torch.Tensor], None]) -> Iterator[int]:
    """Call ``callback(index, hidden [B, T, d])`` with the output of every decoder layer; yields the layer count."""
    _, layers = find_decoder_layers(model)
    handles = [
        layer.register_forward_hook(lambda module, args, out, i=i: callback(i, layer_output(out)))
        for i, layer in enumerate(layers)
    ]
    try:
        yield len(layers)
    finally:
        for handle in handles:
            handle.remove()


_FINGERPRINTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def tokenizer_fingerprint(tokenizer) -> str:
    """A content hash of a tokenizer (vocabulary, merges, normalizer, special tokens).

    Serialising a 262k-entry vocabulary takes about a second, so the hash is remembered per
    tokenizer object, keyed also by what ``add_tokens`` / special-token changes alter."""
    special = [tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id]
    state = (len(tokenizer), *special)
    try:
        remembered = _FINGERPRINTS.get(tokenizer)
    except TypeError:  # an object that cannot be weakly referenced: hash it every time
        remembered = None
    if remembered is not None and remembered[0] == state:
        return remembered[1]
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        payload = backend.to_str()
    else:
        payload = json.dumps(sorted(tokenizer.get_vocab().items()))
    fingerprint = hashlib.sha256((payload + json.dumps(special)).encode()).hexdigest()[:16]
    with contextlib.suppress(TypeError):
        _FINGERPRINTS[tokenizer] = (state, fingerprint)
    return fingerprint


def expected_checkpoint_bytes(spec: str, dtype: str) -> int:
    """About how many bytes a checkpoint of ``spec`` saved in ``dtype`` takes: its tensors' elements
    (from the safetensors headers, no weights read) × the dtype's size. 0 when that is unknown without
    downloading or converting (a Hub id or GGUF file not yet in the cache)."""
    spec = str(spec)
    if spec.startswith(EMBEDDED_PREFIX):
        from prunekit.embedded import embedded_model_path

        path = embedded_model_path(spec[len(EMBEDDED_PREFIX):])
    else:
        path = Path(spec).expanduser()
    if not path.is_dir():
        if HUB_ID.match(spec) and not path.suffix:  # the repository's own file sizes, asked of the Hub
            return repository_size(spec, DTYPES[dtype].itemsize if dtype in DTYPES else None)
        return 0
    if dtype == AUTO_DTYPE:  # kept in the base's own dtype: the checkpoint's own size
        for file in path.glob("*.safetensors"):
            check_safetensors(file)
        return sum(f.stat().st_size for f in path.iterdir() if f.is_file())
    if dtype not in DTYPES:
        return 0
    elements = 0
    for file in path.glob("*.safetensors"):
        check_safetensors(file)  # a damaged file is named here rather than failing the estimate
        for name, entry in safetensors_header(file).items():
            if name != "__metadata__":
                elements += int(torch.Size(entry["shape"]).numel())
    others = sum(f.stat().st_size for f in path.iterdir() if f.is_file() and f.suffix != ".safetensors")
    return elements * DTYPES[dtype].itemsize + others


SAFETENSORS_DTYPES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}


def checkpoint_dtype(path: str | Path) -> str:
    """The dtype a model directory holds: config.json's ``dtype``/``torch_dtype`` (the text config's for a
    multimodal config), else the dtype of its floating safetensors tensors; float32 when neither says."""
    path = Path(path)
    config_file = path / "config.json"
    if config_file.exists():
        config = json.loads(config_file.read_text(encoding="utf-8"))
        for section in (config, config.get("text_config") or {}):
            name = section.get("dtype") or section.get("torch_dtype")
            if isinstance(name, str) and name in DTYPES:
                return name
    for file in sorted(path.glob("*.safetensors")):
        for name, entry in sorted(safetensors_header(file).items()):  # safe_open's order: by name
            found = SAFETENSORS_DTYPES.get(entry.get("dtype")) if name != "__metadata__" else None
            if found is not None:
                return found
    return "float32"


def resolve_dtype(dtype: str, path: str | Path) -> str:
    """``auto`` -> the checkpoint's own dtype name; any other name is returned as given."""
    return checkpoint_dtype(path) if dtype == AUTO_DTYPE else dtype


# ---------------------------------------------------------------------------------------------
# Memory checked before a whole-model load: host RAM, and GPU memory for lm-eval tasks
# ---------------------------------------------------------------------------------------------

FORCE_ENV = "PRUNEKIT_FORCE"  # "1": skip the memory checks (what --force does), e.g. for a sweep's workers
_FORCED: contextvars.ContextVar[bool] = contextvars.ContextVar("prunekit_memory_check_forced", default=False)
LOAD_OVERHEAD = 1.10  # beyond the weights: buffers, the loader's bookkeeping, the rest of the process
SAFETENSORS_ITEMSIZE = {"F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2, "I16": 2,
                        "U16": 2, "I8": 1, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}
FLOATING = {"F64", "F32", "F16", "BF16"}


@contextlib.contextmanager
def memory_check_forced(force: bool = True) -> Iterator[None]:
    """Within the block, whole-model loads skip the memory check (``--force``): the user knows better, e.g.
    swap, or memory that another process is about to free."""
    token = _FORCED.set(bool(force) or _FORCED.get())
    try:
        yield
    finally:
        _FORCED.reset(token)


def memory_check_is_forced() -> bool:
    return _FORCED.get() or os.environ.get(FORCE_ENV, "").strip() not in ("", "0")


def available_host_memory() -> int | None:
    """Bytes this process can still get: the OS's available memory, capped by its cgroup's limit (a Slurm
    job's or a container's); None when unknown."""
    free = None
    try:
        import psutil  # accelerate's dependency

        free = int(psutil.virtual_memory().available)
    except (ImportError, OSError):
        pass
    with contextlib.suppress(OSError, ValueError, KeyError):  # cgroup v2; its page cache ("file") can be reclaimed, "anon" not
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit != "max":
            stat = dict(line.split() for line in Path("/sys/fs/cgroup/memory.stat").read_text().splitlines() if line.strip())
            left = int(limit) - int(stat["anon"])
            free = left if free is None else min(free, left)
    return free


def whole_model_bytes(path: str | Path, dtype: torch.dtype | None = None) -> int:
    """The bytes of a model directory's weights held whole in ``dtype`` (None: as stored), from its safetensors
    headers (no weight is read). Integer tensors (packed quantized weights) keep their own size."""
    total = 0
    for file in Path(path).glob("*.safetensors"):
        for name, entry in safetensors_header(file).items():
            if name == "__metadata__" or not isinstance(entry, dict):
                continue
            stored = str(entry.get("dtype"))
            size = dtype.itemsize if dtype is not None and stored in FLOATING else SAFETENSORS_ITEMSIZE.get(stored, 4)
            total += math.prod(entry.get("shape") or [1]) * size
    return total


def _too_big(what: str, need: int, have: int, where: str, advice: list[str]) -> ConfigError:
    options = "; or ".join(advice + ["pass --force to try anyway"])
    return ConfigError(f"{what} needs about {format_size(need)} of {where}, but {format_size(have)} is available; "
                       f"{options}")


def check_host_memory(source: ModelSource, dtype: torch.dtype | None, advice: list[str] | None = None) -> None:
    """Refuse to load ``source`` whole in ``dtype`` when host memory cannot hold it (:func:`memory_check_forced`
    and ``$PRUNEKIT_FORCE`` skip this). Raises ConfigError naming what would fit."""
    if memory_check_is_forced():
        return
    need = int(whole_model_bytes(source.path, dtype) * LOAD_OVERHEAD)
    have = available_host_memory()
    if have is None or need <= have:
        return
    own = checkpoint_dtype(source.path)
    default = [f"stream it a layer at a time in the checkpoint's own dtype ({own}: --dtype auto), which prune, "
               "quantize and eval (perplexity, SNR) do"]
    name = str(dtype).replace("torch.", "") if dtype is not None else own
    raise _too_big(f"loading '{source.spec}' whole in {name}", need, have, "host memory", advice or default)


def check_task_memory(spec: str, dtype: str, device: str, backend: str = "hf", parallelize: bool | None = None) -> None:
    """Before lm-eval tasks (which hold the whole model): host memory for transformers' load and, on a GPU with
    the hf backend, the free memory of the GPU (or of all visible GPUs with ``parallelize``). Raises ConfigError
    saying what would fit: ``--parallelize`` over N GPUs, the vLLM backend with N GPUs, or streaming."""
    if memory_check_is_forced() or backend != "hf":
        return
    source = resolve_model(spec)
    wanted = parse_dtype(resolve_dtype(dtype, source.path))
    stream = ["leave out --tasks: perplexity and SNR stream the model a layer at a time"]
    check_host_memory(source, wanted, stream)
    target = resolve_device(device)
    if target.type != "cuda":
        return
    need = int(whole_model_bytes(source.path, wanted) * LOAD_OVERHEAD)
    count = torch.cuda.device_count()
    spread = count > 1 if parallelize is None else parallelize
    indices = range(count) if spread else [target.index or 0]
    free_total = [torch.cuda.mem_get_info(i) for i in indices]
    have = sum(free for free, _ in free_total)
    if need <= have:
        return
    per_gpu = max(total for _, total in free_total)
    gpus = max(2, math.ceil(need / (0.9 * per_gpu)))
    advice = [f"use --backend vllm with {gpus} GPUs (tensor parallel)"]
    if not spread or count < gpus:
        advice.insert(0, f"spread it with --parallelize over {gpus} GPUs")
    raise _too_big(f"lm-eval tasks on '{source.spec}'", need, have,
                   "GPU memory" + (f" on {len(free_total)} GPUs" if spread else f" on {target}"), advice + stream)
