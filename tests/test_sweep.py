"""Sweeps: a grid of a tiny model run end to end, killed with SIGKILL and resumed with nothing lost;
the dense work done once per model; the report's numbers equal the runs' results; submitit's
LocalExecutor and the local GPU pool run the same tasks; bad configs fail before any work."""

from __future__ import annotations

import json
import math
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from prunekit.errors import ConfigError
from prunekit.sweep import expand, load_config, run_sweep
from tests.conftest import TATOEBA

ROOT = Path(__file__).resolve().parents[1]
LANGS = ["en", "de", "sw"]


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_thread):
    """Every test here runs on one intra-op thread (conftest's ``one_thread``)."""
    yield


def grid_config(model: Path, **overrides) -> dict:
    config = {
        "name": "grid",
        "models": [{"path": str(model)}],
        "methods": ["wanda", "sparsegpt"],
        "calibration": {"sets": list(LANGS), "source": str(TATOEBA), "nsamples": 4, "seqlen": 32, "seeds": [0, 1]},
        "evaluation": {"languages": list(LANGS), "perplexity_source": str(TATOEBA), "seqlen": 32, "max_windows": 6, "batch_size": 8},
        "execution": {"device": "cpu"},
    }
    config.update(overrides)
    return config


def leftovers(root: Path) -> list[Path]:
    return [p for p in root.rglob(".*") if p.name.endswith((".partial", ".tmp")) or ".old-" in p.name]


def status(directory: Path, stage: str) -> dict:
    return json.loads((directory / f"{stage}.status.json").read_text())


@pytest.fixture(scope="module")
def killed_and_resumed(tiny_llama, tmp_path_factory):
    """Run the 2 methods × 3 languages × 2 seeds grid in a subprocess, SIGKILL it as soon as the
    first run dir appears (while it prunes, if we catch it), then resume it in this process. The sweep has
    a cache of its own: its dense stage must compute what it caches, not find another test's states."""
    root = tmp_path_factory.mktemp("sweep")
    with pytest.MonkeyPatch.context() as env:
        env.setenv("PRUNEKIT_CACHE", str(root / "cache"))
        yield _kill_and_resume(tiny_llama, root)


