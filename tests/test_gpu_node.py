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
from prunekit.evaluation.spec import EvaluationSpec
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

def _plan(backend, parallelize, device, task_batch_size, batch_size, path=None, dtype=None, **options):
    """``plan_backend`` of the spec these settings make (the spec is what the suite passes)."""
    from prunekit.evaluation import lm_backend
    from prunekit.evaluation.spec import EvaluationSpec

    spec = EvaluationSpec(backend=backend, parallelize=parallelize, task_batch_size=task_batch_size, batch_size=batch_size, **options)
    return lm_backend.plan_backend(spec, device, path=path, dtype=dtype)



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
    return subprocess.run([sys.executable, "-c", FRESH_LOAD, str(path)], capture_output=True, text=True,
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


# --- §1/§2 lm-eval and vLLM beside prunekit ---------------------------------------------------------


@pytest.fixture
def two_gpus(monkeypatch):
    """A machine with two (faked) GPUs and vllm importable (nothing of either is run)."""
    import importlib.util

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,6")
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == "vllm" else real(name, *a))


def test_the_harness_receives_parallelize_false_unless_asked(tiny_llama, monkeypatch):
    """A whole evaluation on a machine that shows two GPUs: lm-eval's HFLM is made with parallelize=False."""
    import lm_eval.api.registry

    from prunekit.evaluation import EvaluationSpec, evaluate
    from tests.conftest import TEST_DATA

    real_get_model, made = lm_eval.api.registry.get_model, []

    def get_model(name):
        cls = real_get_model(name)

        def make(**kwargs):
            made.append(kwargs)
            return cls(**kwargs)

        return make

    monkeypatch.setattr(lm_eval.api.registry, "get_model", get_model)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)  # visible, not used: the compute device is the CPU
    res = evaluate(tiny_llama, EvaluationSpec(langs="sw", ppl_source=None, tasks="xcopa", task_data=TEST_DATA, limit=2, device="cpu",
                                              chat_template=False), progress=False)
    assert res["tasks"]["xcopa_local_sw"]["status"] == "ok"
    assert len(made) == 1 and made[0]["parallelize"] is False


def test_vllm_settings_model_args_and_one_gpu_of_its_own(tiny_llama, two_gpus):
    from prunekit.evaluation.lm_backend import lm_arguments
    from prunekit.evaluation.spec import EvaluationSpec

    plan = _plan("vllm", None, torch.device("cuda:1"), None, 8, path=tiny_llama, dtype=torch.bfloat16,
                        gpu_memory_utilization=0.5, max_model_len=4096, model_args="enforce_eager=true,swap_space=8,max_model_len=2048")
    assert plan.visible_devices == "6"  # the compute device's GPU alone, not both
    assert lm_arguments(plan, None, None) == {
        "pretrained": str(tiny_llama), "tokenizer": str(tiny_llama), "dtype": "bfloat16", "batch_size": "auto",
        "tensor_parallel_size": 1, "trust_remote_code": False, "gpu_memory_utilization": 0.5,
        "max_model_len": 2048, "enforce_eager": True, "swap_space": 8}  # the user's model_args win
    # The settings' own ranges are checked once, where the EvaluationSpec is made (the CLI's and the sweep's).
    for bad, match in [(dict(gpu_memory_utilization=1.5), r"--gpu-memory-utilization is the fraction .* in \(0, 1\], got 1.5"),
                       (dict(gpu_memory_utilization=0.0), "gpu-memory-utilization"), (dict(max_model_len=0), "max-model-len"),
                       (dict(model_args="enforce_eager"), "key=value")]:
        with pytest.raises(ConfigError, match=match):
            EvaluationSpec(backend="vllm", **bad)
    with pytest.raises(ConfigError, match="vLLM settings"):
        EvaluationSpec(backend="hf", max_model_len=10)
    assert EvaluationSpec(backend="vllm", model_args="enforce_eager=true,swap_space=8").model_args == {"enforce_eager": True, "swap_space": 8}
    with pytest.raises(ConfigError, match="runs on a GPU"):
        _plan("vllm", None, torch.device("cpu"), None, 8, path=tiny_llama)


