"""Slurm and GPUs, tested here: placement decisions (pure functions) fed the shapes of Llama-3-8B and
Aya-23-35B; a submitit LocalExecutor job interrupted mid-stage is requeued and finishes the run; a
requeued job redoes the stage its earlier run left 'running'; a timeout is never swallowed; two
processes racing a GGUF conversion into one shared cache folder."""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import socket
import threading
import time
from pathlib import Path

import pytest
import yaml

from prunekit.errors import ConfigError
from prunekit.placement import GB, ModelShape, prune_memory_plan, rank_device, slurm_layout, split_for_rank, worker_plan
from tests.conftest import TATOEBA

# From the models' config.json files (meta-llama/Meta-Llama-3-8B, CohereForAI/aya-23-35B).
LLAMA_3_8B = ModelShape("Llama-3-8B", hidden=4096, intermediate=14336, layers=32, heads=32, kv_heads=8, vocab=128256)
AYA_23_35B = ModelShape("Aya-23-35B", hidden=8192, intermediate=22528, layers=40, heads=64, kv_heads=64, vocab=256000)
H100 = 80 * GB


# ---------------------------------------------------------------------------------------------
# Placement: pure functions
# ---------------------------------------------------------------------------------------------


def test_the_shapes_give_the_models_parameter_counts():
    """Decoder layers plus the embeddings (Llama-3 unties its head): 8.03 B and 35.0 B parameters."""
    llama = LLAMA_3_8B.layers * LLAMA_3_8B.layer_params + 2 * LLAMA_3_8B.vocab * LLAMA_3_8B.hidden
    aya = AYA_23_35B.layers * AYA_23_35B.layer_params + AYA_23_35B.vocab * AYA_23_35B.hidden  # tied
    assert llama == pytest.approx(8.03e9, rel=0.002) and aya == pytest.approx(34.98e9, rel=0.002)


@pytest.mark.parametrize("dtype, activation_gb", [("bfloat16", 17.18), ("float32", 34.36)])
def test_llama_3_8b_at_the_studys_128_by_8192_fits_80_gb_with_its_activations_on_the_gpu(dtype, activation_gb):
    for method in ("wanda", "sparsegpt"):
        plan = prune_memory_plan(LLAMA_3_8B, 128, 8192, dtype, method, H100)
        assert plan.activations == 2 * 128 * 8192 * 4096 * (2 if dtype == "bfloat16" else 4)  # 2·N·T·d·bytes
        assert plan.activations / GB == pytest.approx(activation_gb, abs=0.01)
        assert plan.activations_on_gpu and plan.fits and plan.peak < 0.5 * H100, plan.describe()
    assert prune_memory_plan(LLAMA_3_8B, 128, 8192, "float32", "sparsegpt", H100).peak / GB == pytest.approx(39.6, abs=0.5)


def test_aya_23_35b_keeps_fp32_activations_in_pinned_cpu_memory_and_bf16_ones_on_the_gpu():
    fp32 = prune_memory_plan(AYA_23_35B, 128, 8192, "float32", "sparsegpt", H100)
    assert fp32.activations / GB == pytest.approx(68.7, abs=0.1)  # alone almost the whole card
    assert not fp32.activations_on_gpu and fp32.fits and fp32.peak < 20 * GB, fp32.describe()
    assert "pinned CPU memory" in fp32.describe()
    bf16 = prune_memory_plan(AYA_23_35B, 128, 8192, "bfloat16", "sparsegpt", H100)
    assert bf16.activations_on_gpu and bf16.fits, bf16.describe()
    # what the GPU has free decides: the same prune on a card already half full streams its activations
    assert not prune_memory_plan(AYA_23_35B, 128, 8192, "bfloat16", "sparsegpt", 40 * GB).activations_on_gpu


