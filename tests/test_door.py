"""Damaged inputs caught at the door (issue 26 §2), offline answers fast (§4) and memory checked before a
whole-model load (issue 25 §5): each is one `error:` line, exit 2, before any work.

The damaged checkpoints are real files cut short or removed; the unreachable Hub is a closed local port;
the available memory is the one number monkeypatched."""

from __future__ import annotations

import json
import shutil
import socket
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.test_errors import assert_user_error, run


@pytest.fixture
def work(tmp_path) -> Path:
    folder = tmp_path / "work"
    folder.mkdir()
    return folder


@pytest.fixture(scope="module")
def sharded(tiny_llama, tmp_path_factory) -> Path:
    """The tiny Llama saved in several shards with their index, as a Hub download leaves it."""
    from transformers import AutoModelForCausalLM

    out = tmp_path_factory.mktemp("door") / "sharded"
    AutoModelForCausalLM.from_pretrained(tiny_llama).save_pretrained(out, max_shard_size="100KB")
    for file in tiny_llama.iterdir():
        if file.name.startswith("tokenizer"):
            shutil.copy(file, out / file.name)
    assert len(list(out.glob("*.safetensors"))) >= 3
    return out


def copy_of(model: Path, target: Path) -> Path:
    shutil.copytree(model, target)
    return target


def independent_data_end(file: Path) -> int:
    """Where a safetensors file's last tensor ends, read here from the format's definition."""
    raw = file.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    return 8 + n + max(v["data_offsets"][1] for k, v in header.items() if k != "__metadata__")


# --- checked at the door ----------------------------------------------------------------------------


@pytest.mark.parametrize("command", ["prune", "eval"])
def test_a_shard_missing_from_its_index_fails_at_the_door(command, sharded, tmp_path, work):
    model = copy_of(sharded, tmp_path / "model")
    index = json.loads((model / "model.safetensors.index.json").read_text())
    gone = sorted(set(index["weight_map"].values()))[1]
    (model / gone).unlink()
    args = (["prune", model, "--method", "magnitude", "--out", work / "out"] if command == "prune"
            else ["eval", model, "--langs", "en", "--out", work / "results.json"])
    started = time.perf_counter()
    line = assert_user_error(args, gone, "incomplete", "missing", roots=[work, model])
    assert time.perf_counter() - started < 20
    assert "internal error" not in line


def test_a_shard_cut_short_is_named_by_its_own_header(sharded, tmp_path, work):
    from prunekit.errors import ModelError
    from prunekit.models import check_model_files

    model = copy_of(sharded, tmp_path / "model")
    shard = sorted(model.glob("*.safetensors"))[0]
    end = independent_data_end(shard)
    assert end == shard.stat().st_size  # a whole file ends where its header says
    with open(shard, "r+b") as handle:
        handle.truncate(end - 1)
    with pytest.raises(ModelError, match=f"{shard.name} is damaged.*{end}"):
        check_model_files(model)
    assert_user_error(["prune", model, "--method", "magnitude", "--out", work / "out"], shard.name, "damaged",
                      roots=[work])


def test_a_whole_sharded_checkpoint_passes_the_door(sharded):
    from prunekit.models import check_model_files

    assert check_model_files(sharded) == sharded


@pytest.mark.parametrize("layout", ["single", "sharded"])
def test_a_pickle_only_checkpoint_is_refused_with_how_to_convert(layout, tiny_llama, tmp_path, work):
    model = copy_of(tiny_llama, tmp_path / "model")
    weights = load_file(model / "model.safetensors")
    (model / "model.safetensors").unlink()
    if layout == "single":
        torch.save(weights, model / "pytorch_model.bin")
    else:
        names = sorted(weights)
        half = len(names) // 2
        parts = {"pytorch_model-00001-of-00002.bin": names[:half], "pytorch_model-00002-of-00002.bin": names[half:]}
        for file, keys in parts.items():
            torch.save({k: weights[k] for k in keys}, model / file)
        (model / "pytorch_model.bin.index.json").write_text(json.dumps(
            {"metadata": {}, "weight_map": {k: f for f, keys in parts.items() for k in keys}}))
    for command in (["prune", model, "--method", "magnitude", "--out", work / "out"],
                    ["eval", model, "--langs", "en", "--out", work / "results.json"]):
        line = assert_user_error(command, "pickle", "safetensors", "save_pretrained", "safe_serialization=True",
                                 roots=[work, model])
        assert "weights_only" not in line


