"""Which lm-eval model runs the downstream tasks, with what arguments, and in which process.

* ``hf`` (default): lm-eval's HFLM on the in-memory model, on the compute device (one GPU);
* ``hf`` with ``parallelize`` (``--parallelize``; in a sweep ``execution.gpus_per_worker`` > 1): HFLM
  loads the checkpoint itself with ``device_map="auto"`` over the GPUs this process owns;
* ``vllm``: lm-eval's vLLM backend loads the checkpoint in a subprocess of its own
  (``prunekit.evaluation.lm_worker``), so vLLM's memory and CUDA context end with it; one GPU (the
  compute device's), or tensor parallel over the GPUs this process owns with ``parallelize``.

A process owns the GPUs its ``CUDA_VISIBLE_DEVICES`` shows: a sweep worker sees only its own, so
``parallelize`` is never on by accident. Tensor parallelism is checked against the model's heads.
"""

from __future__ import annotations

import copy
import gc
import json
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from prunekit.errors import ConfigError, ModelError

BACKENDS = ("hf", "vllm")
HALF = ("bfloat16", "float16")


@dataclass
class BackendPlan:
    """Which lm-eval model runs the tasks, and how (see the module docstring)."""

    backend: str
    parallelize: bool
    batch_size: int | str
    path: Path | None = None
    dtype: str | None = None
    gpus: int = 0  # GPUs the model is spread over (parallelize / tensor parallelism), else 0
    trust_remote_code: bool = False
    tensor_parallel: int = 1
    gpu_memory_utilization: float | None = None
    max_model_len: int | None = None
    model_args: dict[str, Any] = field(default_factory=dict)
    visible_devices: str | None = None  # the vLLM subprocess's CUDA_VISIBLE_DEVICES (None: this process's)

    @property
    def loads_itself(self) -> bool:
        """Whether lm-eval loads the checkpoint from ``path`` (no in-memory model is needed)."""
        return self.backend == "vllm" or self.parallelize

    @property
    def in_subprocess(self) -> bool:
        """vLLM runs in a process of its own: its memory and CUDA context end with it."""
        return self.backend == "vllm"

    def model(self, task_model, device):
        """The in-memory model run_tasks gets (on ``device``), or None when lm-eval loads the checkpoint."""
        if self.loads_itself:
            return None
        model = task_model()
        model.to(device)
        return model

    def describe(self) -> dict[str, Any]:
        return {"name": self.backend, "parallelize": self.parallelize, "gpus": self.gpus if self.loads_itself else None}


def task_batch_size(value: int | str | None, device, fallback: int) -> int | str:
    """lm-eval's batch size: ``auto`` (lm-eval finds the largest that fits) on a GPU; on the CPU the
    perplexity batch size, as before (lm-eval's search probes from 64 windows, too much for host RAM)."""
    if value is None:
        return "auto" if device.type == "cuda" else fallback
    if isinstance(value, int) or (isinstance(value, str) and value.isdigit()):
        if int(value) < 1:
            raise ConfigError(f"--task-batch-size must be at least 1 or 'auto', got {value}")
        return int(value)
    if value == "auto" or (value.startswith("auto:") and value[5:].isdigit()):
        return value
    raise ConfigError(f"--task-batch-size must be a number, 'auto' or 'auto:N' (N re-searches), got '{value}'")


def check_backend(backend: str) -> None:
    """A misspelt --backend fails before anything loads, whether or not tasks are asked for."""
    if backend not in BACKENDS:
        raise ConfigError(f"unknown --backend '{backend}'; choose one of: {', '.join(BACKENDS)}")


def parse_model_args(value: str | dict[str, Any] | None) -> dict[str, Any]:
    """``--model-args``: ``key=value,key=value`` (lm-eval's own syntax; numbers and true/false are
    typed), or a mapping (the sweep's ``evaluation.model_args``)."""
    if value is None or value == "":
        return {}
    if isinstance(value, dict):
        return dict(value)
    args: dict[str, Any] = {}
    for item in str(value).split(","):
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--model-args must be key=value pairs separated by commas (e.g. enforce_eager=true,swap_space=8), got '{item}'")
        args[key.strip()] = _typed(raw.strip())
    return args