def test_the_solve_of_aya_down_proj_is_the_widest_hessian():
    plan = prune_memory_plan(AYA_23_35B, 128, 8192, "bfloat16", "sparsegpt", H100)
    assert plan.solve >= 4 * 22528**2  # its 22528² fp32 factor
    wanda = prune_memory_plan(AYA_23_35B, 128, 8192, "bfloat16", "wanda", H100)
    assert wanda.statistics < 1e6 < plan.statistics


def test_local_workers_get_one_gpu_each_and_never_share_one():
    four = worker_plan("auto", None, 4)  # default: every GPU, each worker sees only its own, as cuda:0
    assert four.devices == ["cuda:0"] * 4 and four.gpus == [[0], [1], [2], [3]]
    assert worker_plan("cuda", 2, 4) == worker_plan("auto", 2, 4)
    capped = worker_plan("auto", 8, 2)
    assert capped.workers == 2 and capped.gpus == [[0], [1]] and "2 GPU(s) are visible" in capped.warnings[0]
    explicit = worker_plan("cuda:1", 3, 2)  # the config's cuda:1 is kept (environment unchanged), and holds one worker
    assert explicit.devices == ["cuda:1"] and explicit.gpus == [None] and explicit.warnings
    assert worker_plan("cuda:1", None, 2).warnings == []
    assert worker_plan("cpu", None, 4).devices == [None] and worker_plan("cpu", 3, 4).devices == [None] * 3
    assert worker_plan("auto", None, 0).workers == 1 and worker_plan("auto", 2, 0).devices == [None, None]
    pairs = worker_plan("auto", None, 5, gpus_per_worker=2)  # several GPUs per worker only by the user's choice
    assert pairs.workers == 2 and pairs.gpus == [[0, 1], [2, 3]]
    with pytest.raises(ConfigError, match="only 2 GPU"):
        worker_plan("cuda:2", None, 2)
    with pytest.raises(ConfigError, match="no CUDA device"):
        worker_plan("cuda", None, 0)
    with pytest.raises(ConfigError, match="at least 1"):
        worker_plan("auto", -1, 2)
    with pytest.raises(ConfigError, match="gpus_per_worker is 4, but only 2"):
        worker_plan("auto", None, 2, gpus_per_worker=4)


def test_slurm_arrays_run_in_parallel_and_a_multi_gpu_job_runs_one_rank_per_gpu():
    assert slurm_layout(1, 1, None).array_parallelism is None  # no cap of ours: the cluster's scheduler decides
    assert slurm_layout(1, 1, 16).array_parallelism == 16
    four = slurm_layout(4, 2, None)
    assert four.ranks == 4 and four.tasks_per_job == 8
    assert [split_for_rank(list("abcdefgh"), r, 4) for r in range(4)] == [["a", "e"], ["b", "f"], ["c", "g"], ["d", "h"]]
    node = ["0", "1", "2", "3"]  # every rank sees the node's GPUs: each narrows CUDA_VISIBLE_DEVICES to its own
    assert [rank_device("auto", r, node) for r in range(4)] == [("0", "cuda:0"), ("1", "cuda:0"), ("2", "cuda:0"), ("3", "cuda:0")]
    assert rank_device("auto", 1, node, gpus_per_rank=2) == ("2,3", "cuda:0")
    assert rank_device("auto", 3, ["5"]) == (None, "cuda:0")  # the cluster binds one GPU to each task
    assert [rank_device("auto", r, 4) for r in range(4)] == [(None, f"cuda:{r}") for r in range(4)]  # ids unknown: the count
    assert rank_device("cuda:1", 0, node) == (None, None) and rank_device("cpu", 0, node) == (None, None)
    assert rank_device("auto", 0, []) == (None, None)
    assert slurm_layout(4, 1, None, gpus_per_rank=2).ranks == 2
    with pytest.raises(ConfigError, match="gpus_per_worker"):
        slurm_layout(2, 1, None, gpus_per_rank=4)


