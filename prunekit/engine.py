"""Layer-wise sequential engine: statistics -> solve -> propagate, one decoder layer at a time.

The engine knows no method: it asks the method for a statistics accumulator per Linear and
for a solve over (weight, statistics, recipe). A layer source gives it each decoder layer on the
compute device in turn and takes it back once solved: ``InMemoryLayers`` moves the layers of a
loaded model; ``prunekit.streaming.StreamedLayers`` reads them from the checkpoint's shards and
writes them to the output's. The calibration activations live on the compute device or in host
memory (``activation_device``) and go to the compute device one micro-batch at a time. The forward kwargs of every decoder layer (position
embeddings, masks; Gemma-3 alternates sliding and full attention) are captured once from the
model's own forward, so no architecture's signature is hard-coded.
"""

from __future__ import annotations

import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from prunekit.errors import ConfigError
from prunekit.methods import Method
from prunekit.methods.hessian import one_cpu_thread
from prunekit.models import find_decoder_layers, layer_output, linear_sublayers
from prunekit.recipe import Recipe


CPU_BATCH_TOKENS = 2048  # per micro-batch on the CPU: intermediates stay small enough to be reused, not page-faulted
GPU_BATCH_TOKENS = 8192
ERROR_TOKENS = 1024  # tokens (whole sequences, at least one) of the first batch the per-Linear error is measured on


class _StopLayer(Exception):
    """Raised by the last statistics hook: the rest of the layer's forward is not needed."""


class _StopForward(Exception):
    """Raised by a recorder once it has what it needs: the rest of the model's forward is not run."""


class InMemoryLayers:
    """The layers of a model loaded in host memory: each moves to the compute device for its turn and back."""

    def inputs(self):
        return nullcontext()

    def load(self, index: int, layer: torch.nn.Module, device: torch.device) -> None:
        layer.to(device)

    def done(self, index: int, layer: torch.nn.Module) -> None:
        layer.to("cpu")


@dataclass
class ModuleResult:
    name: str
    shape: tuple[int, int]
    sparsity: float  # fraction of exact zeros after solving
    relative_error: float | None  # ‖(W−W′)X‖²/‖WX‖², X = its inputs in the pruned model, first ERROR_TOKENS tokens
    info: dict[str, Any] = field(default_factory=dict)


@dataclass
class LayerResult:
    index: int
    skipped: bool
    seconds: float
    modules: list[ModuleResult] = field(default_factory=list)


def parse_skip_layers(spec: str | None, num_layers: int) -> set[int]:
    """``first``, ``last`` and/or layer indices (negative counts from the end), comma-separated."""
    if not spec:
        return set()
    skipped = set()
    for part in spec.split(","):
        part = part.strip()
        if part == "first":
            skipped.add(0)
        elif part == "last":
            skipped.add(num_layers - 1)
        else:
            try:
                index = int(part)
            except ValueError:
                raise ConfigError(f"--skip-layers: '{part}' is not 'first', 'last' or a layer index") from None
            if not -num_layers <= index < num_layers:
                raise ConfigError(f"--skip-layers: layer {index} does not exist (the model has {num_layers} layers)")
            skipped.add(index % num_layers)
    return skipped


def _to_device(value: Any, device: torch.device) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, tuple):
        return tuple(_to_device(v, device) for v in value)
    if isinstance(value, list):
        return [_to_device(v, device) for v in value]
    if isinstance(value, dict):
        return {k: _to_device(v, device) for k, v in value.items()}
    return value


@contextmanager
def _layers_replaced_by_recorders(layers: torch.nn.ModuleList, record: Callable[[int, torch.Tensor, dict], None]):
    """Temporarily replace each decoder layer's forward by an identity that records its inputs."""

    def make(index: int):
        def forward(*args, **kwargs):
            hidden = args[0] if args else kwargs.pop("hidden_states")
            record(index, hidden, {k: v for k, v in kwargs.items() if k != "hidden_states"})
            return hidden

        return forward

    for i, layer in enumerate(layers):
        layer.forward = make(i)
    try:
        yield
    finally:
        for layer in layers:
            del layer.forward


