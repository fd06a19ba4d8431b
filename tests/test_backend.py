"""The engine's device backend (prunekit/backend.py) and the one capture of layer 0's inputs
(prunekit/layer_inputs.py) that pruning and evaluation share."""

from __future__ import annotations

import torch

from prunekit import backend
from prunekit.calibration import build_calibration_set
from prunekit.engine import Engine, capture_layer_inputs
from prunekit.evaluation.forward import Batch, Callback, run_forward
from prunekit.layer_inputs import capture_inputs, decoder_of
from prunekit.methods import get_method
from prunekit.models import find_decoder_layers, load_model
from prunekit.recipe import Recipe, parse_pattern
from tests.conftest import TATOEBA


def test_release_freed_memory_runs_and_is_a_no_op_without_glibc(monkeypatch):
    backend.release_freed_memory()  # glibc here: malloc_trim(0); elsewhere nothing
    monkeypatch.setattr(backend, "_glibc", lambda: None)
    backend.release_freed_memory()


def test_the_engine_gives_freed_memory_back_after_every_layer(tiny_llama, monkeypatch):
    model, tok, _ = load_model(str(tiny_llama))
    ids = build_calibration_set(tok, "de", str(TATOEBA), nsamples=4, seqlen=24, seed=0).input_ids
    _, layers = find_decoder_layers(model)
    released: list[int] = []
    done: list[int] = []

    class Source:
        def inputs(self):
            return torch.no_grad()

        def load(self, index, layer, device):
            pass

        def done(self, index, layer):
            done.append(len(released))

    monkeypatch.setattr(backend.Backend, "release_memory", lambda self: released.append(1))
    engine = Engine(get_method("wanda"), Recipe("wanda", pattern=parse_pattern(0.5)), batch_size=2)
    engine.run(model, ids, Source())
    assert len(done) == len(layers)
    # once after capturing the inputs, then within and after each layer: the last call follows the last layer
    assert len(released) >= 1 + len(layers) and len(released) > done[-1]
    calls_between = [b - a for a, b in zip(done, done[1:] + [len(released)])]
    assert all(n >= 1 for n in calls_between)


def test_solve_groups_one_after_the_other_applies_each_solution_before_the_next_solve():
    events = []

    def solve(names, stats):
        return (events.append(("solve", n)) or n for n in names)  # lazy, as the engine's one-at-a-time solves

    def apply(names, solutions):
        for n, _ in zip(names, solutions):
            events.append(("apply", n))

    jobs = [(["wide"], None), (["narrow_a", "narrow_b"], None)]
    width = {"wide": 2, "narrow_a": 1}
    backend.Backend(torch.device("cpu"), solve_threads=1).solve_groups(jobs, lambda job: width[job[0][0]], solve, apply)
    assert events == [("solve", "narrow_a"), ("apply", "narrow_a"), ("solve", "narrow_b"), ("apply", "narrow_b"),
                      ("solve", "wide"), ("apply", "wide")]


def test_pruning_and_evaluation_capture_the_same_layer_inputs(tiny_llama):
    """The engine's micro-batches and the evaluation forward's first layer see the same tensors."""
    model, tok, _ = load_model(str(tiny_llama))
    ids = build_calibration_set(tok, "de", str(TATOEBA), nsamples=4, seqlen=24, seed=0).input_ids
    inputs, kwargs = capture_layer_inputs(model, ids, batch_size=2)
    _, layers = find_decoder_layers(model)
    seen: list[torch.Tensor] = []

    class First(Callback):
        def before(self, index, batch):
            if index == 0:
                hook = layers[0].register_forward_pre_hook(lambda m, a, k: seen.append((a[0] if a else k["hidden_states"]).clone()),
                                                           with_kwargs=True)
                self.handles.append(hook)

        def layer(self, index, hidden, batch):
            for handle in self.handles:
                handle.remove()
            self.handles.clear()

    consumer = First(lambda index, hidden: None)
    consumer.handles = []
    run_forward(model, [Batch(ids[:2]), Batch(ids[2:])], [consumer], progress=False)
    assert len(seen) == len(inputs) == 2
    for mine, theirs in zip(inputs, seen):
        assert torch.equal(mine, theirs)
    direct, every = capture_inputs(decoder_of(model), layers, ids[:1])
    assert torch.equal(direct, inputs[0][:1])
    assert every[-1].keys() == kwargs[-1].keys() and every[0]["use_cache"] is False
