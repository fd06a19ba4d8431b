"""Layer-wise sequential engine: capture, statistics, solve, propagate, one decoder layer at a time.

The engine knows no method: it asks the method for a statistics accumulator per Linear and
for a solve over (weight, statistics, recipe). A layer source gives it each decoder layer on the
compute device in turn and takes it back once solved: ``InMemoryLayers`` moves the layers of a
loaded model; ``prunekit.streaming.StreamedLayers`` reads them from the checkpoint's shards and
writes them to the output's. The calibration activations live on the compute device or in host
memory (``activation_device``) and go to the compute device one micro-batch at a time. The forward
kwargs of every decoder layer (position embeddings, masks; Gemma-3 alternates sliding and full
attention) are captured once from the model's own forward (``prunekit.layer_inputs``), so no
architecture's signature is hard-coded.

How each step runs on this device (micro-batch size, the host allocator, fp32 GEMMs on CPUs without
fast bf16, weight copies, a second solve thread) is ``prunekit.backend``'s: the code here is the same
on a CPU and a GPU.
"""

from __future__ import annotations

import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from prunekit.backend import CPU_BATCH_TOKENS, GPU_BATCH_TOKENS, Backend
from prunekit.errors import ConfigError
from prunekit.layer_inputs import capture_inputs, decoder_of
from prunekit.methods import Method
from prunekit.models import find_decoder_layers, layer_output, linear_sublayers
from prunekit.recipe import Recipe

__all__ = ["CPU_BATCH_TOKENS", "GPU_BATCH_TOKENS", "Engine", "InMemoryLayers", "LayerResult", "ModuleResult",
           "ResumePoint", "capture_layer_inputs", "check_solve_threads", "parse_skip_layers", "run_layer"]

ERROR_TOKENS = 1024  # tokens (whole sequences, at least one) of the first batch the per-Linear error is measured on


class _StopLayer(Exception):
    """Raised by the last statistics hook: the rest of the layer's forward is not needed."""


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


@dataclass
class ResumePoint:
    """Where an interrupted run stopped (``prunekit.staging`` keeps it on disk): the first unfinished layer,
    the results of the layers before it, and the calibration activations entering it (one tensor per
    micro-batch; None for a method without calibration). The layers' forward kwargs are not kept: they
    depend on the sequence shape only and are captured again, as the first run captured them."""

    next_layer: int
    results: list[LayerResult]
    hidden: list[torch.Tensor] | None = None


LayerDone = Callable[[int, "list[torch.Tensor] | None", "list[LayerResult]"], None]


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