def capture_layer_inputs(
    model: torch.nn.Module, input_ids: torch.Tensor, batch_size: int
) -> tuple[list[torch.Tensor], list[dict[str, Any]]]:
    """Inputs of the first decoder layer per micro-batch, and the forward kwargs of every layer.

    Kwargs depend on the sequence shape, not on content; they are captured from a batch of one
    and broadcast over the batch dimension.
    """
    _, layers = find_decoder_layers(model)
    base = model.get_decoder() if hasattr(model, "get_decoder") else model.base_model
    kwargs_per_layer: list[dict[str, Any]] = [{} for _ in layers]
    inputs: list[torch.Tensor] = []

    def record_kwargs(index, hidden, kwargs):
        kwargs.pop("past_key_values", None)
        kwargs.pop("past_key_value", None)
        kwargs["use_cache"] = False
        kwargs_per_layer[index] = kwargs
        if index == len(layers) - 1:  # the final norm and what follows are not needed (nor read, when streaming)
            raise _StopForward

    def record_inputs(index, hidden, kwargs):
        inputs.append(hidden.detach())
        raise _StopForward

    def forward(ids: torch.Tensor) -> None:
        try:
            base(input_ids=ids, use_cache=False)
        except _StopForward:
            pass

    with torch.no_grad():
        with _layers_replaced_by_recorders(layers, record_kwargs):
            forward(input_ids[:1])
        with _layers_replaced_by_recorders(layers, record_inputs):
            for start in range(0, input_ids.shape[0], batch_size):
                forward(input_ids[start : start + batch_size])
    return inputs, kwargs_per_layer


_ALLOCATOR_TUNED = False
MMAP_THRESHOLD = 64 << 20  # blocks above this (Hessians of wide layers, weights) are still mapped and unmapped
TRIM_THRESHOLD = 256 << 20  # free memory kept at the top of the heap for the next batch


def keep_freed_memory() -> None:
    """Let glibc reuse freed large blocks instead of returning them to the kernel.

    By default glibc serves allocations above its (dynamic) mmap threshold with fresh mappings and
    unmaps them on free, and trims free memory at the top of the heap, so the activations of every
    batch are page-faulted in anew (4 KB at a time: ~0.6 s per GB). With a 64 MB mmap threshold
    and a 256 MB trim threshold the activations of one batch reuse the memory of the previous one
    (~10 % less time on the CPU), while big long-lived blocks stay mapped, so the peak memory does
    not grow. Once per process, Linux/glibc only; PRUNEKIT_MALLOC_TUNING=0 turns it off."""
    global _ALLOCATOR_TUNED
    if _ALLOCATOR_TUNED or not sys.platform.startswith("linux") or os.environ.get("PRUNEKIT_MALLOC_TUNING") == "0":
        return
    _ALLOCATOR_TUNED = True
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3
        libc.mallopt(m_mmap_threshold, MMAP_THRESHOLD)
        libc.mallopt(m_trim_threshold, TRIM_THRESHOLD)
    except (OSError, AttributeError):  # not glibc
        pass


_SLOW_HALF_GEMM: dict[torch.dtype, bool] = {}


def half_gemm_is_slow(dtype: torch.dtype, device: torch.device) -> bool:
    """Whether a bf16/fp16 GEMM on this CPU is slower than converting to fp32 and back (CPUs without
    native bf16/fp16 dot products emulate it). Measured once per process on a small GEMM."""
    if device.type != "cpu" or dtype not in (torch.bfloat16, torch.float16):
        return False
    if dtype not in _SLOW_HALF_GEMM:
        x, w = torch.randn(256, 1024).to(dtype), torch.randn(1024, 1024).to(dtype)

        def best(fn) -> float:
            fn()
            times = []
            for _ in range(3):
                start = time.perf_counter()
                fn()
                times.append(time.perf_counter() - start)
            return min(times)

        native = best(lambda: torch.nn.functional.linear(x, w))
        upcast = best(lambda: torch.nn.functional.linear(x.float(), w.float()).to(dtype))
        _SLOW_HALF_GEMM[dtype] = upcast < 0.8 * native
    return _SLOW_HALF_GEMM[dtype]