def _kill_and_resume(tiny_llama, root):
    config_path = root / "grid.yaml"
    config_path.write_text(yaml.safe_dump(grid_config(tiny_llama)))
    runs_dir = root / "runs"
    proc = subprocess.Popen(
        [sys.executable, "-m", "prunekit.cli.main", "sweep", str(config_path), "--runs-dir", str(runs_dir), "--quiet"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )
    killed_in = None
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        dirs = [p for p in (runs_dir / "runs").glob("*") if not p.name.startswith(".")] if (runs_dir / "runs").exists() else []
        if dirs:
            first = dirs[0]
            until = time.time() + 3  # prefer killing inside the prune stage
            while time.time() < until and not (first / "prune.status.json").exists():
                time.sleep(0.01)
            proc.send_signal(signal.SIGKILL)
            killed_in = first
            break
        time.sleep(0.02)
    proc.wait()
    assert killed_in is not None, proc.stdout.read().decode()[-3000:]
    assert proc.returncode == -signal.SIGKILL
    before = {
        "runs": sorted(p.name for p in (runs_dir / "runs").glob("*") if not p.name.startswith(".")),
        "killed_prune_status": json.loads((killed_in / "prune.status.json").read_text()) if (killed_in / "prune.status.json").exists() else None,
    }
    # what a kill inside an atomic write leaves behind: a staging dir and a temp file
    (killed_in / ".checkpoint.abc123.partial").mkdir(exist_ok=True)
    (killed_in / ".checkpoint.abc123.partial" / "model.safetensors").write_bytes(b"half")
    (killed_in / ".results.json.x1.tmp").write_text("{")
    (runs_dir / "runs" / ".0123456789ab.zz.partial").mkdir()
    started = time.perf_counter()
    summary = run_sweep(config_path, runs_dir, progress=False)
    return {"runs_dir": runs_dir, "config": config_path, "summary": summary, "before": before, "killed": killed_in,
            "resume_seconds": time.perf_counter() - started}


def test_killed_sweep_resumes_with_exactly_the_expected_runs_and_no_partial_dirs(killed_and_resumed):
    runs_dir, summary = killed_and_resumed["runs_dir"], killed_and_resumed["summary"]
    assert summary.ok, summary.lines()
    expected = {task.run_id for task in expand(load_config(killed_and_resumed["config"])).runs}
    assert len(expected) == 2 * 3 * 2
    found = {p.name for p in (runs_dir / "runs").iterdir()}
    assert found == expected
    assert leftovers(runs_dir) == []
    for run_id in expected:
        directory = runs_dir / "runs" / run_id
        assert status(directory, "prune")["state"] == "done" and status(directory, "eval")["state"] == "done"
        record = json.loads((directory / "checkpoint" / "prunekit.json").read_text())
        assert record["run_id"] == run_id  # the run dir is named by the checkpoint's own identity hash
        results = json.loads((directory / "results.json").read_text())
        assert results["kind"] == "prunekit-results" and set(results["perplexity"]) == set(LANGS)
        assert all(math.isfinite(v["ppl"]) for v in results["perplexity"].values())
    killed_status = killed_and_resumed["before"]["killed_prune_status"]
    if killed_status is not None and killed_status["state"] == "running":  # we caught it mid-prune: it was redone
        assert status(killed_and_resumed["killed"], "prune")["executions"] == 2


def test_dense_work_ran_once_per_model_and_every_run_reused_it(killed_and_resumed):
    runs_dir = killed_and_resumed["runs_dir"]
    dense_dirs = list((runs_dir / "dense").iterdir())
    assert len(dense_dirs) == 1
    dense_status = status(dense_dirs[0], "dense")
    assert dense_status["state"] == "done" and dense_status["executions"] == 1
    assert set(dense_status["details"]["dense_hidden_states"].values()) == {"computed"}
    log = (runs_dir / "sweep.log").read_text()
    assert log.count("dense start") == 1
    for directory in (runs_dir / "runs").iterdir():
        details = status(directory, "eval")["details"]
        assert details["dense_hidden_states"] == {lang: "hit" for lang in LANGS}  # read from the dense stage's cache


def test_rerunning_a_finished_sweep_does_nothing(killed_and_resumed, monkeypatch):
    from prunekit.sweep import grid, orchestrate, plan

    runs_dir = killed_and_resumed["runs_dir"]
    executions = {p.name: status(p, "prune")["executions"] for p in (runs_dir / "runs").iterdir()}
    expansions, reads = [], []
    monkeypatch.setattr(orchestrate, "expand", lambda config: expansions.append(1) or grid.expand(config))
    real_read = plan.read_plan
    for module in (plan, orchestrate):
        monkeypatch.setattr(module, "read_plan", lambda *a: reads.append(1) or real_read(*a))
    summary = run_sweep(killed_and_resumed["config"], runs_dir, progress=False)
    assert summary.ok and summary.completed == 0 and summary.already_done == summary.tasks == 13
    # The grid is expanded once; the plan is read before the phases and again by each phase (once each
    # here, as nothing is left), and the last phase's read is the final plan.
    assert len(expansions) == 1 and len(reads) == 1 + 3
    assert {p.name: status(p, "prune")["executions"] for p in (runs_dir / "runs").iterdir()} == executions


def test_report_of_the_sweep_equals_the_runs_results(killed_and_resumed, tmp_path):
    from prunekit.report import build_report, diagonal_finding

    runs_dir = killed_and_resumed["runs_dir"]
    report = build_report(runs_dir, tmp_path / "report")
    groups: dict = {}
    for directory in (runs_dir / "runs").iterdir():
        run = json.loads((directory / "run.json").read_text())
        results = json.loads((directory / "results.json").read_text())
        for lang in LANGS:
            key = (run["method"]["label"], run["calibration"], lang)
            groups.setdefault(("perplexity",) + key, []).append(results["perplexity"][lang]["ppl"])
            groups.setdefault(("snr_db",) + key, []).append(results["hidden_states"][lang]["snr_db"])
            groups.setdefault(("pruning_error",) + key, []).append(results["hidden_states"][lang]["pruning_error"] * 1e6)
    checked = 0
    for (metric, method, calib, lang), values in groups.items():
        row = next(r for r in report.table(metric).block("llama", method).rows if r.calibration == calib)
        cell = row.cells[lang]
        assert cell.n == len(values) == 2
        assert cell.mean == pytest.approx(statistics.fmean(values), rel=1e-12)
        assert cell.std == pytest.approx(statistics.stdev(values), rel=1e-9)
        checked += 1
    assert checked == 3 * 2 * 3 * 3
    dense = json.loads(next((runs_dir / "dense").iterdir()).joinpath("results.json").read_text())
    for block in report.table("perplexity").blocks:
        assert {lang: block.dense.cells[lang].mean for lang in LANGS} == {lang: dense["perplexity"][lang]["ppl"] for lang in LANGS}
    lines = diagonal_finding(report)
    assert len(lines) == 2 and all("calibrating on the target language gave the lowest perplexity in" in line and "of 3 languages" in line for line in lines)
    assert (tmp_path / "report" / "report.html").read_text().count("data:image/png;base64,") == len(report.heatmaps) == 6
    board = report.leaderboard  # 2 methods × 3 calibration languages: 6 ranked checkpoints + the dense reference
    assert len(board.entries) == 6 and [e.rank for e in board.entries] == [1, 2, 3, 4, 5, 6] and len(board.dense) == 1


@pytest.fixture
def fake_hub(monkeypatch, tmp_path):
    """The loopback Hub of tests/hub_server.py with huggingface_hub pointed at it (nothing leaves the machine)."""
    import huggingface_hub
    from huggingface_hub import constants as hf_constants

    from tests.hub_server import FakeHub

    token = "hf_SweepLoopbackTok3n_x9Zq"
    server = FakeHub(valid_tokens={token}).start()
    dead = "http://127.0.0.1:9"
    for key, value in {"HF_ENDPOINT": server.url, "HF_HUB_DISABLE_XET": "1", "HF_TOKEN": token, "HF_HUB_OFFLINE": "0",
                       "HF_HOME": str(tmp_path / "hf-home")}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hf_constants, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "hf-home" / "hub"))
    monkeypatch.setattr(hf_constants, "HF_TOKEN_PATH", str(tmp_path / "hf-home" / "token"))
    monkeypatch.setattr(hf_constants, "ENDPOINT", dead)
    yield server
    server.stop()
    huggingface_hub.close_session()