def test_tensor_parallelism_is_checked_against_the_heads(tmp_path, two_gpus, monkeypatch):
    from prunekit.evaluation.lm_backend import check_tensor_parallel

    llama70b = {"num_attention_heads": 64, "num_key_value_heads": 8}
    for gpus in (1, 2, 4, 8, 16):
        check_tensor_parallel(llama70b, gpus, "Llama-3-70B")
    for gpus in (3, 5, 6):
        with pytest.raises(ConfigError, match=rf"64 attention heads and 8 key/value heads, which do not divide over {gpus}"):
            check_tensor_parallel(llama70b, gpus, "Llama-3-70B")
    check_tensor_parallel({"num_attention_heads": 8, "num_key_value_heads": 1}, 4, "mqa")  # vLLM replicates the one KV head
    model = tmp_path / "m"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"num_attention_heads": 64, "num_key_value_heads": 8}))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1,2")
    with pytest.raises(ConfigError, match="over 3"):
        _plan("vllm", True, torch.device("cuda"), None, 8, path=model)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1,2,3")
    assert _plan("vllm", True, torch.device("cuda"), None, 8, path=model).tensor_parallel == 4


def test_a_packed_checkpoint_goes_to_vllm_in_half_precision(tmp_path, two_gpus):


    model = tmp_path / "packed"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"num_attention_heads": 4, "quantization_config": {"quant_method": "compressed-tensors"}}))
    for given, sent in [(torch.float32, "bfloat16"), (None, "bfloat16"), (torch.float16, "float16"), (torch.bfloat16, "bfloat16")]:
        assert _plan("vllm", None, torch.device("cuda"), None, 8, path=model, dtype=given).dtype == sent
    (model / "config.json").write_text(json.dumps({"num_attention_heads": 4}))
    assert _plan("vllm", None, torch.device("cuda"), None, 8, path=model, dtype=torch.float32).dtype == "float32"


def test_gpu_memory_is_freed_before_the_harness_starts(tiny_llama, monkeypatch):
    from prunekit.evaluation import harness
    from prunekit.evaluation.tasks import TaskCell
    from tests.conftest import TEST_DATA

    calls = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: calls.append("synchronize"))
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: calls.append("empty_cache"))

    def make_lm(*args):
        calls.append("make_lm")
        raise KeyboardInterrupt  # enough: the order is what is checked

    monkeypatch.setattr(harness, "make_lm", make_lm)
    from transformers import AutoTokenizer

    with pytest.raises(KeyboardInterrupt):
        harness.run_tasks(object(), AutoTokenizer.from_pretrained(tiny_llama), [TaskCell("xcopa_local_sw", "xcopa", "sw", "prunekit")],
                          EvaluationSpec(task_data=TEST_DATA, limit=2, chat_template=False))
    assert calls == ["synchronize", "empty_cache", "make_lm"]


def test_vllm_runs_in_a_subprocess_and_finished_tasks_are_kept(tiny_llama, two_gpus, monkeypatch, tmp_path):
    """The vLLM path, with a fake process in place of ``python -m prunekit.evaluation.lm_worker``: the
    request is JSON, the process gets its own CUDA_VISIBLE_DEVICES, finished tasks are kept when it fails."""
    from prunekit.errors import ModelError
    from prunekit.evaluation import harness, lm_backend
    from prunekit.evaluation.tasks import TaskCell
    from tests.conftest import TEST_DATA

    seen = {}

    def fake_run(cmd, env, **kwargs):
        assert cmd[1:3] == ["-m", "prunekit.evaluation.lm_worker"]
        seen.update(request=json.loads(Path(cmd[3]).read_text()), visible=env["CUDA_VISIBLE_DEVICES"])
        row = {"acc,none": 0.5, "acc_stderr,none": 0.1, "alias": "xcopa_local_sw"}
        result = {"results": {"xcopa_local_sw": row}, "versions": {"xcopa_local_sw": 1.0}, "n-samples": {"xcopa_local_sw": {"effective": 2}}}
        Path(cmd[4]).write_text(json.dumps({"task": "xcopa_local_sw", "result": result}) + "\n")
        return subprocess.CompletedProcess(cmd, 1, "", "torch.OutOfMemoryError: CUDA out of memory")

    monkeypatch.setattr(lm_backend, "RUNNER", fake_run)
    monkeypatch.setattr(harness, "make_lm", lambda *a: pytest.fail("vLLM must not be made in this process"))
    plan = _plan("vllm", None, torch.device("cuda"), None, 8, path=tiny_llama, dtype=torch.bfloat16)
    from transformers import AutoTokenizer

    cells = [TaskCell("xcopa_local_sw", "xcopa", "sw", "prunekit"), TaskCell("xcopa_local_zh", "xcopa", "zh", "prunekit")]
    partial = tmp_path / "partial.json"
    with pytest.raises(ModelError, match="failed after 1 task.*out of memory.*--gpu-memory-utilization"):
        harness.run_tasks(None, AutoTokenizer.from_pretrained(tiny_llama), cells, EvaluationSpec(task_data=TEST_DATA, limit=2, chat_template=False),
                          backend=plan, partial=partial, identity={"model": "m"})
    assert seen["visible"] == "4" and seen["request"]["backend"] == "vllm"
    assert seen["request"]["lm_args"]["pretrained"] == str(tiny_llama) and seen["request"]["evaluate"]["limit"] == 2
    assert [c["name"] for c in seen["request"]["cells"]] == ["xcopa_local_sw", "xcopa_local_zh"]
    saved = json.loads(partial.read_text())["tasks"]
    assert list(saved) == ["xcopa_local_sw"] and saved["xcopa_local_sw"]["result"]["metrics"] == {"acc": 0.5}