def test_a_model_directory_without_weights_says_so(tiny_llama, tmp_path, work):
    model = copy_of(tiny_llama, tmp_path / "model")
    (model / "model.safetensors").unlink()
    assert_user_error(["prune", model, "--method", "magnitude", "--out", work / "out"], "has no weights", roots=[work])


# --- offline answers fast ---------------------------------------------------------------------------


@pytest.fixture
def closed_endpoint(monkeypatch) -> str:
    """A local port nothing listens on, as HF_ENDPOINT; retries made slow enough that a test would see one."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    endpoint = f"http://127.0.0.1:{port}"
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_ENDPOINT", endpoint)
    monkeypatch.setenv("HF_TOKEN", "hf_door_test_token")
    monkeypatch.setenv("PRUNEKIT_HUB_RETRIES", "5")
    monkeypatch.setenv("PRUNEKIT_HUB_BACKOFF", "3")
    return endpoint


@pytest.fixture(scope="module")
def checkpoint(tiny_llama, tmp_path_factory) -> Path:
    import prunekit

    out = tmp_path_factory.mktemp("door-ckpt") / "ckpt"
    prunekit.prune(str(tiny_llama), "magnitude", output=prunekit.OutputSpec(out), engine=prunekit.EngineSpec("cpu"),
                   progress=False)
    return out


def test_push_and_pull_to_an_unreachable_endpoint_fail_at_once_naming_it(closed_endpoint, checkpoint, work):
    for args in (["push", checkpoint, "--repo-id", "org/x"], ["pull", "org/x", "--out", work / "pulled"],
                 ["pull", "org/x"]):
        started = time.perf_counter()
        line = assert_user_error(args, closed_endpoint, "connection refused", "network", "HF_ENDPOINT",
                                 roots=[work, checkpoint])
        assert time.perf_counter() - started < 5.0
        assert "try again later" not in line and "hf_door_test_token" not in line


def test_a_name_that_does_not_resolve_is_not_retried(closed_endpoint):
    from prunekit.errors import HubError
    from prunekit.remote import RetryPolicy, hub_call

    calls = []

    def call():
        calls.append(1)
        try:
            raise socket.gaierror(-2, "Name or service not known")
        except socket.gaierror as err:
            raise ConnectionError("connect failed") from err

    with pytest.raises(HubError, match="hub.invalid.*could not be resolved.*HF_ENDPOINT"):
        hub_call("reading org/x", call, repo_id="org/x", endpoint="http://hub.invalid", retry=RetryPolicy(5, 10.0))
    assert calls == [1]


def test_a_reset_connection_is_still_retried(closed_endpoint):
    from prunekit.remote import RetryPolicy, hub_call

    import inspect

    from huggingface_hub.utils import http_backoff

    network_error = inspect.signature(http_backoff).parameters["retry_on_exceptions"].default[1]  # httpx's NetworkError
    calls = []

    def call():
        calls.append(1)
        if len(calls) < 2:
            try:
                raise ConnectionResetError(104, "Connection reset by peer")
            except ConnectionResetError as err:
                raise network_error("reset") from err
        return "ok"

    assert hub_call("reading org/x", call, repo_id="org/x", endpoint="http://hub", retry=RetryPolicy(3, 0.01)) == "ok"
    assert len(calls) == 2


def test_cli_messages_carry_no_hints_for_python_api_users():
    code, err = run(["pull", "a/b/c"])
    assert code == 2 and err.startswith("error: ") and "repo_type" not in err and "argument" not in err, err


# --- sweep state validated, not just present ----------------------------------------------------------



def truncate(path: Path) -> None:
    text = path.read_text()
    path.write_text(text[: len(text) // 2])  # a write cut short


def warnings_in(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("warning:")]


def test_a_truncated_results_json_is_redone_with_one_warning_and_reported(one_thread, tiny_llama, tmp_path):
    from prunekit.report.collect import collect
    from prunekit.sweep import run_sweep
    from tests.test_sweep import cli_sweep, small_config, status

    path = small_config(tiny_llama, tmp_path)
    runs_dir = tmp_path / "runs"
    assert run_sweep(path, runs_dir, progress=False).ok
    run = next((runs_dir / "runs").iterdir())
    prune_before, results_before = status(run, "prune"), json.loads((run / "results.json").read_text())
    truncate(run / "results.json")
    truncate(run / "run.json")
    done = cli_sweep(str(path), "--runs-dir", str(runs_dir))
    assert done.returncode == 0, done.stderr
    warned = warnings_in(done.stderr)
    assert sum("results.json cannot be read" in w and "redone" in w for w in warned) == 1, done.stderr
    assert sum("run.json cannot be read" in w and "written again" in w for w in warned) == 1, done.stderr
    assert "1 completed now · 0 failed" in done.stdout, done.stdout
    assert status(run, "prune") == prune_before  # only the evaluation is redone
    assert status(run, "eval")["executions"] == 2
    redone = json.loads((run / "results.json").read_text())
    assert redone["kind"] == results_before["kind"] and redone.get("perplexity") == results_before.get("perplexity")
    assert json.loads((run / "run.json").read_text())["kind"] == "prunekit-sweep-run"
    collected = collect(runs_dir)
    assert [r.path for r in collected.runs] == [run] and not collected.warnings


def test_results_of_another_kind_count_as_not_done(one_thread, tiny_llama, tmp_path):
    from prunekit.sweep import load_config
    from prunekit.sweep.plan import make_plan
    from prunekit.sweep import run_sweep
    from tests.test_sweep import small_config

    path = small_config(tiny_llama, tmp_path)
    runs_dir = tmp_path / "runs"
    assert run_sweep(path, runs_dir, progress=False).ok
    run = next((runs_dir / "runs").iterdir())
    results = json.loads((run / "results.json").read_text())
    (run / "results.json").write_text(json.dumps(results | {"kind": "prunekit-checkpoint"}))
    states = {type(r.task).__name__: r.states for r in make_plan(load_config(path), runs_dir).rows}
    assert states["RunTask"] == {"prune": "done", "eval": "todo"}
    assert states["DenseTask"] == {"dense": "done"}


def test_a_truncated_config_snapshot_is_rewritten_and_two_workers_complete(one_thread, tiny_llama, tmp_path):
    from prunekit.sweep import load_config
    from tests.test_sweep import cli_sweep, small_config

    path = small_config(tiny_llama, tmp_path, langs=("en", "de"))
    runs_dir = tmp_path / "runs"
    snapshot = runs_dir / "sweeps" / f"{load_config(path).digest}.json"
    snapshot.parent.mkdir(parents=True)
    snapshot.write_text('{"kind": "prunekit-sweep-config", "schema_version": "1.0", "config": {"na')
    import os

    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    os.environ["CUDA_VISIBLE_DEVICES"] = "0,1"  # two "GPUs": -j 2 runs two pool workers (on the CPU: device cpu)
    try:
        done = cli_sweep(str(path), "--runs-dir", str(runs_dir), "-j", "2")
    finally:
        if env is None:
            os.environ.pop("CUDA_VISIBLE_DEVICES")
        else:
            os.environ["CUDA_VISIBLE_DEVICES"] = env
    assert done.returncode == 0, done.stdout + done.stderr
    assert "0 failed" in done.stdout, done.stdout
    assert sum(str(snapshot.name) in w and "written again" in w for w in warnings_in(done.stderr)) == 1, done.stderr
    assert json.loads(snapshot.read_text())["config"]["name"] == "small"
    assert all((run / "results.json").exists() for run in (runs_dir / "runs").iterdir())


def test_report_advice_to_rerun_only_where_a_rerun_fixes_it(one_thread, tiny_llama, tmp_path):
    from prunekit.report.collect import collect
    from prunekit.sweep import run_sweep
    from tests.test_sweep import small_config

    path = small_config(tiny_llama, tmp_path, langs=("en", "de", "sw"))
    runs_dir = tmp_path / "runs"
    assert run_sweep(path, runs_dir, progress=False).ok
    truncated, newer, _ = sorted((runs_dir / "runs").iterdir())
    truncate(truncated / "results.json")  # the sweep redoes its evaluation: say so
    results = json.loads((newer / "results.json").read_text())
    (newer / "results.json").write_text(json.dumps(results | {"schema_version": "2.0"}))  # a newer prunekit's
    warned = {Path(w.split(":")[0].removeprefix("skipped ")).parent.name: w for w in collect(runs_dir).warnings}
    assert "rerun the sweep with its config to redo its evaluation" in warned[truncated.name]
    assert "upgrade prunekit" in warned[newer.name] and "rerun the sweep" not in warned[newer.name]


# --- memory checked before a whole-model load -----------------------------------------------------------


def weights_bytes_reference(model: Path, dtype: torch.dtype) -> int:
    """The bytes of the model's weights in ``dtype``, counted here from the tensors themselves."""
    return sum(t.numel() * (dtype.itemsize if t.is_floating_point() else t.element_size())
               for t in load_file(model / "model.safetensors").values())


