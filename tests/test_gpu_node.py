"""The first GPU node works the first time (issue 29), tested on the CPU: quantized checkpoints load
where users load them, one GPU per worker, lm-eval and vLLM beside prunekit, the CUDA-only paths with
faked CUDA calls, and benchmarks/gpu_check.py --device cpu."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from prunekit.errors import ConfigError
from tests.conftest import TATOEBA, build_tiny_model

ROOT = Path(__file__).resolve().parents[1]

# What a user runs after pulling the checkpoint (the card's usage snippet, hub_cards/serving.md.j2):
# plain transformers, compressed-tensors installed, prunekit never imported.
FRESH_LOAD = r"""
import json, sys
import torch
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(sys.argv[1])
logits = model(torch.tensor([[1, 5, 9, 14, 3]])).logits
print(json.dumps({"finite": bool(torch.isfinite(logits).all()), "shape": list(logits.shape),
                  "prunekit": any(name.startswith("prunekit") for name in sys.modules)}))
"""


@pytest.fixture(scope="module")
def llama128(tokenizer, tmp_path_factory):
    """A tiny Llama whose Linears are multiples of the default group size 128 (so every one is packed)."""
    return build_tiny_model("llama", tokenizer, tmp_path_factory.mktemp("llama128") / "m", hidden_size=128,
                            intermediate_size=256, num_hidden_layers=2)


def quantize_cli(model: Path, out: Path, *extra: str) -> dict:
    from typer.testing import CliRunner

    import prunekit.cli.quantize  # noqa: F401  (registers the command)
    from prunekit.cli.app import app

    result = CliRunner().invoke(app, ["quantize", str(model), "--bits", "4", "--calib-source", str(TATOEBA),
                                      "--nsamples", "4", "--seqlen", "32", "--out", str(out), "--quiet", *extra])
    assert result.exit_code == 0, result.output
    return json.loads((out / "prunekit.json").read_text())


def fresh_load(path: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run([sys.executable, "-c", FRESH_LOAD, str(path)], capture_output=True, text=True, env=env,
                          cwd=str(path.parent), timeout=300)


def test_default_quantize_output_loads_in_a_fresh_process_without_prunekit(llama128, tmp_path):
    record = quantize_cli(llama128, tmp_path / "q")
    q = record["quantization"]
    assert q["symmetric"] and q["format"] == "pack-quantized" and "symmetric W4A16" in q["scheme"]
    config = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    weights = config["config_groups"]["group_0"]["weights"]
    assert (weights["num_bits"], weights["symmetric"], weights["group_size"], weights["strategy"]) == (4, True, 128, "group")
    assert "--symmetric" not in record["command"] and "--asymmetric" not in record["command"]
    ran = fresh_load(tmp_path / "q")
    assert ran.returncode == 0, ran.stderr[-3000:]
    seen = json.loads(ran.stdout.strip().splitlines()[-1])
    assert seen == {"finite": True, "shape": [1, 5, len_vocab(llama128)], "prunekit": False}

    from prunekit.hub import render_model_card

    card = render_model_card(record, repo_id="org/q")
    assert 'model = AutoModelForCausalLM.from_pretrained("org/q")' in card  # the usage snippet is the code run above
    assert "enable_loading" not in card


def len_vocab(model: Path) -> int:
    return json.loads((model / "config.json").read_text())["vocab_size"]


def test_asymmetric_stays_available_and_is_the_study_conventions_choice(llama128, tmp_path):
    asym = quantize_cli(llama128, tmp_path / "asym", "--method", "rtn", "--asymmetric")
    assert not asym["quantization"]["symmetric"] and "asymmetric" in asym["quantization"]["scheme"]
    assert "--asymmetric" in asym["command"]
    study = quantize_cli(llama128, tmp_path / "study", "--method", "rtn", "--conventions", "study")
    assert not study["quantization"]["symmetric"] and "--asymmetric" not in study["command"]
    sym_study = quantize_cli(llama128, tmp_path / "sym-study", "--method", "rtn", "--conventions", "study", "--symmetric")
    assert sym_study["quantization"]["symmetric"] and "--symmetric" in sym_study["command"]


def test_quantize_help_labels_both_grids():
    from typer.testing import CliRunner

    import prunekit.cli.quantize  # noqa: F401
    from prunekit.cli.app import app

    text = " ".join(CliRunner().invoke(app, ["quantize", "--help"], terminal_width=200).output.replace("│", " ").split())
    assert "--symmetric" in text and "--asymmetric" in text and "llm-compressor" in text and "study" in text


# --- §1 one GPU per worker --------------------------------------------------------------------------


def test_two_pool_workers_on_a_two_gpu_machine_each_see_one(tmp_path, monkeypatch):
    """run_pool starts real worker processes (their command swapped for one that reports what it sees) on
    a machine with two (faked) GPUs: each sees exactly one, its own, as cuda:0."""
    from types import SimpleNamespace

    from prunekit.sweep import backends
    from prunekit.sweep.stages import TaskOutcome

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,7")  # the two GPUs this machine shows
    report = "import json, os, sys; print(json.dumps({k: os.environ.get(k) for k in ('CUDA_VISIBLE_DEVICES', 'PRUNEKIT_DEVICE')}))"
    real_popen = subprocess.Popen
    started = []

    def popen(cmd, **kwargs):
        started.append(cmd[-1])
        return real_popen([sys.executable, "-c", report], **kwargs)

    monkeypatch.setattr(backends.subprocess, "Popen", popen)
    monkeypatch.setattr(backends, "outcome_from_disk", lambda config, runs_dir, task, note=None: TaskOutcome(task.task_id, "done"))
    config = SimpleNamespace(device="auto", gpus_per_worker=1)
    tasks = [SimpleNamespace(task_id=f"run:{i}") for i in range(2)]
    outcomes = backends.run_pool(config, tmp_path, tasks, False, "digest", max_parallel=2)
    assert [o.state for o in outcomes] == ["done", "done"] and sorted(started) == ["run:0", "run:1"]
    seen = [json.loads((tmp_path / "logs" / f"run-{i}.log").read_text().strip().splitlines()[-1]) for i in range(2)]
    assert sorted(s["CUDA_VISIBLE_DEVICES"] for s in seen) == ["3", "7"]  # one each, never both
    assert {s["PRUNEKIT_DEVICE"] for s in seen} == {"cuda:0"}


def test_a_slurm_rank_narrows_its_environment_to_its_own_gpu():
    pytest.importorskip("submitit")
    from prunekit.sweep.slurm_job import own_gpus

    for rank, expected in enumerate(["0", "1", "2", "3"]):
        environ = {"CUDA_VISIBLE_DEVICES": "0,1,2,3"}
        own_gpus("auto", rank, environ=environ)
        assert environ == {"CUDA_VISIBLE_DEVICES": expected, "PRUNEKIT_DEVICE": "cuda:0"}
    environ = {"SLURM_JOB_GPUS": "4,5,6,7"}
    own_gpus("auto", 1, gpus_per_rank=2, environ=environ)
    assert environ["CUDA_VISIBLE_DEVICES"] == "6,7" and environ["PRUNEKIT_DEVICE"] == "cuda:0"
    environ = {"CUDA_VISIBLE_DEVICES": "0,1"}
    own_gpus("cpu", 1, environ=environ)
    assert environ == {"CUDA_VISIBLE_DEVICES": "0,1"}  # cpu (or an explicit cuda:N): left as it is