def _typed(raw: str) -> Any:
    if raw.lower() in ("true", "false"):
        return raw.lower() == "true"
    for kind in (int, float):
        try:
            return kind(raw)
        except ValueError:
            pass
    return raw


def visible_gpu_ids() -> list[str]:
    """The GPUs this process owns: its ``CUDA_VISIBLE_DEVICES``, else every device torch sees."""
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        return [g.strip() for g in env.split(",") if g.strip() and g.strip() != "-1"]
    import torch

    return [str(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []


def model_config(path: Path | None) -> dict[str, Any]:
    """The checkpoint's config.json (empty when there is none)."""
    if path is None or not (Path(path) / "config.json").is_file():
        return {}
    config = json.loads((Path(path) / "config.json").read_text(encoding="utf-8"))
    return config.get("text_config", config) | {"quantization_config": config.get("quantization_config")}


def check_tensor_parallel(config: dict[str, Any], size: int, name: str) -> None:
    """vLLM splits the attention heads over the GPUs: ``size`` must divide the heads, and the KV heads
    must divide by it or it by them (vLLM replicates KV heads when there are fewer than GPUs)."""
    heads = config.get("num_attention_heads")
    if size <= 1 or not heads:
        return
    kv = config.get("num_key_value_heads") or heads
    if heads % size or (kv % size and size % kv):
        fits = [n for n in range(1, heads + 1) if heads % n == 0 and (kv % n == 0 or n % kv == 0)]
        raise ConfigError(
            f"vLLM's tensor parallelism splits the attention heads over the {size} GPUs this process owns, but {name} has "
            f"{heads} attention heads and {kv} key/value heads, which do not divide over {size}; make CUDA_VISIBLE_DEVICES "
            f"show {', '.join(map(str, fits[-4:]))} GPUs (or drop --parallelize to use one)"
        )


def plan_backend(spec: Any, device, path: str | Path | None = None, dtype=None) -> BackendPlan:  # spec: an EvaluationSpec
    """Check the task backend of ``spec`` against this machine and the checkpoint at ``path`` (None: an
    in-memory model), and choose. ``spec.parallelize`` spreads the model over the GPUs this process owns, only
    when asked. The options' own ranges (``gpu_memory_utilization``, ``max_model_len``, ``model_args``' syntax)
    were checked when ``spec`` was made; ``dtype`` is the model's (torch dtype, None: its own)."""
    backend, parallelize, batch_size, trust_remote_code = spec.backend, spec.parallelize, spec.batch_size, spec.trust_remote_code
    task_batch_size_value, model_args = spec.task_batch_size, spec.model_args
    gpu_memory_utilization, max_model_len = spec.gpu_memory_utilization, spec.max_model_len
    import importlib.util

    import torch

    check_backend(backend)
    parallelize = bool(parallelize)
    extra = parse_model_args(model_args)
    owned = visible_gpu_ids() if torch.cuda.is_available() else []
    if backend == "vllm":
        if importlib.util.find_spec("vllm") is None:
            raise ConfigError("--backend vllm needs the vllm package on this machine: pip install 'prunekit[vllm]' (on a GPU node), "
                              "or use --backend hf")
        if device.type != "cuda":
            raise ConfigError(f"--backend vllm runs on a GPU, but the device is {device}; use --device auto or cuda[:i], or --backend hf")
    if (backend == "vllm" or parallelize) and path is None:
        raise ConfigError(f"--backend {backend}{' --parallelize' if parallelize else ''} loads the checkpoint from "
                          "disk; evaluate a checkpoint directory, not an in-memory model")
    if parallelize and not owned:
        raise ConfigError("--parallelize spreads the model over GPUs, and none is visible; drop --parallelize")
    name = None if dtype is None else str(dtype).replace("torch.", "")
    config = model_config(None if path is None else Path(path))
    tensor_parallel, visible = 1, None
    if backend == "vllm":
        if parallelize:
            tensor_parallel = len(owned)
            check_tensor_parallel(config, tensor_parallel, f"'{path}'")
        elif owned:  # one GPU: the compute device's
            visible = owned[min(device.index or 0, len(owned) - 1)]
        if config.get("quantization_config") and name not in HALF:
            name = "bfloat16"  # vLLM's W4A16 / W8A16 kernels take bf16 or fp16 activations, never float32
    gpus = len(owned) if parallelize else (1 if backend == "vllm" else 0)
    return BackendPlan(backend, parallelize, task_batch_size(task_batch_size_value, device, batch_size),
                       None if path is None else Path(path), name, gpus, trust_remote_code, tensor_parallel,
                       gpu_memory_utilization, max_model_len, extra, visible)


def lm_arguments(plan: BackendPlan, model, tokenizer) -> dict[str, Any]:
    """Keyword arguments of the lm-eval model class of ``plan`` (tests check them without a GPU); the
    user's ``model_args`` come last and win."""
    if plan.backend == "vllm":
        args = {"pretrained": str(plan.path), "tokenizer": str(plan.path), "dtype": plan.dtype or "auto",
                "batch_size": plan.batch_size, "tensor_parallel_size": plan.tensor_parallel,
                "trust_remote_code": plan.trust_remote_code}
        if plan.gpu_memory_utilization is not None:
            args["gpu_memory_utilization"] = plan.gpu_memory_utilization
        if plan.max_model_len is not None:
            args["max_model_len"] = plan.max_model_len
    elif plan.parallelize:
        args = {"pretrained": str(plan.path), "tokenizer": tokenizer, "dtype": plan.dtype or "auto",
                "batch_size": plan.batch_size, "parallelize": True, "trust_remote_code": plan.trust_remote_code}
    else:
        args = {"pretrained": model, "tokenizer": tokenizer, "batch_size": plan.batch_size, "parallelize": False}
    return args | plan.model_args


def make_lm(plan: BackendPlan, model, tokenizer):
    """The lm-eval model object (HFLM or VLLM, from lm-eval's own registry), in this process."""
    from lm_eval.api.registry import get_model

    # HFLM may give the tokenizer a pad token; the object can be shared (models.load_tokenizer), so it gets a copy.
    return get_model(plan.backend)(**lm_arguments(plan, model, copy.deepcopy(tokenizer)))


def free_accelerator_memory() -> None:
    """Give prunekit's cached GPU memory back before lm-eval starts: vLLM sizes its KV cache from the
    memory free on the device, and counts what torch's allocator keeps reserved as taken."""
    gc.collect()
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():  # nothing to give back where CUDA never started
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


# ------------------------------------------------------------------------------ the subprocess

WORKER = [sys.executable, "-m", "prunekit.evaluation.lm_worker"]
RUNNER: Callable[..., subprocess.CompletedProcess] = subprocess.run  # tests put a fake here


def run_worker(request: dict[str, Any], visible_devices: str | None = None) -> Iterator[tuple[str, dict[str, Any]]]:
    """Run ``request`` (backend, lm-eval model arguments, task cells, simple_evaluate settings; JSON only)
    in ``prunekit.evaluation.lm_worker``, a fresh process, and yield (task name, lm-eval's result for
    it) for every task it finished, even when it then failed (the error is raised after them)."""
    env = dict(os.environ)
    if visible_devices is not None:
        env["CUDA_VISIBLE_DEVICES"] = visible_devices
    with tempfile.TemporaryDirectory(prefix="prunekit-lm-") as tmp:
        request_path, results_path = Path(tmp) / "request.json", Path(tmp) / "results.jsonl"
        request_path.write_text(json.dumps(request), encoding="utf-8")
        done = RUNNER([*WORKER, str(request_path), str(results_path)], env=env, stdin=subprocess.DEVNULL,
                      stderr=subprocess.PIPE, text=True)
        lines = results_path.read_text(encoding="utf-8").splitlines() if results_path.exists() else []
        for line in lines:
            entry = json.loads(line)
            yield entry["task"], entry["result"]
    if done.returncode != 0:
        tail = (done.stderr or "").strip().splitlines()[-1:] or [f"exit code {done.returncode}"]
        raise ModelError(f"the {request['backend']} evaluation process failed after {len(lines)} task(s): {tail[0][:300]}; "
                         "finished tasks are kept; for vLLM's memory use see --gpu-memory-utilization and --max-model-len")