def test_push_added_to_a_finished_sweep_runs_only_the_push_stage(killed_and_resumed, fake_hub):
    from prunekit.hub.public import public_json

    runs_dir = killed_and_resumed["runs_dir"]
    config = yaml.safe_load(killed_and_resumed["config"].read_text())
    config["push"] = {"namespace": "org", "private": True, "endpoint": fake_hub.url}
    executions = {p.name: (status(p, "prune")["executions"], status(p, "eval")["executions"]) for p in (runs_dir / "runs").iterdir()}
    summary = run_sweep(config, runs_dir, progress=False)
    assert summary.ok, summary.lines()
    assert summary.completed == 12  # the dense task had nothing to do
    for directory in (runs_dir / "runs").iterdir():
        pushed = json.loads((directory / "push.json").read_text())
        assert status(directory, "push")["state"] == "done"
        files = fake_hub.files(pushed["repo_id"])
        assert {"README.md", "model.safetensors", "prunekit.json", "results.json"} <= set(files)
        record = (directory / "checkpoint" / "prunekit.json").read_bytes()  # as published: local paths replaced
        assert files["prunekit.json"] == public_json("prunekit.json", record) and str(runs_dir).encode() not in files["results.json"]
    assert len(fake_hub.repos) == 12
    assert {p.name: (status(p, "prune")["executions"], status(p, "eval")["executions"]) for p in (runs_dir / "runs").iterdir()} == executions
    commits = len(fake_hub.commit_log)
    assert run_sweep(config, runs_dir, progress=False).completed == 0 and len(fake_hub.commit_log) == commits