def test_the_sbatch_script_asks_one_task_per_gpu_and_no_array_cap(tmp_path, monkeypatch):
    pytest.importorskip("submitit")
    from prunekit.sweep.config import load_config
    from prunekit.sweep.backends import submitit_executor

    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "srun").write_text("#!/bin/sh\nexit 0\n")
    (fake / "srun").chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake}{os.pathsep}{os.environ['PATH']}")
    config = load_config(Path(__file__).resolve().parents[1] / "configs" / "study-full-grid.yaml")
    config.slurm.update(gpus_per_node=4)
    executor = submitit_executor(config, tmp_path, max_parallel=None)
    script = executor._executor._make_submission_file_text("python -m prunekit", "uid")
    assert "#SBATCH --gpus-per-node=4" in script and "#SBATCH --ntasks-per-node=4" in script
    assert "array_parallelism" not in executor._executor.parameters or executor._executor.parameters["array_parallelism"] > 1


def test_the_cli_default_is_automatic_parallelism():
    import inspect

    from prunekit.cli.sweep import sweep

    assert inspect.signature(sweep).parameters["max_parallel"].default.default == 0


# ---------------------------------------------------------------------------------------------
# Requeue and timeouts
# ---------------------------------------------------------------------------------------------


def tiny_config(model: Path, **slurm) -> dict:
    return {
        "name": "requeue",
        "models": [{"path": str(model)}],
        "methods": ["sparsegpt"],
        "calibration": {"sets": ["en"], "source": str(TATOEBA), "nsamples": 8, "seqlen": 64, "seeds": [0]},
        "evaluation": {"languages": ["en"], "perplexity_source": str(TATOEBA), "seqlen": 32, "max_windows": 4},
        "execution": {"device": "cpu"},
        "slurm": {"cluster": "local", "time_min": 10, "cpus_per_task": 1, "mem_gb": 4, **slurm},
    }


def read_status(directory: Path, stage: str) -> dict:
    return json.loads((directory / f"{stage}.status.json").read_text())


def test_a_job_interrupted_mid_stage_is_requeued_and_the_resumed_job_finishes_the_run(tiny_llama, tmp_path, monkeypatch):
    """The LocalExecutor job gets submitit's preemption/timeout signal (USR2) while it prunes: submitit
    checkpoints the SweepJob and requeues it; the requeued job redoes the interrupted stage and
    finishes the run. (A plain function is not requeued after a timeout, and its timeout exception used
    to be recorded as the run's failure while the job worked on past its time.)"""
    pytest.importorskip("submitit")
    from prunekit.sweep import expand, load_config, run_sweep

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    config = tiny_config(tiny_llama)  # 10 min: submitit counts any signal in the first 10 min of a job as its timeout
    path = tmp_path / "requeue.yaml"
    path.write_text(yaml.safe_dump(config))
    runs_dir = tmp_path / "runs"
    run_dir = runs_dir / "runs" / expand(load_config(path)).runs[0].run_id
    signalled: dict = {}

    def interrupt_when_pruning() -> None:
        deadline = time.time() + 240
        while time.time() < deadline and not signalled:
            try:
                status = read_status(run_dir, "prune")
            except (OSError, ValueError):
                time.sleep(0.005)
                continue
            if status["state"] == "running" and status["pid"] != os.getpid():
                os.kill(status["pid"], signal.SIGUSR2)
                signalled.update(status)
            time.sleep(0.005)

    watcher = threading.Thread(target=interrupt_when_pruning, daemon=True)
    watcher.start()
    summary = run_sweep(path, runs_dir, executor="slurm", progress=False)
    watcher.join(timeout=5)
    assert signalled, "the prune stage was never seen running"
    assert summary.ok, summary.lines()
    prune = read_status(run_dir, "prune")
    assert prune["state"] == "done" and prune["executions"] == 2 and prune["pid"] != signalled["pid"]
    assert prune["job_id"] == signalled["job_id"]  # the same job, requeued
    assert read_status(run_dir, "eval")["state"] == "done" and (run_dir / "results.json").exists()
    logs = "".join(p.read_text() for p in (runs_dir / "slurm").rglob("*_log.out"))
    assert "Requeued job" in logs, logs[-2000:]
    assert "FAILED" not in (runs_dir / "sweep.log").read_text()


