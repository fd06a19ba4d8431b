"""Where work goes: which device each sweep worker (local process or Slurm rank) uses, how many
workers run at once, and whether a prune's calibration activations fit on the GPU.

Pure functions of sizes, counts and free memory: the executors and the engine measure (visible
GPUs, ``torch.cuda.mem_get_info()``, the model's config) and call them; the tests feed them the
shapes of real models (Llama-3-8B, Aya-23-35B) and the 80 GB of an A100/H100.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from prunekit.errors import ConfigError

GB = 1000**3
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
HESSIAN_METHODS = ("sparsegpt", "gptq")  # methods that keep an in×in fp32 XᵀX per Linear input
_CUDA = re.compile(r"^cuda(?::(\d+))?$")


# ---------------------------------------------------------------------------------------------
# Workers and devices
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class WorkerPlan:
    """How many workers run at once, the device each one's ``--device auto`` means (None: leave it),
    and the GPUs each one owns: ``gpus[i]`` are indices into the visible GPUs that become worker i's
    whole ``CUDA_VISIBLE_DEVICES`` (None: its environment is left as it is)."""

    workers: int
    devices: list[str | None]
    warnings: list[str] = field(default_factory=list)
    gpus: list[list[int] | None] = field(default_factory=list)


def worker_plan(device: str, requested: int | None, gpus: int, gpus_per_worker: int = 1) -> WorkerPlan:
    """Workers for ``device`` (the config's ``execution.device``) on a machine with ``gpus`` visible GPUs.

    ``requested``: ``--max-parallel`` (None or 0: automatic). A GPU holds one worker: two processes
    on one GPU contend for its memory and run no faster, so asking for more workers than GPUs is
    capped, with a warning. ``auto``/``cuda`` give worker i its own GPU(s): ``gpus_per_worker`` of them
    (``execution.gpus_per_worker``; more than one only by the user's choice, for lm-eval's
    ``parallelize`` or vLLM's tensor parallelism), as the worker's whole ``CUDA_VISIBLE_DEVICES``, so it
    sees them as ``cuda:0`` … and never touches another worker's. An explicit ``cuda:N`` is honoured as
    written (environment unchanged), so it holds one worker. On the CPU (or with no GPU) the workers
    share the cores: automatic means one; more are the user's call.
    """
    auto = requested in (None, 0)
    if requested is not None and requested < 0:
        raise ConfigError(f"--max-parallel must be at least 1 (or 0: automatic), got {requested}")
    if gpus_per_worker < 1:
        raise ConfigError(f"execution.gpus_per_worker must be at least 1, got {gpus_per_worker}")
    match = _CUDA.match(device)
    if device == "cpu" or (device == "auto" and gpus == 0):
        workers = 1 if auto else int(requested)
        return WorkerPlan(workers, [None] * workers, [], [None] * workers)
    if match is None and device != "auto":
        raise ConfigError(f"unknown device '{device}': use auto, cpu or cuda[:i]")
    if gpus == 0:
        raise ConfigError(f"execution.device is {device}, but no CUDA device is visible here; use cpu")
    if match is not None and match.group(1) is not None:  # one named GPU
        index = int(match.group(1))
        if index >= gpus:
            raise ConfigError(f"execution.device is {device}, but only {gpus} GPU(s) are visible (cuda:0 … cuda:{gpus - 1})")
        warnings = [] if auto or requested == 1 else [
            f"--max-parallel {requested} with execution.device {device}: one GPU holds one worker, so 1 worker runs; "
            "set execution.device to auto (or cuda) to use every visible GPU"]
        return WorkerPlan(1, [device], warnings, [None])
    if gpus_per_worker > gpus:
        raise ConfigError(f"execution.gpus_per_worker is {gpus_per_worker}, but only {gpus} GPU(s) are visible")
    fit = gpus // gpus_per_worker
    workers = fit if auto else min(int(requested), fit)
    unit = "GPU(s)" if gpus_per_worker == 1 else f"GPU(s), {gpus_per_worker} per worker,"
    warnings = [] if auto or int(requested) <= fit else [
        f"--max-parallel {requested} but {gpus} {unit} are visible: one GPU holds one worker, so {fit} run at once"]
    owned = [list(range(i * gpus_per_worker, (i + 1) * gpus_per_worker)) for i in range(workers)]
    return WorkerPlan(workers, ["cuda:0"] * workers, warnings, owned)


def worker_environment(env: dict[str, str], plan: WorkerPlan, slot: int, visible: list[str]) -> dict[str, str]:
    """The environment of worker ``slot``: ``CUDA_VISIBLE_DEVICES`` its own GPUs (of the ``visible`` ids
    the parent sees) and ``PRUNEKIT_DEVICE`` what its ``device: auto`` means; otherwise ``env`` as is."""
    env = dict(env)
    if plan.devices[slot] is not None:
        env["PRUNEKIT_DEVICE"] = plan.devices[slot]
    owned = plan.gpus[slot] if slot < len(plan.gpus) else None
    if owned is not None:
        env["CUDA_VISIBLE_DEVICES"] = ",".join(visible[i] for i in owned)
    return env


def rank_device(device: str, local_rank: int, visible: int | list[str], gpus_per_rank: int = 1) -> tuple[str | None, str | None]:
    """The GPU(s) of one Slurm rank (``tasks_per_node`` = GPUs / ``gpus_per_rank``): (its
    ``CUDA_VISIBLE_DEVICES``, what its ``device=auto`` means). ``visible``: the GPU ids this rank sees
    (from ``CUDA_VISIBLE_DEVICES``), or only their count where they are unknown. Every rank sees the
    node's GPUs: it keeps its own (``CUDA_VISIBLE_DEVICES`` narrowed, ``cuda:0``); where only the count
    is known it takes ``cuda:local_rank·gpus_per_rank`` (the environment can no longer be narrowed);
    where the cluster already binds GPUs to tasks it sees only its own: ``cuda:0``. (None, None): leave
    the config's device (cpu, an explicit cuda:N, or no GPU)."""
    count = visible if isinstance(visible, int) else len(visible)
    if device not in ("auto", "cuda") or count == 0:
        return None, None
    first = local_rank * gpus_per_rank
    if count < first + gpus_per_rank:  # bound by the cluster: these are the rank's own
        return None, "cuda:0"
    if isinstance(visible, int):
        return None, f"cuda:{first}"
    return ",".join(visible[first:first + gpus_per_rank]), "cuda:0"


@dataclass(frozen=True)
class SlurmLayout:
    """One Slurm array task (job) per group of runs: ``ranks`` processes, one per GPU, each working
    through its share; ``array_parallelism`` jobs at a time (None: submitit's default, no limit
    of ours)."""

    gpus_per_node: int
    ranks: int
    tasks_per_job: int
    array_parallelism: int | None


def slurm_layout(gpus_per_node: int, runs_per_job: int, max_parallel: int | None, gpus_per_rank: int = 1) -> SlurmLayout:
    """Arrays run in parallel: ``--max-parallel`` caps the jobs running at once (None/0: no cap). A job
    with ``gpus_per_node`` GPUs runs one rank per GPU (per ``gpus_per_rank`` GPUs: the sweep's
    ``execution.gpus_per_worker``), each with ``runs_per_job`` runs."""
    if gpus_per_node and gpus_per_rank > gpus_per_node:
        raise ConfigError(f"execution.gpus_per_worker is {gpus_per_rank}, more than slurm.gpus_per_node ({gpus_per_node})")
    ranks = max(1, gpus_per_node // max(1, gpus_per_rank))
    return SlurmLayout(gpus_per_node, ranks, runs_per_job * ranks, None if not max_parallel else int(max_parallel))


def split_for_rank(items: list, rank: int, ranks: int) -> list:
    """A rank's share of a job's tasks: every ``ranks``-th one, starting at ``rank``."""
    return items[rank::ranks] if ranks > 1 else list(items)


# ---------------------------------------------------------------------------------------------
# Memory: a layer-by-layer prune on one GPU
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelShape:
    """What the memory of a layer-by-layer prune depends on (a decoder-only transformer)."""

    name: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    head_dim: int | None = None

    @classmethod
    def from_config(cls, config: Any, name: str = "model") -> "ModelShape":
        """From a transformers config (``config.json``)."""
        heads = int(config.num_attention_heads)
        return cls(name, int(config.hidden_size), int(config.intermediate_size), int(config.num_hidden_layers), heads,
                   int(getattr(config, "num_key_value_heads", None) or heads), int(config.vocab_size),
                   getattr(config, "head_dim", None))

    @property
    def attention_width(self) -> int:
        return self.heads * (self.head_dim or self.hidden // self.heads)

    @property
    def layer_params(self) -> int:
        d, head_dim = self.hidden, self.head_dim or self.hidden // self.heads
        q, kv = self.attention_width, 2 * self.kv_heads * head_dim
        return d * (q + kv) + q * d + 3 * d * self.intermediate


@dataclass(frozen=True)
class MemoryPlan:
    """Bytes on the GPU at the peak of one layer's prune, and where the calibration activations live."""

    activations: int  # inputs and outputs of the current layer, all N × T tokens: 2·N·T·d·bytes
    layer: int  # one decoder layer's weights
    statistics: int  # per-Linear-input statistics (SparseGPT/GPTQ: fp32 XᵀX)
    solve: int  # one Linear's solve: its fp32 weight copy, mask, and the n×n factor
    forward: int  # one micro-batch through the layer (MLP intermediates, attention with SDPA)
    free: int  # what the GPU had free before the prune
    activations_on_gpu: bool

    @property
    def working_set(self) -> int:
        return self.layer + self.statistics + self.solve + self.forward

    @property
    def peak(self) -> int:
        """GPU bytes at the peak; with the activations in pinned CPU memory, two micro-batches of them
        (in and out) are on the GPU at a time, which ``forward`` already counts."""
        return self.working_set + (self.activations if self.activations_on_gpu else 0)

    @property
    def fits(self) -> bool:
        return self.peak <= self.free

    def describe(self) -> str:
        where = "on the GPU" if self.activations_on_gpu else "in pinned CPU memory, streamed per micro-batch"
        return (f"memory plan: activations {self.activations / GB:.1f} GB {where}; layer {self.layer / GB:.2f} GB, "
                f"statistics {self.statistics / GB:.2f} GB, solve {self.solve / GB:.2f} GB, forward {self.forward / GB:.2f} GB; "
                f"peak {self.peak / GB:.1f} GB of {self.free / GB:.1f} GB free")


HEADROOM = 0.9  # of the free memory: the allocator's fragmentation and CUDA's own workspaces


def prune_memory_plan(shape: ModelShape, nsamples: int, seqlen: int, dtype: str, method: str, free_bytes: int,
                      micro_batch: int = 1) -> MemoryPlan:
    """The GPU memory of pruning ``shape`` layer by layer with ``nsamples`` × ``seqlen`` calibration tokens.

    The activations (each layer's inputs and outputs for every calibration token, 2·N·T·d in the model's
    dtype) stay on the GPU when they fit beside the rest of the working set in ``HEADROOM`` of
    ``free_bytes``, else they are kept in pinned CPU memory and streamed per micro-batch.
    """
    if dtype not in DTYPE_BYTES:
        raise ConfigError(f"unknown dtype '{dtype}'; choose one of: {', '.join(DTYPE_BYTES)}")
    size = DTYPE_BYTES[dtype]
    d, inter = shape.hidden, shape.intermediate
    tokens = nsamples * seqlen
    activations = 2 * tokens * d * size
    layer = shape.layer_params * size
    widest = max(d, inter, shape.attention_width)
    if method in HESSIAN_METHODS:  # XᵀX of the attention input (q/k/v), o_proj's, the MLP input (gate/up) and down_proj's
        statistics = 4 * (2 * d * d + shape.attention_width ** 2 + inter * inter)
        solve = 4 * widest * widest + (4 + 1) * d * inter  # the factor; the fp32 weight and its mask
    else:  # Wanda: one fp32 norm per input column; magnitude: none
        statistics = 4 * (3 * d + inter + shape.attention_width)
        solve = (4 + 1) * d * inter  # scores and mask of the widest Linear
    block = micro_batch * seqlen
    forward = block * size * (4 * d + 3 * inter) + 2 * block * d * size  # MLP + attention intermediates, one batch in/out
    working = layer + statistics + solve + forward
    on_gpu = working + activations <= HEADROOM * free_bytes
    return MemoryPlan(activations, layer, statistics, solve, forward, free_bytes, on_gpu)