def test_submitit_local_executor_runs_the_grid_and_a_failing_run_does_not_stop_it(tiny_llama, tmp_path):
    """Through the CLI: the jobs run in submitit LocalExecutor processes; the Swahili run cannot be
    pruned (its text is far too short), records its error, the English run finishes, exit code 1."""
    pytest.importorskip("submitit")
    from typer.testing import CliRunner

    from prunekit.cli.main import app

    texts = tmp_path / "texts"
    texts.mkdir()
    (texts / "en.txt").write_text((TATOEBA / "en.txt").read_text(encoding="utf-8"), encoding="utf-8")
    (texts / "sw.txt").write_text("Habari.\n", encoding="utf-8")
    config = grid_config(tiny_llama, methods=["wanda"], slurm={"cluster": "local", "time_min": 10, "cpus_per_task": 1, "mem_gb": 4},
                         execution={"device": "cpu", "keep_checkpoints": False})
    config["calibration"] = dict(config["calibration"], sets=["en", "sw"], seeds=[0], source=str(texts))
    config["evaluation"] = dict(config["evaluation"], languages=["en"], perplexity_source=str(texts))
    config_path = tmp_path / "submitit.yaml"
    config_path.write_text(yaml.safe_dump(config))
    runs_dir = tmp_path / "runs"
    result = CliRunner().invoke(app, ["sweep", str(config_path), "--runs-dir", str(runs_dir), "--executor", "slurm", "--quiet"])
    assert result.exit_code == 1, result.output
    assert "1 failed" in result.output and "FAILED run" in result.output and "[prune]" in result.output
    tasks = {t.calib: t for t in expand(load_config(config_path)).runs}
    good, bad = runs_dir / "runs" / tasks["en"].run_id, runs_dir / "runs" / tasks["sw"].run_id
    for directory, stages in ((good, ("prune", "eval")), (next((runs_dir / "dense").iterdir()), ("dense",))):
        for stage in stages:
            s = status(directory, stage)
            assert s["state"] == "done" and s["pid"] != os.getpid()  # ran in a submitit job process
        assert (directory / "results.json").exists()
    failed = status(bad, "prune")
    assert failed["state"] == "failed" and "language 'sw'" in failed["error"], failed["error"]
    assert len(list((runs_dir / "slurm").rglob("*_log.out"))) == 2  # one job for the dense phase, one for the runs
    assert not (good / "checkpoint").exists()  # keep_checkpoints: false, once evaluated
    again = run_sweep(config_path, runs_dir, dry_run=True, progress=False)
    assert again.pending == 1 and again.already_done == 2  # only the failed run would be retried
    assert leftovers(runs_dir) == []


def test_local_pool_redoes_evaluations_whose_worker_died_in_two_worker_processes(killed_and_resumed, monkeypatch):
    """Two eval stages say 'running' but their worker is gone (killed): the pool redoes them in two worker
    processes; nothing else is redone. CUDA_VISIBLE_DEVICES is left as it was (an explicit device keeps its
    meaning; which GPU a worker gets is tests/test_slurm.py's placement test)."""
    runs_dir = killed_and_resumed["runs_dir"]
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    victims = sorted((runs_dir / "runs").iterdir())[:2]
    for directory in victims:
        record = status(directory, "eval")
        record.update(state="running", pid=dead.pid, pid_start=None)
        (directory / "eval.status.json").write_text(json.dumps(record))
        (directory / "results.json").unlink()
    before = {p.name: json.loads((p / "eval.status.json").read_text()) for p in (runs_dir / "runs").iterdir()}
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    summary = run_sweep(killed_and_resumed["config"], runs_dir, max_parallel=2, progress=False)
    assert summary.ok and summary.completed == 2, summary.lines()
    after = {p.name: status(p, "eval") for p in (runs_dir / "runs").iterdir()}
    assert {after[d.name]["cuda_visible_devices"] for d in victims} == {"0,1"}
    assert all(after[d.name]["pid"] not in (os.getpid(), dead.pid) and after[d.name]["state"] == "done" for d in victims)
    assert after[victims[0].name]["pid"] != after[victims[1].name]["pid"]
    assert {k: v for k, v in after.items() if k not in {d.name for d in victims}} == {k: v for k, v in before.items() if k not in {d.name for d in victims}}
    assert all((d / "results.json").exists() for d in victims)


def test_a_stage_whose_process_died_is_redone_and_one_still_running_is_left_alone(tmp_path):
    from prunekit.sweep.state import stage, stage_state

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    directory = tmp_path / "run"
    directory.mkdir()
    with stage(directory, "prune"):
        assert stage_state(directory, "prune") == "busy"  # this live process holds it
    assert stage_state(directory, "prune") == "done"
    record = json.loads((directory / "prune.status.json").read_text())
    record.update(state="running", pid=dead.pid, pid_start=None)
    (directory / "prune.status.json").write_text(json.dumps(record))
    assert stage_state(directory, "prune") == "stale"
    record.update(host="another-node", heartbeat=time.time())
    (directory / "prune.status.json").write_text(json.dumps(record))
    assert stage_state(directory, "prune") == "busy"  # another host, fresh heartbeat
    record.update(heartbeat=time.time() - 3600)
    (directory / "prune.status.json").write_text(json.dumps(record))
    assert stage_state(directory, "prune") == "stale"  # its heartbeat stopped an hour ago