@pytest.fixture
def finished_run(tiny_llama, tmp_path):
    from prunekit.sweep import expand, load_config, run_sweep

    path = tmp_path / "done.yaml"
    path.write_text(yaml.safe_dump(tiny_config(tiny_llama)))
    runs_dir = tmp_path / "runs"
    assert run_sweep(path, runs_dir, progress=False).ok
    config = load_config(path)
    return runs_dir, config, expand(config).runs[0]


def as_submitit_job(monkeypatch, job_id: str, rank: int = 0) -> None:
    monkeypatch.setenv("SUBMITIT_EXECUTOR", "local")
    monkeypatch.setenv("SUBMITIT_LOCAL_JOB_ID", job_id)
    monkeypatch.setenv("SUBMITIT_LOCAL_GLOBALID", str(rank))
    monkeypatch.setenv("SUBMITIT_LOCAL_LOCALID", str(rank))
    monkeypatch.setenv("SUBMITIT_LOCAL_NTASKS", "1")
    monkeypatch.setenv("SUBMITIT_FOLDER", "/nonexistent")


def test_a_requeued_job_redoes_the_stage_its_killed_run_left_running_on_another_node(finished_run, monkeypatch):
    """The node died mid-eval: the status still says 'running' on node-7, heartbeat fresh. The same job,
    requeued on this host, redoes it at once; a different job leaves it alone (busy)."""
    pytest.importorskip("submitit")
    from prunekit.sweep.stages import execute_task
    from prunekit.sweep.state import stage_state

    runs_dir, config, task = finished_run
    directory = runs_dir / "runs" / task.run_id
    status = read_status(directory, "eval")
    status.update(state="running", host="node-7", pid=4321, heartbeat=time.time(), job_id="777_3", job_rank=0)
    (directory / "eval.status.json").write_text(json.dumps(status))
    (directory / "results.json").unlink()

    as_submitit_job(monkeypatch, "999_1")
    assert stage_state(directory, "eval") == "busy"
    assert execute_task(config, runs_dir, task).state == "busy"  # somebody else's live job: left alone
    as_submitit_job(monkeypatch, "777_3", rank=1)
    assert stage_state(directory, "eval") == "busy"  # the same job's other rank is not its earlier run
    as_submitit_job(monkeypatch, "777_3")
    assert stage_state(directory, "eval") == "stale"
    outcome = execute_task(config, runs_dir, task)
    assert outcome.state == "done" and outcome.ran == ["eval"], outcome
    after = read_status(directory, "eval")
    assert after["state"] == "done" and after["host"] == socket.gethostname() and after["executions"] == status["executions"] + 1


def test_a_timeout_is_never_swallowed_as_a_task_failure(finished_run, monkeypatch):
    submitit = pytest.importorskip("submitit")
    from prunekit.sweep import stages

    runs_dir, config, task = finished_run

    def timed_out(*args, **kwargs):
        raise submitit.core.utils.UncompletedJobError("Job not requeued because: timed-out too many times.")

    monkeypatch.setattr(stages, "run_one", timed_out)
    with pytest.raises(submitit.core.utils.UncompletedJobError):
        stages.execute_task(config, runs_dir, task)

    def timed_out_inside_a_lazy_import(*args, **kwargs):  # what transformers makes of it
        try:
            timed_out()
        except Exception as err:
            raise ModuleNotFoundError("Could not import module 'LlamaConfig'") from err

    monkeypatch.setattr(stages, "run_one", timed_out_inside_a_lazy_import)
    with pytest.raises(ModuleNotFoundError):
        stages.execute_task(config, runs_dir, task)

    def requeued(*args, **kwargs):
        raise SystemExit(3)  # what submitit's requeue does in the job (LocalExecutor's code)

    monkeypatch.setattr(stages, "run_one", requeued)
    with pytest.raises(SystemExit):
        stages.execute_task(config, runs_dir, task)