def test_whole_model_bytes_counts_the_headers_as_the_tensors_do(tiny_llama, sharded):
    from prunekit.models import whole_model_bytes

    for dtype in (torch.float32, torch.bfloat16):
        assert whole_model_bytes(tiny_llama, dtype) == weights_bytes_reference(tiny_llama, dtype)
        assert whole_model_bytes(sharded, dtype) == weights_bytes_reference(tiny_llama, dtype)
    assert whole_model_bytes(tiny_llama) == weights_bytes_reference(tiny_llama, torch.float32)  # stored: float32


@pytest.fixture
def little_memory(monkeypatch):
    """The host has 64 KiB available: less than the tiny model needs whole."""
    import prunekit.models

    monkeypatch.delenv("PRUNEKIT_FORCE", raising=False)
    monkeypatch.setattr(prunekit.models, "available_host_memory", lambda: 1 << 16)


def test_a_whole_model_load_that_cannot_fit_is_refused_saying_what_would(little_memory, tiny_llama, work):
    from prunekit.models import whole_model_bytes

    assert whole_model_bytes(tiny_llama, torch.bfloat16) > 1 << 16
    line = assert_user_error(["prune", tiny_llama, "--method", "magnitude", "--dtype", "bfloat16", "--out", work / "out"],
                             "host memory", "64.0 KiB is available", "--dtype auto", "float32", "--force", roots=[work])
    assert "bfloat16" in line
    # the checkpoint's own dtype streams: no whole load, no refusal
    code, err = run(["prune", tiny_llama, "--method", "magnitude", "--out", work / "streamed", "--quiet"])
    assert code == 0, err
    # --force loads it anyway
    code, err = run(["prune", tiny_llama, "--method", "magnitude", "--dtype", "bfloat16", "--out", work / "forced",
                     "--force", "--quiet"])
    assert code == 0, err
    assert json.loads((work / "forced" / "prunekit.json").read_text())["base_model"]["dtype"] == "bfloat16"