def test_a_job_known_dead_fails_its_running_stage_at_once(tmp_path):
    from prunekit.sweep.state import abandon, stage, stage_state

    directory = tmp_path / "run"
    directory.mkdir()
    with stage(directory, "eval"):
        pass
    record = json.loads((directory / "eval.status.json").read_text())
    record.update(state="running", host="node-7", heartbeat=time.time(), job_id="123_4")
    (directory / "eval.status.json").write_text(json.dumps(record))
    assert stage_state(directory, "eval") == "busy"
    assert not abandon(directory, "eval", "999_1", "job 999_1 failed")  # somebody else's job: left alone
    assert abandon(directory, "eval", "123_4", "job 123_4 failed: timeout")
    assert stage_state(directory, "eval") == "failed" and status(directory, "eval")["error"] == "job 123_4 failed: timeout"


def test_slurm_settings_become_sbatch_options(tmp_path, monkeypatch):
    pytest.importorskip("submitit")
    from prunekit.sweep.backends import submitit_executor

    config = load_config(ROOT / "configs" / "study-full-grid.yaml")
    with pytest.raises(ConfigError, match="slurm.cluster: local"):
        submitit_executor(config, tmp_path, max_parallel=16)  # no Slurm on this machine
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "srun").write_text("#!/bin/sh\nexit 0\n")
    (fake / "srun").chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake}{os.pathsep}{os.environ['PATH']}")
    config.slurm.update(account="lab", setup=["module load cuda/12.4"])
    executor = submitit_executor(config, tmp_path, max_parallel=16)
    script = executor._executor._make_submission_file_text("python -m prunekit", "uid")
    for option in ("--partition=gpu", "--gpus-per-node=1", "--cpus-per-task=8", "--mem=128GB", "--time=720", "--account=lab"):
        assert f"#SBATCH {option}" in script
    assert "module load cuda/12.4" in script and executor._executor.parameters["array_parallelism"] == 16


BAD_CONFIGS = [
    ({"methods": ["wanda", "wandda"]}, "methods[1]: unknown method 'wandda' (did you mean 'wanda'?)"),
    ({"calibrations": {}}, "calibrations: unknown key 'calibrations' (did you mean 'calibration'?)"),
    ({"calibration": {"sets": ["en", "xx"], "source": str(TATOEBA)}}, "calibration.sets[1]: unknown language code 'xx'"),
    ({"calibration": {"sets": ["en"], "source": str(TATOEBA), "seedz": [0]}}, "calibration.seedz: unknown key 'seedz' (did you mean 'seeds'?)"),
    ({"evaluation": {"languages": ["en"], "seqlne": 32}}, "evaluation.seqlne: unknown key 'seqlne' (did you mean 'seqlen'?)"),
    ({"models": [{"path": "/no/such/model"}]}, "models[0].path: '/no/such/model' does not exist"),
    ({"models": [{"id": "org/name", "dtype": "fp16"}]}, "models[0].dtype: unknown dtype 'fp16'"),
    ({"patterns": [124]}, "patterns[0]: got the number 124: write N:M patterns in quotes"),
    ({"patterns": ["2:4"], "sparsities": [0.5]}, "sparsities: given, but 'patterns' has no 'unstructured' entry"),
    ({"sparsities": [1.5]}, "sparsities[0]: sparsity must be strictly between 0 and 1"),
    ({"methods": ["gptq-w5g128"]}, "methods[0]: "),
    ({"analysis": {"pairs": [["en", "ru"]]}}, "analysis.pairs[0][1]: 'ru' is not one of calibration.sets"),
    ({"slurm": {"cluster": "slrum"}}, "slurm.cluster: unknown cluster 'slrum' (did you mean 'slurm'?)"),
    ({"push": {"namespace": "my org"}}, "push.namespace: 'my org' is not a Hub user or organization name"),
    ({"evaluation": {"languages": ["en"], "limit": -3}}, "evaluation.limit: must be positive"),
]