def test_an_interrupted_stage_says_so_in_its_status(tmp_path):
    from prunekit.sweep.state import stage, stage_state

    with pytest.raises(SystemExit):
        with stage(tmp_path, "prune"):
            raise SystemExit(3)
    assert stage_state(tmp_path, "prune") == "failed"
    assert "preempted or ran out of time" in read_status(tmp_path, "prune")["error"]


# ---------------------------------------------------------------------------------------------
# Shared filesystems: one conversion into the shared cache folder
# ---------------------------------------------------------------------------------------------


def _slow_fake_conversion(source: str, target: str, started, log: str) -> None:
    """A stand-in for transformers' GGUF conversion: writes a model dir file by file, slowly."""
    from prunekit.io import publish_directory

    def convert(staging: Path) -> None:
        with open(log, "a") as handle:
            handle.write(f"{os.getpid()}\n")
        started.wait(10)
        for name in ("config.json", "model.safetensors", "tokenizer.json"):
            (staging / name).write_text(json.dumps({"from": source, "pid": os.getpid()}))
            time.sleep(0.2)

    publish_directory(Path(target), convert)


def test_two_processes_racing_a_conversion_into_one_cache_folder_convert_once(tmp_path):
    """Two array tasks on two nodes ask for the same converted model at once: one converts, the other
    waits and uses its result; the folder is whole at every moment it exists, and no staging or
    trash folder is left behind."""
    target = tmp_path / "models" / "gguf-tiny-0123"
    log = tmp_path / "conversions.log"
    ctx = multiprocessing.get_context("spawn")
    started = ctx.Event()
    procs = [ctx.Process(target=_slow_fake_conversion, args=("tiny.gguf", str(target), started, str(log))) for _ in range(2)]
    for proc in procs:
        proc.start()
    time.sleep(1.0)
    started.set()
    seen_partial = False
    while any(p.is_alive() for p in procs):
        if target.exists():  # a reader never sees a half folder
            names = {p.name for p in target.iterdir()}
            seen_partial |= names != {"config.json", "model.safetensors", "tokenizer.json"}
        time.sleep(0.01)
    assert [p.exitcode for p in procs] == [0, 0]
    assert not seen_partial
    assert len(log.read_text().split()) == 1  # converted once
    assert {p.name for p in target.parent.iterdir()} == {target.name, f".{target.name}.lock"}  # no staging, no trash


def test_a_conversion_that_finds_the_target_present_discards_its_own_staging(tmp_path):
    from prunekit.io import publish_directory

    target = tmp_path / "m"
    calls = []

    def convert(staging: Path) -> None:
        calls.append(staging)
        (staging / "config.json").write_text("{}")
        if len(calls) == 1:  # meanwhile, another node published the same model
            other = tmp_path / "other"
            other.mkdir()
            (other / "config.json").write_text('{"other": 1}')
            os.replace(other, target)

    assert publish_directory(target, convert) == target
    assert json.loads((target / "config.json").read_text()) == {"other": 1}  # theirs was kept
    assert not calls[0].exists() and [p.name for p in tmp_path.iterdir() if p.name.startswith(".m.") and "lock" not in p.name] == []
    assert publish_directory(target, convert) == target and len(calls) == 1  # present: nothing converted