def test_the_worker_process_runs_the_tasks_for_real(tiny_llama, tmp_path):
    """lm_worker in a real fresh process (with lm-eval's hf model standing in for vLLM, which needs a GPU):
    the JSON request in, one JSON line per finished task out, the same numbers as in this process."""
    from prunekit.evaluation import lm_backend
    from tests.conftest import TEST_DATA

    request = {"backend": "hf", "lm_args": {"pretrained": str(tiny_llama), "batch_size": 4, "device": "cpu"},
               "uses_defaults": False, "task_data": str(TEST_DATA),
               "cells": [{"name": "xcopa_local_sw", "group": "xcopa", "language": "sw", "kind": "prunekit", "note": None}],
               "evaluate": {"num_fewshot": 0, "limit": 3, "bootstrap_iters": 0, "apply_chat_template": False, "random_seed": 0}}
    results = dict(lm_backend.run_worker(request))
    row = results["xcopa_local_sw"]["results"]["xcopa_local_sw"]
    assert 0 <= row["acc,none"] <= 1 and results["xcopa_local_sw"]["n-samples"]["xcopa_local_sw"]["effective"] == 3


# --- §3 the out-of-memory advice names real flags ------------------------------------------------------


@pytest.mark.parametrize("command", ["prune", "quantize", "eval", "compare", "demo"])
def test_out_of_memory_advice_names_only_flags_the_command_has(command, monkeypatch, capsys):
    import re

    from typer.testing import CliRunner

    import prunekit.cli.main  # noqa: F401  (registers every command)
    from prunekit.cli import app as app_module
    from prunekit.cli.main import main

    def oom(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    target = {"prune": "prunekit.pipeline.prune", "quantize": "prunekit.pipeline.prune", "eval": "prunekit.evaluation.evaluate",
              "compare": "prunekit.analysis.compare", "demo": "prunekit.demo.run_demo"}[command]
    monkeypatch.setattr(target, oom)
    if command == "eval":  # eval resolves its checkpoint before choosing its defaults: a model that is there
        from prunekit.models import ModelSource

        monkeypatch.setattr("prunekit.models.resolve_model", lambda spec, revision=None: ModelSource(spec, Path("M"), "local"))
    monkeypatch.setitem(app_module.DEBUG, "enabled", False)
    args = {"prune": ["prune", "M", "--method", "magnitude", "--sparsity", "0.5", "--out", "/tmp/x"],
            "quantize": ["quantize", "M", "--method", "rtn", "--out", "/tmp/x"],
            "eval": ["eval", "M", "--langs", "en", "--no-save"], "compare": ["compare", "A", "B", "--langs", "en,de", "--out", "/tmp/x"], "demo": ["demo", "--out", "/tmp/x"]}[command]
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    line = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and line.startswith("error: out of GPU memory"), line
    flags = set(re.findall(r"--[a-z][a-z-]+", line.split("use less of it:")[1]))
    assert flags, line
    monkeypatch.setenv("COLUMNS", "400")  # rich wraps the help to the terminal's width
    help_text = CliRunner().invoke(app_module.app, [command, "--help"]).output
    for flag in flags:
        assert re.search(rf"{flag}\b", help_text), f"{command}: the advice names {flag}, which it does not have"


# --- §7 the CUDA-only paths, reached on the CPU --------------------------------------------------------


def test_activations_streamed_to_a_gpu_are_pinned_and_fetched_without_blocking(monkeypatch):
    """Engine._store / _fetch for a CUDA compute device with the activations in host memory: the copy is
    made into pinned memory (asked for; this CPU-only torch has no pinned allocator, so the fake hands
    back plain memory) and fetched with a non-blocking copy."""
    import prunekit.engine as engine_module
    from prunekit.engine import Engine
    from prunekit.methods import get_method
    from prunekit.recipe import Pattern, Recipe

    asked, real_empty = [], torch.empty

    def empty(*args, pin_memory=False, **kwargs):
        asked.append(pin_memory)
        return real_empty(*args, **kwargs)

    monkeypatch.setattr(engine_module.torch, "empty", empty)
    engine = Engine(get_method("wanda"), Recipe("wanda", pattern=Pattern(0.5)), device="cuda", activation_device="cpu")
    hidden = torch.randn(2, 8, 16, dtype=torch.bfloat16)
    stored = engine._store(hidden)
    assert asked == [True] and stored.device.type == "cpu" and torch.equal(stored, hidden) and stored.data_ptr() != hidden.data_ptr()
    copies = []
    real_to = torch.Tensor.to
    monkeypatch.setattr(torch.Tensor, "to", lambda self, *a, **k: copies.append((a, k)) or real_to(self, "cpu"))
    assert torch.equal(engine._fetch(stored), hidden)
    assert copies == [((torch.device("cuda"),), {"non_blocking": True})]
    same = Engine(get_method("wanda"), Recipe("wanda", pattern=Pattern(0.5)), device="cpu")
    asked.clear()
    same._store(hidden)
    assert asked == []  # on the CPU nothing is pinned


def test_activation_planning_reads_the_gpus_free_memory(tiny_llama, monkeypatch):
    """pipeline.activation_plan on a (faked) GPU: torch.cuda.mem_get_info decides device or host."""
    from transformers import AutoModelForCausalLM

    from prunekit.pipeline import activation_plan
    from prunekit.streaming import device_available

    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    free = {"bytes": 80 * 10**9}
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (free["bytes"], 80 * 10**9))
    cuda = torch.device("cuda:0")
    assert device_available(cuda) == 80 * 10**9 and device_available(torch.device("cpu")) is None
    assert activation_plan(model, (128, 2048), cuda, statistics=True).where == "device"
    free["bytes"] = 10**6  # 1 MB free: the two 128 × 2048 × 64 fp32 buffers (134 MB) go to pinned host memory
    plan = activation_plan(model, (128, 2048), cuda, statistics=True)
    assert plan.where == "host" and plan.device_type == "cuda"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_the_kthvalue_mask_path_is_the_stable_sort(dtype):
    """Half-precision scores (as on a GPU) take torch.kthvalue instead of numpy's selection: the mask is
    the first k of a stable ascending sort, ties included."""
    from prunekit.methods.masks import lowest_overall, lowest_per_row

    generator = torch.Generator().manual_seed(0)
    scores = (torch.randint(0, 12, (16, 64), generator=generator).float() / 4).to(dtype)  # many ties
    for fraction in (0.25, 0.5, 0.7):
        k = int(64 * fraction)
        expected = torch.zeros(16, 64, dtype=torch.bool)
        expected.scatter_(1, torch.sort(scores.float(), dim=1, stable=True).indices[:, :k], True)
        assert torch.equal(lowest_per_row(scores, fraction), expected)
        overall = lowest_overall(scores, fraction)
        assert int(overall.sum()) == int(scores.numel() * fraction)
        assert scores[overall].float().max() <= scores[~overall].float().min()