def test_eval_tasks_check_host_memory_before_anything_runs(little_memory, tiny_llama, work):
    assert_user_error(["eval", tiny_llama, "--langs", "en", "--tasks", "xcopa", "--device", "cpu",
                       "--out", work / "results.json"], "host memory", "leave out --tasks", "--force", roots=[work])


def test_eval_tasks_on_a_gpu_check_its_memory_and_name_the_gpus_that_would_fit(tiny_llama, work, monkeypatch):
    import prunekit.models
    from prunekit.models import whole_model_bytes

    need = whole_model_bytes(tiny_llama, torch.float32)
    per_gpu = need // 3  # each GPU holds a third of it: 4 GPUs fit it with the check's margins
    monkeypatch.setattr(prunekit.models, "available_host_memory", lambda: 1 << 40)
    monkeypatch.setattr(prunekit.models, "resolve_device", lambda device: torch.device("cuda", 0))
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda i=0: (per_gpu, per_gpu))
    line = assert_user_error(["eval", tiny_llama, "--langs", "en", "--tasks", "xcopa", "--out", work / "results.json"],
                             "GPU memory", "--parallelize over 4 GPUs", "--backend vllm with 4 GPUs", "--force", roots=[work])
    assert "cuda:0" in line


def test_a_hub_id_gets_a_disk_estimate_from_the_repository_file_sizes(monkeypatch):
    import huggingface_hub
    from huggingface_hub import constants
    from huggingface_hub.hf_api import ModelInfo

    from prunekit.models import expected_checkpoint_bytes

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    info = ModelInfo(id="org/model", siblings=[
        {"rfilename": "model-00001-of-00002.safetensors", "size": 6_000}, {"rfilename": "model-00002-of-00002.safetensors", "size": 4_000},
        {"rfilename": "config.json", "size": 100}, {"rfilename": "tokenizer.json", "size": 900},
        {"rfilename": "pytorch_model.bin", "size": 10_000}, {"rfilename": "figures/plot.png", "size": 50_000}],
        safetensors={"parameters": {"BF16": 5_000}, "total": 5_000})
    asked = []
    monkeypatch.setattr(huggingface_hub.HfApi, "model_info",
                        lambda self, repo_id, revision=None, files_metadata=False: asked.append(files_metadata) or info)
    assert expected_checkpoint_bytes("org/model", "auto") == 6_000 + 4_000 + 100 + 900
    assert expected_checkpoint_bytes("org/model", "float32") == 5_000 * 4 + 100 + 900
    assert asked == [True, True]