def test_a_gguf_file_is_converted_into_the_shared_cache_once(tmp_path, monkeypatch):
    pytest.importorskip("gguf")
    from prunekit import gguf_conversion, models

    converted = []

    def fake_convert(gguf_path: Path, staging: Path) -> None:  # transformers' conversion, minus the minutes
        converted.append(gguf_path)
        (staging / "config.json").write_text("{}")

    monkeypatch.setattr(gguf_conversion, "_convert_gguf_into", fake_convert)
    monkeypatch.setenv("PRUNEKIT_CACHE", str(tmp_path / "cache"))
    source = tmp_path / "tiny.gguf"
    source.write_bytes(b"GGUF")
    first = models._gguf_model_dir(source)
    assert models._gguf_model_dir(source) == first and (first / "config.json").exists() and len(converted) == 1
    shutil_left = [p.name for p in first.parent.iterdir() if p.name.endswith(".partial") or ".old-" in p.name]
    assert shutil_left == []


@pytest.mark.parametrize("device, args, message", [
    ("cuda:1", [], "error: execution.device is cuda:1, but no CUDA device is visible here; use cpu"),
    ("cpu", ["-j", "-2"], "error: --max-parallel must be at least 1 (or 0: automatic), got -2"),
])
def test_a_sweep_that_cannot_be_placed_is_a_user_error_before_any_work(tiny_llama, tmp_path, monkeypatch, device, args, message):
    from typer.testing import CliRunner

    from prunekit.cli.main import app

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # no GPU here, whatever the machine has
    config = tiny_config(tiny_llama)
    config["execution"] = {"device": device}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(config))
    result = CliRunner().invoke(app, ["sweep", str(path), "--runs-dir", str(tmp_path / "runs"), *args])
    assert result.exit_code == 2, result.output
    assert result.output.strip().splitlines()[0] == message
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("arch", ["llama", "gemma3", "qwen2"])
def test_a_shape_read_from_a_config_counts_a_real_layers_linear_weights(tiny_models, arch):
    from transformers import AutoConfig, AutoModelForCausalLM

    from prunekit.models import find_decoder_layers

    config = AutoConfig.from_pretrained(tiny_models[arch])
    shape = ModelShape.from_config(config, arch)
    model = AutoModelForCausalLM.from_pretrained(tiny_models[arch])
    layer = find_decoder_layers(model)[1][0]
    linear = sum(m.weight.numel() for m in layer.modules() if m.__class__.__name__ == "Linear")
    assert shape.layer_params == linear


def test_a_job_with_two_ranks_splits_its_runs_between_them(tiny_llama, tmp_path):
    """What a node with gpus_per_node: 2 runs (tasks_per_node 2), through submitit's LocalExecutor:
    each rank takes its own share of the job's runs, in its own process."""
    submitit = pytest.importorskip("submitit")
    from prunekit.sweep import expand, load_config
    from prunekit.sweep.layout import write_snapshot
    from prunekit.sweep.stages import execute_task
    from prunekit.sweep.slurm_job import SweepJob

    raw = tiny_config(tiny_llama)
    raw["methods"] = ["wanda"]
    raw["calibration"] = dict(raw["calibration"], sets=["en", "de"])
    config = load_config(raw)
    runs_dir = tmp_path / "runs"
    digest = write_snapshot(runs_dir, config)
    grid = expand(config)
    assert execute_task(config, runs_dir, grid.dense[0]).state == "done"
    executor = submitit.AutoExecutor(folder=str(tmp_path / "jobs"), cluster="local")
    executor.update_parameters(timeout_min=10, tasks_per_node=2, nodes=1)
    job = executor.submit(SweepJob(), str(runs_dir), digest, [t.task_id for t in grid.runs])
    results = job.results()
    assert [len(r) for r in results] == [1, 1] and all(r[0]["state"] == "done" for r in results), results
    statuses = [read_status(runs_dir / "runs" / t.run_id, "prune") for t in grid.runs]
    assert sorted(s["job_rank"] for s in statuses) == [0, 1] and statuses[0]["pid"] != statuses[1]["pid"]
    assert statuses[0]["job_id"] == statuses[1]["job_id"] == str(job.job_id)