def test_the_dense_cache_key_names_the_gpu_model(monkeypatch):
    from prunekit.evaluation.hidden_states import device_key

    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    assert device_key(torch.device("cuda:0")) == "cuda:NVIDIA H100 80GB HBM3"
    assert device_key(torch.device("cpu")) == "cpu"


# --- §5 benchmarks/gpu_check.py ----------------------------------------------------------------------


def test_gpu_check_runs_every_step_on_the_cpu_and_prints_one_json(llama128, tmp_path):
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--device", "cpu", "--tiny", str(llama128)],
                          capture_output=True, text=True, timeout=300, cwd=str(tmp_path))
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout)  # stdout is the JSON and nothing else
    steps = {s["name"]: s for s in report["steps"]}
    assert report["ok"] and report["device"] == "cpu"
    for method in ("wanda", "sparsegpt"):
        assert steps[f"prune tiny {method}"]["status"] == "ok"
        detail = steps[f"perplexity+snr tiny {method} (en,sw)"]["detail"]
        assert set(detail["ppl"]) == {"en", "sw"} and all(v > 1 for v in detail["ppl"].values())
    assert steps["lm-eval hf tiny xcopa --limit 3"]["status"] == "ok"
    assert steps["quantize tiny gptq w4g128 packed"]["detail"]["format"] == "pack-quantized"
    assert steps["load tiny w4 in plain transformers (fresh process)"]["detail"] == {"finite": True, "prunekit": False}
    vllm = steps["lm-eval vllm tiny xcopa --limit 3"]
    assert vllm["status"] == "skipped" and "vllm" in vllm["reason"]  # not installable here
    assert all({"seconds", "peak_gpu_bytes", "predicted_peak_bytes"} <= set(s) for s in report["steps"])