@pytest.mark.parametrize("change, message", BAD_CONFIGS, ids=[m.split(":")[0] for _, m in BAD_CONFIGS])
def test_a_bad_config_fails_before_any_work_naming_the_yaml_path(tiny_llama, tmp_path, change, message):
    config = grid_config(tiny_llama)
    config.update(change)
    with pytest.raises(ConfigError) as err:
        run_sweep(config, tmp_path / "runs", progress=False)
    assert str(err.value).startswith(message), str(err.value)
    assert not (tmp_path / "runs").exists()


def test_cli_prints_a_bad_yaml_key_as_one_line_and_exits_2(tiny_llama, tmp_path):
    from typer.testing import CliRunner

    from prunekit.cli.main import app

    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(grid_config(tiny_llama, methods=["sparsegpt", "wandda"])))
    result = CliRunner().invoke(app, ["sweep", str(path), "--runs-dir", str(tmp_path / "runs")])
    assert result.exit_code == 2
    assert result.output.strip() == "error: methods[1]: unknown method 'wandda' (did you mean 'wanda'?); choose from magnitude, sparsegpt, wanda or a quantization such as gptq-w4g128 (gptq-w{bits}g{group})"
    assert not (tmp_path / "runs").exists()


def test_the_shipped_configs_validate_and_expand_to_the_study_grid():
    study = load_config(ROOT / "configs" / "study-full-grid.yaml")
    grid = expand(study)
    assert len(grid.runs) == 2 * 2 * 7 * 3 and len(grid.dense) == 2
    assert {t.model.spec for t in grid.runs} == {"meta-llama/Meta-Llama-3-8B-Instruct", "CohereForAI/aya-23-8B"}
    assert {(t.pattern.sparsity, t.pattern.is_nm) for t in grid.runs} == {(0.5, False)}
    assert study.nsamples == 128 and study.seqlen == 8192 and study.seeds == [0, 1, 2]
    plan = run_sweep(ROOT / "configs" / "study-full-grid.yaml", Path("/nonexistent-prunekit-runs") / "study", dry_run=True, progress=False)
    assert plan.pending == plan.tasks == 84 + 2 and not Path("/nonexistent-prunekit-runs").exists()
    tiny = load_config(ROOT / "configs" / "tiny-example.yaml")
    assert [m.spec for m in tiny.models] == ["embedded:gemma-3-270m"] and tiny.nsamples <= 16


# ---------------------------------------------------------------------------------------------
# Corrupt status files, two sweeps on one runs directory
# ---------------------------------------------------------------------------------------------


def small_config(model: Path, tmp_path: Path, langs=("en",)) -> Path:
    config = grid_config(model, name="small", methods=["wanda"])
    config["calibration"] = dict(config["calibration"], sets=list(langs), seeds=[0])
    config["evaluation"] = dict(config["evaluation"], languages=["en"])
    path = tmp_path / "small.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def cli_sweep(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "prunekit.cli.main", "sweep", *args, "--quiet"], cwd=cwd,
                          capture_output=True, text=True, timeout=600)


def test_a_corrupt_status_file_is_redone_with_a_warning_and_the_sweep_resumes(tiny_llama, tmp_path):
    path = small_config(tiny_llama, tmp_path)
    runs_dir = tmp_path / "runs"
    assert run_sweep(path, runs_dir, progress=False).ok
    run = next((runs_dir / "runs").iterdir())
    prune_before = status(run, "prune")
    (run / "eval.status.json").write_text('{"kind": "prunekit-stage-status", "sta')  # a truncated write
    (run / "results.json").unlink()
    done = cli_sweep(str(path), "--runs-dir", str(runs_dir))
    assert done.returncode == 0, done.stderr
    warning = [line for line in done.stderr.splitlines() if line.startswith("warning:")]
    assert warning and "eval.status.json cannot be read" in warning[0] and "redone" in warning[0], done.stderr
    assert "1 completed now · 0 failed" in done.stdout, done.stdout
    assert status(run, "eval")["state"] == "done" and (run / "results.json").exists()
    assert status(run, "prune") == prune_before  # only the stage whose status was lost is redone


