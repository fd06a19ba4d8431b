"""Layer 0's inputs and every decoder layer's keyword arguments, from the model's own forward.

Pruning (``prunekit.engine``) and the layer-by-layer forward of evaluation and analysis
(``prunekit.evaluation.forward``) both start the same way: the token ids go through the decoder's own
forward with each decoder layer replaced by a recorder. The first recorder sees layer 0's input exactly
as the model computes it (the embedding, Gemma's scaling and all); each recorder sees its layer's keyword
arguments (attention masks per layer type, rotary position embeddings), so no architecture's signature
is hard-coded. The last recorder stops the forward: the final norm and the LM head are never run (nor
read, when the weights stream from disk).
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator

import torch


class StopForward(Exception):
    """Raised by a recorder once it has what it needs: the rest of the decoder's forward is not run."""


def decoder_of(model: torch.nn.Module) -> torch.nn.Module:
    """The model without its LM head (its output is the final, normed hidden state)."""
    if hasattr(model, "get_decoder"):
        decoder = model.get_decoder()
        if decoder is not None and decoder is not model:
            return decoder
    return model.base_model


@contextlib.contextmanager
def layers_replaced(layers: torch.nn.ModuleList, make: Callable[[int], Callable[..., Any]]) -> Iterator[None]:
    """Temporarily replace each decoder layer's forward by ``make(index)``."""
    for index, layer in enumerate(layers):
        layer.forward = make(index)
    try:
        yield
    finally:
        for layer in layers:
            del layer.forward


def capture_inputs(
    decoder: torch.nn.Module,
    layers: torch.nn.ModuleList,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    with_kwargs: bool = True,
) -> tuple[torch.Tensor, list[dict[str, Any]]]:
    """Layer 0's input for ``input_ids`` (on the decoder's device) and, ``with_kwargs``, the keyword
    arguments of every decoder layer (cache arguments dropped, ``use_cache=False``). Without kwargs the
    forward stops at layer 0 and the list holds empty dicts."""
    first: list[torch.Tensor] = []
    kwargs: list[dict[str, Any]] = [{} for _ in layers]
    last = len(layers) - 1 if with_kwargs else 0

    def make(index: int):
        def record(*args, **kw):
            hidden = args[0] if args else kw.pop("hidden_states")
            if index == 0:
                first.append(hidden.detach())
            if with_kwargs:
                kw.pop("past_key_values", None)
                kw.pop("past_key_value", None)
                kw["use_cache"] = False
                kwargs[index] = kw
            if index == last:
                raise StopForward
            return hidden

        return record

    with torch.no_grad(), layers_replaced(layers, make), contextlib.suppress(StopForward):
        mask = {} if attention_mask is None else {"attention_mask": attention_mask}
        decoder(input_ids=input_ids, use_cache=False, **mask)
    return first[0], kwargs