@contextmanager
def fp32_gemms(layer: torch.nn.Module):
    """Run the layer's Linears as fp32 GEMMs on half-precision inputs and weights, rounding the output
    back to the half dtype: the same products, accumulated in fp32 as a native bf16 GEMM does."""
    linears = list(linear_sublayers(layer).values())

    def make(module: torch.nn.Linear):
        def forward(x: torch.Tensor) -> torch.Tensor:
            bias = None if module.bias is None else module.bias.float()
            return torch.nn.functional.linear(x.float(), module.weight.float(), bias).to(x.dtype)

        return forward

    for module in linears:
        module.forward = make(module)
    try:
        yield
    finally:
        for module in linears:
            del module.forward


def _largest_magnitude(x: torch.Tensor) -> float:
    if x.numel() == 0:
        return 0.0
    low, high = torch.aminmax(x)  # no temporary the size of x, unlike x.abs()
    return max(abs(float(low)), abs(float(high)))


_STRIPE = 64  # rows of the solved weight made contiguous at a time


def _replace_weight(weight: torch.Tensor, new: torch.Tensor, keep_delta: bool) -> torch.Tensor | None:
    """weight ← new, rounded to weight's dtype; with ``keep_delta`` return W − W′ as well.

    ``new`` may be a transposed view (SparseGPT solves [in, out]): a stripe of rows at a time is
    first made contiguous in a small buffer, so the transposition is paid once and the difference
    and the copy run on contiguous memory (~1.5× faster than both on the strided view). For fp32
    weights the difference is kept in fp16 (half the memory, 90 MB a layer of a 2048×5632 Llama; the
    measured relative error moves by ~1e-5), unless max|W| + max|W′| could overflow fp16."""
    delta = None
    if keep_delta:
        dtype = weight.dtype
        if dtype == torch.float32:
            bound = _largest_magnitude(weight) + _largest_magnitude(new)
            dtype = torch.float16 if bound < torch.finfo(torch.float16).max else torch.float32
        delta = torch.empty(weight.shape, dtype=dtype, device=weight.device)
    contiguous = new.is_contiguous()
    buffer = None if contiguous else torch.empty(min(_STRIPE, weight.shape[0]), weight.shape[1], dtype=new.dtype, device=new.device)
    for lo in range(0, weight.shape[0], _STRIPE):
        hi = min(lo + _STRIPE, weight.shape[0])
        stripe = new[lo:hi] if contiguous else buffer[: hi - lo].copy_(new[lo:hi])
        stripe = stripe.to(weight.dtype)
        if delta is not None:
            torch.sub(weight[lo:hi], stripe, out=delta[lo:hi])
        weight[lo:hi].copy_(stripe)
    return delta


def check_solve_threads(solve_threads: int | None) -> int | None:
    if solve_threads is not None and solve_threads < 1:
        raise ConfigError(f"--solve-threads must be >= 1 (got {solve_threads})")
    return solve_threads


def run_layer(layer: torch.nn.Module, hidden: torch.Tensor, kwargs: dict[str, Any]) -> torch.Tensor:
    return layer_output(layer(hidden, **kwargs))


