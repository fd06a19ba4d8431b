"""Method registry. The engine asks the registry for a method by name and knows nothing else.

A method is (1) an optional statistics accumulator, one per Linear, updated with the
Linear's inputs, and (2) a solve function over (weight, statistics, recipe) that returns
the new weight and the pruning mask.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, Callable, Protocol

import torch

from prunekit.errors import ConfigError, did_you_mean
from prunekit.recipe import Recipe


class Statistics(Protocol):
    def update(self, x: torch.Tensor) -> None:
        """Accumulate inputs ``x`` of shape [sequences, tokens, in_features] (or [tokens, in_features])."""


@dataclass
class Solution:
    weight: torch.Tensor  # float32, same shape as the input weight
    mask: torch.Tensor | None  # bool, True = pruned; None for quantization
    info: dict  # method-specific diagnostics (e.g. SparseGPT loss, damping used); JSON-serializable
    grid: Any = None  # quantization: the grids the weight lies on (gptq.QuantGrid), for the packed checkpoint


@dataclass(frozen=True)
class Method:
    name: str
    kind: str  # "prune" or "quantize"
    description: str
    new_statistics: Callable[[int, torch.device], Statistics] | None
    solve: Callable[[torch.Tensor, Statistics | None, Recipe], Solution]
    # optional: solve several Linears that share one statistics object (q/k/v, gate/up) at once;
    # must return exactly what ``solve`` returns for each of them
    solve_group: Callable[[list[torch.Tensor], Statistics, Recipe], list[Solution]] | None = None
    # optional: the part of a solve that depends on the statistics alone and runs without the GIL
    # (SparseGPT: factorising the Hessian). On a multi-core CPU the engine prepares the next groups
    # on a second thread while the current group's solve runs; ``solve`` must give the same result
    # whether or not its statistics were prepared.
    prepare: Callable[[Statistics, Recipe], None] | None = None
    # optional, with ``prepare``: a context that puts torch and the libraries the method calls (SparseGPT:
    # scipy's BLAS/LAPACK) on one CPU thread; the engine solves a layer in it while the helper prepares,
    # so that two threads do not each run a pool of their own. No effect on other devices.
    one_thread: Callable[[torch.device], AbstractContextManager] | None = None

    @property
    def needs_calibration(self) -> bool:
        return self.new_statistics is not None


_REGISTRY: dict[str, Method] = {}


def register(method: Method) -> Method:
    """Add ``method`` to the registry under its name.

    Raises:
        ConfigError: another method already has that name (registering the same object again is a no-op,
            so a module imported twice stays harmless).
    """
    existing = _REGISTRY.get(method.name)
    if existing is not None and existing is not method:
        raise ConfigError(f"a method named '{method.name}' is already registered ({existing.kind}: {existing.description}); "
                          f"give the new one another name")
    _REGISTRY[method.name] = method
    return method


def _load_builtins() -> None:
    from prunekit.methods import gptq, magnitude, sparsegpt, wanda  # noqa: F401  (they register themselves)


def get_method(name: str) -> Method:
    _load_builtins()
    if name not in _REGISTRY:
        raise ConfigError(f"unknown method '{name}'{did_you_mean(name, _REGISTRY)}; choose one of: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]


def available_methods(kind: str | None = None) -> list[str]:
    _load_builtins()
    return sorted(name for name, m in _REGISTRY.items() if kind is None or m.kind == kind)
