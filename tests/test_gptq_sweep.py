"""A sweep that mixes pruning and GPTQ quantization: one grid, one run identity scheme, one checkpoint format."""

from __future__ import annotations

import json

import pytest
import torch

from prunekit.recipe import Quantization
from tests.conftest import TATOEBA
from tests.test_gptq import check_groups_on_grid

import prunekit.sweep as sweep  # noqa: E402


def test_sweep_grid_mixing_wanda_and_gptq_names_each_run_by_the_identity_its_checkpoint_records(tiny_llama, tmp_path):
    """The sweep's prune stage calls prunekit.prune with the task's fields (evaluation is the sweep's own test)."""
    from safetensors.torch import load_file

    from prunekit.pipeline import prune
    from prunekit.recipe import CalibrationSpec, EngineSpec, OutputSpec

    config = {
        "name": "mixed",
        "models": [{"path": str(tiny_llama)}],
        "methods": ["wanda", "gptq-w4g32", "gptq-w8g32"],
        "calibration": {"sets": ["en"], "source": str(TATOEBA), "nsamples": 4, "seqlen": 32},
        "execution": {"device": "cpu"},
    }
    cfg = sweep.load_config(config)
    runs = {task.method.label: task for task in sweep.expand(cfg).runs}
    assert set(runs) == {"wanda", "gptq-w4g32", "gptq-w8g32"}
    assert runs["gptq-w4g32"].method.quantization == Quantization(4, 32)
    assert runs["gptq-w8g32"].method.kind == "quantize" and runs["gptq-w8g32"].pattern is None
    assert len({task.run_id for task in runs.values()}) == 3

    for label, task in runs.items():
        out = tmp_path / task.run_id
        result = prune(
            task.model.spec, task.method.method, sparsity=task.sparsity, pattern=task.pattern_spec,
            quantization=task.method.quantization,
            calibration=CalibrationSpec(task.calib, cfg.calib_source, cfg.nsamples, cfg.seqlen, task.seed),
            output=OutputSpec(out, task.model.dtype), engine=EngineSpec("cpu"), progress=False,
        )
        record = json.loads((out / "prunekit.json").read_text())
        assert record["run_id"] == result.record["run_id"] == task.run_id  # one identity scheme for both kinds
        saved = load_file(out / "model.safetensors")
        if label == "wanda":
            weight = saved["model.layers.1.mlp.down_proj.weight"]
            assert record["recipe"]["kind"] == "prune"
            assert abs(float((weight == 0).float().mean()) - 0.5) < 1e-6
        else:
            quantization = record["recipe"]["quantization"]
            assert record["recipe"]["kind"] == "quantize" and quantization["group_size"] == 32
            assert quantization["bits"] == task.method.quantization.bits
            # sweeps write pack-quantized checkpoints; the in-memory model holds the fake-quantized weights
            assert record["quantization"]["format"] == "pack-quantized"
            assert saved["model.layers.1.mlp.down_proj.weight_packed"].dtype == torch.int32
            config = json.loads((out / "config.json").read_text())["quantization_config"]
            assert config["config_groups"]["group_0"]["weights"]["num_bits"] == quantization["bits"]
            weight = result.model.model.layers[1].mlp.down_proj.weight.detach()
            groups = [torch.arange(s, s + 32) for s in range(0, weight.shape[1], 32)]
            check_groups_on_grid(weight, groups, quantization["bits"])