class Engine:
    """Apply one method to every decoder layer of a model, sequentially."""

    def __init__(
        self,
        method: Method,
        recipe: Recipe,
        device: torch.device | str = "cpu",
        skip_layers: set[int] | None = None,
        batch_size: int | None = None,
        progress: Callable[[int, int], None] | None = None,
        error_tokens: int | None = ERROR_TOKENS,
        solve_threads: int | None = None,
        activation_device: torch.device | str | None = None,
    ):
        self.method = method
        self.recipe = recipe
        self.device = torch.device(device)
        self.skip_layers = skip_layers or set()
        self.batch_size = batch_size
        self.progress = progress
        self.error_tokens = error_tokens
        self.solve_threads = check_solve_threads(solve_threads)
        self.activation_device = self.device if activation_device is None else torch.device(activation_device)

    def _store(self, hidden: torch.Tensor) -> torch.Tensor:
        """An activation batch where the activations live (pinned host memory when they stream to a GPU)."""
        if self.activation_device.type == "cpu" and self.device.type == "cuda":
            return torch.empty(hidden.shape, dtype=hidden.dtype, pin_memory=True).copy_(hidden)
        return hidden.to(self.activation_device)

    def _fetch(self, hidden: torch.Tensor) -> torch.Tensor:
        """An activation batch on the compute device."""
        return hidden.to(self.device, non_blocking=True)

    def _batch_size(self, seqlen: int) -> int:
        tokens = GPU_BATCH_TOKENS if self.device.type == "cuda" else CPU_BATCH_TOKENS
        return self.batch_size or max(1, tokens // seqlen)

    def run(self, model: torch.nn.Module, input_ids: torch.Tensor | None, source=None) -> list[LayerResult]:
        """Solve every decoder layer of ``model``; ``source`` gives and takes back the layers
        (default: ``InMemoryLayers``, for a model loaded in host memory)."""
        _, layers = find_decoder_layers(model)
        source = source or InMemoryLayers()
        if self.method.needs_calibration and input_ids is None:
            raise ConfigError(f"method '{self.method.name}' needs calibration data (--calib)")
        if input_ids is None:
            results = []
            for index, layer in enumerate(layers):
                if index in self.skip_layers:
                    results.append(LayerResult(index, True, 0.0))
                else:
                    source.load(index, layer, self.device)
                    results.append(self._solve_without_data(index, layer))
                    source.done(index, layer)
                if self.progress:
                    self.progress(index + 1, len(layers))
            return results
        batch = self._batch_size(input_ids.shape[1])
        keep_freed_memory()
        with torch.no_grad():
            with source.inputs():
                hidden, kwargs_per_layer = capture_layer_inputs(model, input_ids, batch)
            for i in range(len(hidden)):  # one batch at a time: never two copies of every batch
                hidden[i] = self._store(hidden[i])
            results = []
            for index, layer in enumerate(layers):
                start = time.perf_counter()
                kwargs = _to_device(kwargs_per_layer[index], self.device)
                source.load(index, layer, self.device)
                dtype = next(layer.parameters()).dtype
                gemms = fp32_gemms(layer) if half_gemm_is_slow(dtype, self.device) else nullcontext()
                with gemms:
                    hidden, result = self._process_layer(index, layer, hidden, kwargs, last=index == len(layers) - 1)
                source.done(index, layer)
                result.seconds = time.perf_counter() - start
                results.append(result)
                if self.progress:
                    self.progress(index + 1, len(layers))
        return results

    def _process_layer(self, index, layer, hidden, kwargs, last: bool = False) -> tuple[list[torch.Tensor], LayerResult]:
        """Statistics on the dense layer, solve, then the solved layer's outputs for the next layer
        (the last layer's outputs feed nothing: only the batch the error is measured on runs)."""
        if index in self.skip_layers:
            return ([] if last else self._propagate(layer, hidden, kwargs, {})[0]), LayerResult(index, True, 0.0)
        statistics = self._collect_statistics(layer, hidden, kwargs)
        infos, deltas = self._solve_layer(layer, statistics, keep_deltas=bool(self.error_tokens))
        del statistics
        if last:  # only the sequences the error is measured on
            hidden = [hidden[0][: self._error_rows(hidden)]] if deltas else []
        hidden, errors = self._propagate(layer, hidden, kwargs, deltas)
        return hidden, LayerResult(index, False, 0.0, self._module_results(layer, infos, errors))

    def _collect_statistics(self, layer, hidden, kwargs) -> dict[str, Any]:
        """Run the dense layer over every batch, feeding each Linear's input to its statistics.

        Linears that receive the very same input tensor (q/k/v, gate/up) share one statistics
        object, updated once per batch. The forward of a batch stops as soon as every Linear has
        seen its input: the rest of the layer (e.g. the down projection) is not needed.
        """
        if not self.method.needs_calibration:
            return {}
        linears = linear_sublayers(layer)
        statistics: dict[str, Any] = {}
        leader: dict[str, str] = {}  # name -> the Linear whose statistics it shares (itself if none)
        seen: dict[str, torch.Tensor] = {}  # this batch: name -> the input it received

        def hook(name):
            def pre_hook(module, args):
                x = args[0]
                if name not in leader:  # first batch: find a Linear that already got this very tensor
                    leader[name] = next((n for n, t in seen.items() if t is x and leader[n] == n), name)
                    if leader[name] == name:
                        statistics[name] = self.method.new_statistics(module.in_features, self.device)
                    else:
                        statistics[name] = statistics[leader[name]]
                if leader[name] == name:
                    statistics[name].update(x.detach())
                elif seen.get(leader[name]) is not x:
                    raise RuntimeError(f"{name} shared its input with {leader[name]} in the first batch but not later")
                seen[name] = x
                if len(seen) == len(linears):
                    raise _StopLayer

            return pre_hook

        handles = [m.register_forward_pre_hook(hook(name)) for name, m in linears.items()]
        try:
            for h in hidden:
                seen.clear()
                try:
                    run_layer(layer, self._fetch(h), kwargs)
                except _StopLayer:
                    pass
        finally:
            seen.clear()
            for handle in handles:
                handle.remove()
        for name, module in linears.items():  # a Linear no batch reached keeps empty statistics
            if name not in statistics:
                statistics[name] = self.method.new_statistics(module.in_features, self.device)
        return statistics

    def _solve_layer(self, layer, statistics, keep_deltas: bool = False):
        """Solve every Linear (those sharing statistics together, when the method can); with
        ``keep_deltas`` also return W_dense − W_new per Linear (module dtype).

        For a method with a ``prepare`` step (SparseGPT's factorisations), on a multi-core CPU, a
        second thread prepares the groups with the widest inputs (the longest factorisations) while
        this one solves the others, narrowest first, preparing them itself; the helper then copies
        the solved weights back. A solve is Python-driven (a column loop): two at once would contend
        for the GIL, so only one runs at a time.
        ``solve_threads=1`` turns the second thread off. The results do not depend on it."""
        linears = linear_sublayers(layer)
        groups: dict[int, list[str]] = {}
        for name in linears:
            groups.setdefault(id(statistics.get(name)), []).append(name)
        jobs = []
        for names in groups.values():
            jobs.append((names, statistics.get(names[0])))
            for name in names:  # each group's statistics (Hessian, factor) go once it is solved
                statistics.pop(name, None)
        infos, deltas = {}, {}

        def solve(names, stats):
            weights = [linears[n].weight.detach() for n in names]
            if self.method.solve_group is not None and stats is not None and len(names) > 1:
                return self.method.solve_group(weights, stats, self.recipe)
            # one at a time: each solution is applied (and freed) before the next Linear is solved
            solutions = (self.method.solve(w, stats, self.recipe) for w in weights)
            return list(solutions) if ahead else solutions

        def apply(names, solutions):
            for name, solution in zip(names, solutions):
                delta = _replace_weight(linears[name].weight.data, solution.weight, keep_deltas)
                if delta is not None:
                    deltas[name] = delta
                # a quantizer's grids ride along in the module's info until the checkpoint is written
                infos[name] = solution.info if solution.grid is None else {**solution.info, "grid": solution.grid}

        def prepare(stats) -> None:  # returns nothing: a finished future must not keep the factor alive
            self.method.prepare(stats, self.recipe)

        threads = min(torch.get_num_threads(), self.solve_threads or torch.get_num_threads())
        ahead = self.device.type == "cpu" and self.method.prepare is not None and threads > 1 and len(jobs) > 1
        jobs.sort(key=lambda job: linears[job[0][0]].in_features)  # preparation (a factorisation) grows with it
        # one torch/BLAS thread throughout when two run: the thread count is process-wide, and each would
        # otherwise restore the other's on leaving its own single-threaded stretch
        with one_cpu_thread(self.device) if ahead else nullcontext(), ThreadPoolExecutor(max_workers=1) if ahead else nullcontext() as helper:
            # the helper prepares the costliest first; this thread solves the cheapest first and
            # prepares itself whatever the helper has not started yet
            prepared, applied = {}, []
            for _, stats in reversed(jobs) if ahead else ():
                if stats is not None:
                    prepared[id(stats)] = helper.submit(prepare, stats)
            while jobs:
                names, stats = jobs.pop(0)
                ready = prepared.pop(id(stats), None)
                if ready is not None and not ready.cancel():
                    ready.result()
                solutions = solve(names, stats)
                if ahead:  # copying the weights back runs on the helper too, once it is free
                    applied.append(helper.submit(apply, names, solutions))
                else:
                    apply(names, solutions)
                del stats, ready, solutions
            for done in applied:
                done.result()
        return infos, deltas

    def _error_rows(self, hidden: list[torch.Tensor]) -> int:
        """How many sequences of the first batch the per-Linear error is measured on."""
        first = hidden[0]
        seqlen = first.shape[1] if first.dim() == 3 else first.shape[0]
        return min(first.shape[0], max(1, -(-self.error_tokens // seqlen)))

    def _propagate(self, layer, hidden, kwargs, deltas) -> tuple[list[torch.Tensor], dict[str, float]]:
        """Run the solved layer to produce the next layer's inputs, and measure each Linear's relative
        output error ‖(W−W′)X‖²/‖WX‖² on the first ``error_tokens`` tokens: one GEMM per Linear with
        W−W′, since W′X is the Linear's own output (WX = W′X − bias + (W−W′)X)."""
        linears = linear_sublayers(layer)
        errors: dict[str, float] = {}
        rows = self._error_rows(hidden) if deltas else 0

        def hook(name):
            def forward_hook(module, args, output):
                if name not in deltas:  # measured already (a module called twice in one forward)
                    return
                x = args[0].detach()
                if x.dim() == 3:
                    x, out = x[:rows], output.detach()[:rows]
                else:  # tokens flattened by the model
                    x, out = x[: self.error_tokens], output.detach()[: self.error_tokens]
                delta = torch.nn.functional.linear(x.float(), deltas[name].float())
                reference = out.float() + delta
                if module.bias is not None:
                    reference -= module.bias.detach().float()
                denominator = reference.square().sum().item()
                errors[name] = delta.square().sum().item() / denominator if denominator > 0 else 0.0
                deltas.pop(name)  # measured: W − W′ is not needed any more

            return forward_hook

        outputs = []
        first = True
        while hidden:  # each input batch is released once propagated
            h = self._fetch(hidden.pop(0))
            handles = [m.register_forward_hook(hook(n)) for n, m in linears.items()] if first and deltas else []
            first = False
            try:
                outputs.append(self._store(run_layer(layer, h, kwargs)))
            finally:
                for handle in handles:
                    handle.remove()
            del h
        return outputs, errors

    def _module_results(self, layer, infos, errors) -> list[ModuleResult]:
        results = []
        for name, module in linear_sublayers(layer).items():
            weight = module.weight.detach()
            sparsity = float((weight == 0).sum().item() / weight.numel())
            results.append(ModuleResult(name, tuple(weight.shape), sparsity, errors.get(name), infos.get(name, {})))
        return results

    def _solve_without_data(self, index: int, layer) -> LayerResult:
        start = time.perf_counter()
        if index in self.skip_layers:
            return LayerResult(index, True, 0.0)
        infos, _ = self._solve_layer(layer, {})
        return LayerResult(index, False, time.perf_counter() - start, self._module_results(layer, infos, {}))