def test_sweep_keys_for_gpus_per_worker_and_vllm(tmp_path, monkeypatch):
    """execution.gpus_per_worker gives each pool worker its own GPUs (and asks lm-eval to spread over them);
    the evaluation's vLLM keys reach prunekit.evaluation and are checked where they are written."""
    import yaml

    from prunekit.placement import worker_environment, worker_plan
    from prunekit.sweep.config import load_config

    raw = yaml.safe_load((ROOT / "configs" / "tiny-example.yaml").read_text())
    raw["execution"]["gpus_per_worker"] = 2
    raw["evaluation"].update(backend="vllm", gpu_memory_utilization=0.8, max_model_len=4096, model_args={"enforce_eager": True})
    config = load_config(raw)
    assert config.gpus_per_worker == 2
    assert {k: config.eval_options[k] for k in ("parallelize", "backend", "gpu_memory_utilization", "max_model_len", "model_args")} == {
        "parallelize": True, "backend": "vllm", "gpu_memory_utilization": 0.8, "max_model_len": 4096, "model_args": {"enforce_eager": True}}
    spec = config.evaluation  # what every eval stage runs: the same settings, in the EvaluationSpec
    assert (spec.parallelize, spec.backend, spec.gpu_memory_utilization, spec.max_model_len, spec.model_args) == (
        True, "vllm", 0.8, 4096, {"enforce_eager": True})
    plan = worker_plan(config.device, None, 4, config.gpus_per_worker)
    envs = [worker_environment({}, plan, slot, ["0", "1", "2", "3"]) for slot in range(plan.workers)]
    assert envs == [{"CUDA_VISIBLE_DEVICES": "0,1", "PRUNEKIT_DEVICE": "cuda:0"}, {"CUDA_VISIBLE_DEVICES": "2,3", "PRUNEKIT_DEVICE": "cuda:0"}]
    default = load_config(yaml.safe_load((ROOT / "configs" / "tiny-example.yaml").read_text()))
    assert default.gpus_per_worker == 1 and "parallelize" not in default.eval_options and default.evaluation.parallelize is False
    for section, key, value, match in [("evaluation", "backend", "tgi", "evaluation.backend"),
                                       ("evaluation", "gpu_memory_utilization", 1.5, "evaluation.gpu_memory_utilization"),
                                       ("execution", "gpus_per_worker", 0, "execution.gpus_per_worker")]:
        bad = yaml.safe_load((ROOT / "configs" / "tiny-example.yaml").read_text())
        bad[section][key] = value
        with pytest.raises(ConfigError, match=match):
            load_config(bad)
