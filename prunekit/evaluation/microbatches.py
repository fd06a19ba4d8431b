"""Out-of-memory handling of a layer-streamed forward (issue 29 §3): a batch that does not fit is run in
halves, down to one sequence, before the error reaches the user (with the flags that lower memory)."""

from __future__ import annotations

import logging
from typing import Any

import torch

from prunekit.models import layer_output

log = logging.getLogger("prunekit.evaluation.forward")


def is_out_of_memory(err: BaseException) -> bool:
    """Out of GPU memory (``torch.OutOfMemoryError``), or the CPU allocator's failure to allocate."""
    return isinstance(err, torch.OutOfMemoryError) or (
        isinstance(err, RuntimeError) and "can't allocate memory" in str(err))


def _rows(value: Any, start: int, stop: int, rows: int) -> Any:
    """``value`` (a layer kwarg: tensor, tuple of tensors, other) cut to batch rows ``start:stop`` where its
    first dimension is the batch's; shared values (batch dimension 1, no tensor) pass as they are."""
    if isinstance(value, torch.Tensor):
        return value[start:stop] if value.dim() > 0 and value.shape[0] == rows else value
    if isinstance(value, (tuple, list)):
        return type(value)(_rows(v, start, stop, rows) for v in value)
    if isinstance(value, dict):
        return {k: _rows(v, start, stop, rows) for k, v in value.items()}
    return value


class MicroBatches:
    """A layer's forward over one batch that survives running out of memory: it retries with half the
    sequences at a time (down to one), remembers the size that fit for the layers after, and says so once.
    The split runs the same operations on fewer rows, so the numbers agree to rounding, not bit for bit."""

    def __init__(self) -> None:
        self.size: int | None = None

    def layer(self, layer: torch.nn.Module, hidden: torch.Tensor, kwargs: dict[str, Any], device: torch.device) -> torch.Tensor:
        rows = hidden.shape[0]
        while True:
            size = min(self.size or rows, rows)
            try:
                if size >= rows:
                    return layer_output(layer(hidden.to(device), **kwargs))
                return torch.cat([layer_output(layer(hidden[i:i + size].to(device),
                                                     **{k: _rows(v, i, i + size, rows) for k, v in kwargs.items()}))
                                  for i in range(0, rows, size)])
            except (torch.OutOfMemoryError, RuntimeError) as err:
                if not is_out_of_memory(err) or size <= 1:
                    raise
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                self.size = max(1, size // 2)
                log.warning("out of memory with %d sequences per forward; retrying with %d", size, self.size)