def capture_layer_inputs(
    model: torch.nn.Module, input_ids: torch.Tensor, batch_size: int
) -> tuple[list[torch.Tensor], list[dict[str, Any]]]:
    """Inputs of the first decoder layer per micro-batch, and the forward kwargs of every layer
    (``prunekit.layer_inputs``: the model's own forward up to the first layer).

    Kwargs depend on the sequence shape, not on content; they are captured from a batch of one
    and broadcast over the batch dimension.
    """
    _, layers = find_decoder_layers(model)
    decoder = decoder_of(model)
    _, kwargs_per_layer = capture_inputs(decoder, layers, input_ids[:1])
    inputs = [capture_inputs(decoder, layers, input_ids[start : start + batch_size], with_kwargs=False)[0]
              for start in range(0, input_ids.shape[0], batch_size)]
    return inputs, kwargs_per_layer


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
        gemms: str | None = None,
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
        self.backend = Backend(self.device, self.solve_threads, gemms)

    def _store(self, hidden: torch.Tensor) -> torch.Tensor:
        """An activation batch where the activations live (pinned host memory when they stream to a GPU)."""
        if self.activation_device.type == "cpu" and self.device.type == "cuda":
            return torch.empty(hidden.shape, dtype=hidden.dtype, pin_memory=True).copy_(hidden)
        return hidden.to(self.activation_device)

    def _fetch(self, hidden: torch.Tensor) -> torch.Tensor:
        """An activation batch on the compute device."""
        return hidden.to(self.device, non_blocking=True)

    def _batch_size(self, seqlen: int) -> int:
        return self.batch_size or max(1, self.backend.batch_tokens() // seqlen)

    def run(self, model: torch.nn.Module, input_ids: torch.Tensor | None, source=None,
            resume: ResumePoint | None = None, layer_done: LayerDone | None = None) -> list[LayerResult]:
        """Solve every decoder layer of ``model``; ``source`` gives and takes back the layers
        (default: ``InMemoryLayers``, for a model loaded in host memory). ``resume`` starts at its
        layer with its activations (the layers before it are neither read nor solved); ``layer_done(index,
        activations entering the next layer, results so far)`` is called once each layer is written."""
        _, layers = find_decoder_layers(model)
        source = source or InMemoryLayers()
        if self.method.needs_calibration and input_ids is None:
            raise ConfigError(f"method '{self.method.name}' needs calibration data (--calib)")
        start = 0 if resume is None else resume.next_layer
        results = [] if resume is None else list(resume.results[:start])
        if self.progress and start:
            self.progress(start, len(layers))
        if input_ids is None:
            for index, layer in enumerate(layers):
                if index < start:
                    continue
                if index in self.skip_layers:
                    results.append(LayerResult(index, True, 0.0))
                else:
                    source.load(index, layer, self.device)
                    results.append(self._solve_without_data(index, layer))
                    source.done(index, layer)
                    self.backend.release_memory()
                if layer_done is not None:
                    layer_done(index, None, results)
                if self.progress:
                    self.progress(index + 1, len(layers))
            return results
        batch = self._batch_size(input_ids.shape[1])
        self.backend.tune_allocator()
        with torch.no_grad():
            with source.inputs():
                if resume is not None and resume.hidden is not None:  # the kwargs again; the activations as kept
                    _, kwargs_per_layer = capture_inputs(decoder_of(model), layers, input_ids[:1])
                    hidden = list(resume.hidden)
                else:
                    hidden, kwargs_per_layer = capture_layer_inputs(model, input_ids, batch)
            for i in range(len(hidden)):  # one batch at a time: never two copies of every batch
                hidden[i] = self._store(hidden[i])
            self.backend.release_memory()  # the embedding's forward is done
            for index, layer in enumerate(layers):
                if index < start:
                    kwargs_per_layer[index] = None
                    continue
                begin = time.perf_counter()
                kwargs = _to_device(kwargs_per_layer[index], self.device)
                kwargs_per_layer[index] = None  # each layer's kwargs (masks, position embeddings) go with it
                source.load(index, layer, self.device)
                with self.backend.gemms(layer):
                    hidden, result = self._process_layer(index, layer, hidden, kwargs, last=index == len(layers) - 1)
                source.done(index, layer)  # written (when streamed) and released
                del kwargs
                self.backend.release_memory()  # the layer's weights, deltas and intermediates are gone
                result.seconds = time.perf_counter() - begin
                results.append(result)
                if layer_done is not None:
                    layer_done(index, hidden, results)
                if self.progress:
                    self.progress(index + 1, len(layers))
        return results

    def _process_layer(self, index, layer, hidden, kwargs, last: bool = False) -> tuple[list[torch.Tensor], LayerResult]:
        """Statistics on the dense layer, solve, then the solved layer's outputs for the next layer
        (the last layer's outputs feed nothing: only the batch the error is measured on runs)."""
        if index in self.skip_layers:
            return ([] if last else self._propagate(layer, hidden, kwargs, {})[0]), LayerResult(index, True, 0.0)
        statistics = self._collect_statistics(layer, hidden, kwargs)
        self.backend.release_memory()  # the dense forward's intermediates, before the solve's own
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
        ``keep_deltas`` also return W_dense − W_new per Linear (module dtype). Each group's statistics
        (Hessian, factor) go once it is solved. The backend orders the groups and may prepare some on a
        second thread (``Backend.solve_groups``); the results do not depend on it."""
        linears = linear_sublayers(layer)
        groups: dict[int, list[str]] = {}
        for name in linears:
            groups.setdefault(id(statistics.get(name)), []).append(name)
        jobs = [(names, statistics.get(names[0])) for names in groups.values()]
        statistics.clear()
        infos, deltas = {}, {}

        def solve(names, stats):
            weights = [linears[n].weight.detach() for n in names]
            if self.method.solve_group is not None and stats is not None and len(names) > 1:
                return self.method.solve_group(weights, stats, self.recipe)
            # one at a time: each solution is applied (and freed) before the next Linear is solved
            return (self.method.solve(w, stats, self.recipe) for w in weights)

        def apply(names, solutions):
            for name, solution in zip(names, solutions):
                delta = self.backend.replace_weight(linears[name].weight.data, solution.weight, keep_deltas)
                if delta is not None:
                    deltas[name] = delta
                # a quantizer's grids ride along in the module's info until the checkpoint is written
                infos[name] = solution.info if solution.grid is None else {**solution.info, "grid": solution.grid}

        prepare = None if self.method.prepare is None else (lambda stats: self.method.prepare(stats, self.recipe))
        self.backend.solve_groups(jobs, lambda job: linears[job[0][0]].in_features, solve, apply, prepare,
                                  self.method.one_thread)
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