def test_a_stage_that_finds_the_dense_evaluation_running_waits_for_it(tiny_llama, tmp_path, monkeypatch):
    """The dense stage is running in another live process: the run's eval waits for it instead of failing,
    and the dense evaluation is not run a second time."""
    import threading

    from prunekit.sweep import stages
    from prunekit.sweep.grid import DenseTask

    path = small_config(tiny_llama, tmp_path)
    runs_dir = tmp_path / "runs"
    assert run_sweep(path, runs_dir, progress=False).ok
    config = load_config(path)
    task = expand(config).runs[0]
    dense = stages.dense_dir(runs_dir, DenseTask(task.model))
    finished = status(dense, "dense")
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (dense / "dense.status.json").write_text(json.dumps(dict(finished, state="running", pid=other.pid, pid_start=None,
                                                                 heartbeat=time.time())))
        (runs_dir / "runs" / task.run_id / "eval.status.json").unlink()
        monkeypatch.setattr(stages, "DENSE_POLL_S", 0.2)

        def other_finishes():
            time.sleep(2)
            (dense / "dense.status.json").write_text(json.dumps(finished))

        threading.Thread(target=other_finishes).start()
        outcome = stages.execute_task(config, runs_dir, task)
    finally:
        other.kill()
    assert outcome.state == "done" and outcome.ran == ["eval"], outcome
    assert status(dense, "dense")["executions"] == 1
    log = (runs_dir / "sweep.log").read_text()
    assert "waiting for it" in log and "FAILED" not in log


def test_two_sweeps_on_one_runs_dir_share_the_work_and_both_report_all_of_it(tiny_llama, tmp_path):
    path = small_config(tiny_llama, tmp_path, langs=("en", "de", "sw"))
    runs_dir = tmp_path / "runs"
    cmd = [sys.executable, "-m", "prunekit.cli.main", "sweep", str(path), "--runs-dir", str(runs_dir), "--quiet"]
    procs = [subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outputs = [proc.communicate(timeout=900) for proc in procs]
    for proc, (out, err) in zip(procs, outputs):
        assert proc.returncode == 0, err
        assert "0 failed" in out and "FAILED" not in out + err, out + err
    log = (runs_dir / "sweep.log").read_text()
    assert log.count("dense start") == 1 and "FAILED" not in log, log  # the dense evaluation ran once
    assert status(next((runs_dir / "dense").iterdir()), "dense")["executions"] == 1
    for directory in (runs_dir / "runs").iterdir():
        assert status(directory, "prune")["executions"] == 1 and status(directory, "eval")["executions"] == 1
    import re

    completed = []
    for out, _ in outputs:
        line = next(line for line in out.splitlines() if line.startswith("sweep 'small'"))
        done_now = int(re.search(r"(\d+) completed now", line).group(1))
        elsewhere = re.search(r"(\d+) completed by another process", line)
        already = int(re.search(r"(\d+) already done", line).group(1))
        assert already + done_now + (int(elsewhere.group(1)) if elsewhere else 0) == 4, line  # 1 dense + 3 runs
        completed.append(done_now)
    assert sum(completed) == 4 - min(int(re.search(r"(\d+) already done", o).group(1)) for o, _ in outputs)


def test_the_executor_and_its_worker_count_are_chosen_once_before_any_work(monkeypatch):
    """``choose_executor``: an unknown executor or a negative count fails first; Slurm's 0 means no cap; local
    plans its workers only where the tasks will run (a dry run keeps the count as given)."""
    from types import SimpleNamespace

    from prunekit.sweep import backends

    config = SimpleNamespace(device="cpu", gpus_per_worker=1)
    with pytest.raises(ConfigError, match="unknown executor 'slurmm'.*did you mean"):
        backends.choose_executor("slurmm", None, config)
    with pytest.raises(ConfigError, match="--max-parallel must be at least 1"):
        backends.choose_executor("local", -1, config)
    assert backends.choose_executor("slurm", 0, config) == (backends.run_submitit, None)
    assert backends.choose_executor("slurm", 3, config) == (backends.run_submitit, 3)
    assert backends.choose_executor("local", 1, config) == (backends.run_inprocess, 1)
    assert backends.choose_executor("local", 4, config, plan_workers=False) == (backends.run_pool, 4)
    planned = SimpleNamespace(workers=2, warnings=[])
    monkeypatch.setattr(backends, "local_worker_plan", lambda cfg, n: planned)
    assert backends.choose_executor("local", 4, config) == (backends.run_pool, 2)
    planned.workers = 1
    assert backends.choose_executor("local", None, config) == (backends.run_inprocess, 1)