def test_a_download_that_cannot_fit_on_its_disk_is_refused_before_it_starts(monkeypatch, tmp_path):
    import huggingface_hub
    from huggingface_hub import constants
    from huggingface_hub.hf_api import ModelInfo

    import prunekit.remote
    from prunekit.errors import ConfigError

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    info = ModelInfo(id="org/model", sha="a" * 40, siblings=[
        {"rfilename": "model.safetensors", "size": 8_000}, {"rfilename": "config.json", "size": 100},
        {"rfilename": "figures/plot.png", "size": 50_000}])
    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", lambda self, *a, **k: info)
    monkeypatch.setattr(prunekit.remote, "free_bytes", lambda path: 5_000)
    downloads = []
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda *a, **k: downloads.append(k) or str(tmp_path))
    out = tmp_path / "pulled"
    with pytest.raises(ConfigError, match=r"org/model.*7\.9 KiB more.*4\.9 KiB free.*--out"):
        prunekit.remote.download_snapshot("org/model", local_dir=out)
    assert downloads == []
    out.mkdir()  # the weights already there: only config.json is left to fetch, and it fits
    (out / "model.safetensors").write_bytes(b"\0" * 8_000)
    prunekit.remote.download_snapshot("org/model", local_dir=out)
    assert len(downloads) == 1


def test_the_eval_help_example_with_a_missing_task_data_fails_before_the_model_loads(tiny_llama, tmp_path, work, monkeypatch):
    """Issue 30 §1: `--task-data data/` that does not exist is an error at once, not after the perplexity."""
    import prunekit.models

    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded before the options were checked")

    monkeypatch.setattr(prunekit.models, "load_model", no_load)
    monkeypatch.chdir(tmp_path)
    args = ["eval", tiny_llama, "--dense", tiny_llama, "--langs", "sw,en", "--ppl-source", "embedded",
            "--tasks", "belebele,xcopa", "--task-data", "data/", "--limit", "50", "--out", work / "results.json"]
    started = time.perf_counter()
    line = assert_user_error(args, "--task-data", "'data' is not a directory", roots=[work])
    assert time.perf_counter() - started < 20 and "internal error" not in line
