"""A streamed prune resumes at its layer, leaves nothing hidden behind, and is deterministic (issue 25 §6,
issue 26 §1 and §6)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from prunekit.io import OWNER_FILE, owned
from prunekit.pipeline import prune
from prunekit.recipe import CalibrationSpec, EngineSpec, OutputSpec
from prunekit.staging import KILL_AFTER_LAYER, MANIFEST, staging_path
from prunekit.streaming import StreamedLayers
from tests.conftest import TATOEBA
from tests.test_streaming import tiny

CALIBRATION = CalibrationSpec("en", str(TATOEBA), nsamples=4, seqlen=24)
ENGINE = EngineSpec("cpu", batch_size=2)
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def base(tmp_path_factory, tokenizer) -> Path:
    """A 4-layer bf16 Llama in two shards (streamed: the dtype is the checkpoint's own)."""
    return tiny(tokenizer, tmp_path_factory.mktemp("resume-models"), "llama", torch.bfloat16, shard="200KB",
                num_hidden_layers=4)


def run(base: Path, out: Path, method: str = "wanda", sparsity: float = 0.5, **output):
    """``output``: the OutputSpec's fields besides ``out`` (resume, overwrite, stream)."""
    calibrated = method != "magnitude"
    return prune(str(base), method, sparsity=sparsity, calibration=CALIBRATION if calibrated else CalibrationSpec(),
                 output=OutputSpec(out, **output), engine=ENGINE if calibrated else EngineSpec("cpu"), progress=False)


def shard_bytes(directory: Path) -> dict[str, bytes]:
    files = sorted(directory.glob("*.safetensors")) + [directory / "model.safetensors.index.json"]
    return {f.name: f.read_bytes() for f in files if f.exists()}


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".partial") or ".old-" in p.name)


def interrupt_after(monkeypatch, layer: int) -> None:
    """Make the next run fail as soon as layer ``layer`` + 1 is written (layer ``layer`` is finished)."""
    original = StreamedLayers.done

    def done(self, index, module):
        if index == layer + 1:
            raise RuntimeError("interrupted")
        original(self, index, module)

    monkeypatch.setattr(StreamedLayers, "done", done)


@pytest.fixture(scope="module")
def reference(base, tmp_path_factory) -> dict[str, dict[str, bytes]]:
    """Uninterrupted runs, by method."""
    root = tmp_path_factory.mktemp("reference")
    return {method: shard_bytes(run(base, root / method, method=method).out) for method in ("wanda", "sparsegpt", "magnitude")}


@pytest.mark.parametrize("method", ["wanda", "sparsegpt", "magnitude"])
def test_an_interrupted_run_resumes_at_its_layer_byte_identical(method, base, reference, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    interrupt_after(monkeypatch, 1)
    with pytest.raises(RuntimeError, match="interrupted"):
        run(base, out, method=method)
    monkeypatch.undo()
    staging = staging_path(out)
    manifest = json.loads((staging / MANIFEST).read_text())
    assert manifest["next_layer"] == 2 and len(manifest["layers"]) == 2 and not out.exists()
    capsys.readouterr()

    engines = []
    original_load = StreamedLayers.load

    def load(self, index, *args, **kwargs):
        engines.append(index)
        return original_load(self, index, *args, **kwargs)

    monkeypatch.setattr(StreamedLayers, "load", load)
    result = run(base, out, method=method)
    err = capsys.readouterr().err
    assert "resumed at layer 2 of 4" in err and ".out.partial" in err
    assert engines == [2, 3]  # layers 0 and 1 were neither read nor solved again
    assert shard_bytes(out) == reference[method]
    assert result.record["resumed"] == {"at_layer": 2, "of": 4}
    assert json.loads((out / "prunekit.json").read_text())["resumed"] == {"at_layer": 2, "of": 4}
    per_layer = result.record["sparsity"]["per_layer"]
    assert [layer["index"] for layer in per_layer] == [0, 1, 2, 3]
    if method != "magnitude":  # measured on calibration tokens
        assert all(m["relative_error"] is not None for layer in per_layer for m in layer["modules"])
    assert leftovers(tmp_path) == [] and not list(out.glob(".prunekit-*"))


def test_kill_9_then_the_same_command_resumes(base, reference, tmp_path):
    out = tmp_path / "out"
    command = [sys.executable, "-m", "prunekit.cli.main", "prune", str(base), "--method", "wanda", "--sparsity", "0.5",
               "--calib", "en", "--calib-source", str(TATOEBA), "--nsamples", "4", "--seqlen", "24", "--device", "cpu",
               "--batch-size", "2", "--quiet", "--out", str(out)]
    killed = subprocess.run(command, env=os.environ | {KILL_AFTER_LAYER: "2"}, capture_output=True, text=True, cwd=ROOT)
    assert killed.returncode == -9, killed.stderr
    assert json.loads((staging_path(out) / MANIFEST).read_text())["next_layer"] == 3
    assert json.loads((staging_path(out) / OWNER_FILE).read_text())["pid"] > 0  # the dead owner's record
    again = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    assert again.returncode == 0, again.stderr
    assert "resumed at layer 3 of 4" in again.stderr
    assert shard_bytes(out) == reference["wanda"]
    assert leftovers(tmp_path) == []


def test_a_staging_of_another_run_is_removed_not_reused(base, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    interrupt_after(monkeypatch, 1)
    with pytest.raises(RuntimeError):
        run(base, out, sparsity=0.5)
    monkeypatch.undo()
    capsys.readouterr()
    result = run(base, out, sparsity=0.6)
    err = capsys.readouterr().err
    assert "resumed" not in err
    assert "removed .out.partial" in err and "another run" in err
    assert abs(result.record["sparsity"]["overall"] - 0.6) < 0.02
    fresh = run(base, tmp_path / "fresh", sparsity=0.6)
    assert shard_bytes(out) == shard_bytes(fresh.out)


def test_no_resume_starts_fresh(base, reference, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    interrupt_after(monkeypatch, 0)
    with pytest.raises(RuntimeError):
        run(base, out)
    monkeypatch.undo()
    capsys.readouterr()
    run(base, out, resume=False)
    err = capsys.readouterr().err
    assert "resumed" not in err and "--no-resume" in err and "removed .out.partial" in err
    assert shard_bytes(out) == reference["wanda"]
    assert json.loads((out / "prunekit.json").read_text())["resumed"] is None
    assert leftovers(tmp_path) == []


HOLD = """
import sys, time
from pathlib import Path
from prunekit.io import owned
with owned(Path(sys.argv[1]), sys.argv[2]):
    print("held", flush=True)
    time.sleep(120)
"""


def test_leftovers_of_dead_owners_are_removed_and_a_live_owners_kept(base, tmp_path, capsys):
    out = tmp_path / "out"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    partial = tmp_path / ".out.abcd1234.partial"  # an atomic write killed with kill -9
    partial.mkdir()
    (partial / "model.safetensors").write_bytes(b"x" * 5000)
    (partial / OWNER_FILE).write_text(json.dumps({"host": os.uname().nodename, "pid": dead_pid, "target": "out"}))
    old = tmp_path / ".out.old-efgh5678"  # an --overwrite killed between its renames, by an older prunekit
    (old / "out").mkdir(parents=True)
    (old / "out" / "model.safetensors").write_bytes(b"y" * 3000)
    hour_ago = time.time() - 7200
    for path in (old / "out" / "model.safetensors", old / "out", old):
        os.utime(path, (hour_ago, hour_ago))
    recent = tmp_path / ".out.ijkl9012.partial"  # no owner recorded, changed a moment ago: maybe in use
    recent.mkdir()
    other = tmp_path / ".outer.mnop3456.partial"  # another output's
    other.mkdir()
    live = tmp_path / ".out.qrst7890.partial"
    live.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(live), "out"], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        assert holder.stdout.readline().strip() == "held"
        capsys.readouterr()
        run(base, out)
        err = capsys.readouterr().err
        assert not partial.exists() and not old.exists()
        assert f"removed .out.abcd1234.partial (4.9 KiB) beside out: pid {dead_pid}" in err
        assert "removed .out.old-efgh5678 (2.9 KiB)" in err
        assert live.exists() and f"left .out.qrst7890.partial" in err and f"pid {holder.pid}" in err
        assert recent.exists() and "left .out.ijkl9012.partial" in err and "no owner recorded" in err
        assert other.exists()
    finally:
        holder.kill()
        holder.wait()
    assert leftovers(tmp_path) == sorted([".out.ijkl9012.partial", ".out.qrst7890.partial", ".outer.mnop3456.partial"])


def test_a_staging_a_live_process_owns_is_never_touched(base, tmp_path):
    from prunekit.errors import ConfigError

    out = tmp_path / "out"
    staging = staging_path(out)
    staging.mkdir()
    (staging / "model.safetensors").write_bytes(b"z")
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(staging), "out"], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(ConfigError, match=f"being written by pid {holder.pid}"):
            run(base, out)
        assert (staging / "model.safetensors").read_bytes() == b"z"
    finally:
        holder.kill()
        holder.wait()


def test_overwrite_leaves_no_old_copy_and_two_runs_are_byte_identical(base, reference, tmp_path):
    out = tmp_path / "out"
    errors = []
    for again in (False, True):
        record = run(base, out, overwrite=again).record
        errors.append([[m["relative_error"] for m in layer["modules"]] for layer in record["sparsity"]["per_layer"]])
        if not again:
            first = shard_bytes(out)
    assert shard_bytes(out) == first == reference["wanda"]
    assert errors[0] == errors[1]  # the records' per-Linear errors too, to the last bit
    assert leftovers(tmp_path) == []


def test_an_in_memory_run_removes_a_streamed_runs_staging(base, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    interrupt_after(monkeypatch, 0)
    with pytest.raises(RuntimeError):
        run(base, out)
    monkeypatch.undo()
    capsys.readouterr()
    run(base, out, stream=False)
    assert "removed .out.partial" in capsys.readouterr().err
    assert leftovers(tmp_path) == []


def test_half_gemms_are_chosen_from_cpu_flags_not_timings(monkeypatch):
    from prunekit import backend

    monkeypatch.delenv("PRUNEKIT_HALF_GEMMS", raising=False)
    assert not hasattr(backend, "time")  # nothing in the backend is timed
    cpu = torch.device("cpu")
    monkeypatch.setattr(backend, "_cpu_flags", lambda: {"avx512f", "avx512_bf16"})
    assert backend.gemm_plan(torch.bfloat16, cpu) == "native" and backend.gemm_plan(torch.float16, cpu) == "fp32"
    monkeypatch.setattr(backend, "_cpu_flags", lambda: {"avx2"})
    assert backend.gemm_plan(torch.bfloat16, cpu) == "fp32"
    assert backend.gemm_plan(torch.float32, cpu) == "native"
    monkeypatch.setenv("PRUNEKIT_HALF_GEMMS", "native")
    assert backend.gemm_plan(torch.bfloat16, cpu) == "native"


def test_a_resumed_run_computes_its_gemms_as_the_interrupted_run_recorded(base, tmp_path, monkeypatch, capsys):
    from prunekit import backend

    out = tmp_path / "out"
    interrupt_after(monkeypatch, 0)
    with pytest.raises(RuntimeError):
        run(base, out)
    monkeypatch.undo()
    manifest = json.loads((staging_path(out) / MANIFEST).read_text())
    flipped = "fp32" if manifest["gemms"] == "native" else "native"
    manifest["gemms"] = flipped
    (staging_path(out) / MANIFEST).write_text(json.dumps(manifest))
    plans = []
    original = backend.Backend.gemms

    def gemms(self, layer):
        plans.append(self.forced_gemms)
        return original(self, layer)

    monkeypatch.setattr(backend.Backend, "gemms", gemms)
    run(base, out)
    assert plans == [flipped] * 3


def test_a_requeued_sweep_run_keeps_its_prune_staging(tmp_path):
    from prunekit.sweep.state import clean_partials

    task = tmp_path / "runs" / "abc"
    staging = staging_path(task / "checkpoint")
    staging.mkdir(parents=True)
    (staging / MANIFEST).write_text("{}")
    (task / ".checkpoint.x1y2z3w4.partial").mkdir()
    clean_partials(task)
    assert staging.exists() and not (task / ".checkpoint.x1y2z3w4.partial").exists()


@pytest.mark.parametrize("checkpoint_format", ["dense", "packed"])
def test_an_interrupted_quantize_writes_what_an_uninterrupted_one_writes(checkpoint_format, base, tmp_path, monkeypatch, capsys):
    """A dense quantize resumes at its layer; a packed one streams but does not resume yet: the rerun removes
    its interrupted staging and starts again. Either way the bytes are an uninterrupted run's, nothing is left."""
    def quantize(out):
        return prune(str(base), "gptq", calibration=CALIBRATION, output=OutputSpec(out, checkpoint_format=checkpoint_format),
                     engine=ENGINE, progress=False)

    reference = shard_bytes(quantize(tmp_path / "reference").out)
    out = tmp_path / "out"
    interrupt_after(monkeypatch, 1)
    with pytest.raises(RuntimeError):
        quantize(out)
    monkeypatch.undo()
    capsys.readouterr()
    result = quantize(out)
    err = capsys.readouterr().err
    if checkpoint_format == "dense":
        assert "resumed at layer 2 of 4" in err
    else:
        assert "resumed" not in err
    assert shard_bytes(out) == reference
    assert len(result.record["quantization"]["per_layer"]) == 4
    assert leftovers(tmp_path) == []


def test_a_target_made_by_another_process_at_the_last_moment_is_a_file_exists_error(tmp_path, monkeypatch):
    """Two sweeps creating one task dir: the other's rename lands between our check and ours. The loser gets
    FileExistsError (what callers such as sweep.layout.ensure_task_dir expect), not ENOTEMPTY, and leaves nothing."""
    import prunekit.io as io

    target = tmp_path / "task"
    real_replace = os.replace

    def the_other_process_first(src, dst):
        if Path(dst) == target and not target.exists():
            target.mkdir()
            (target / "run.json").write_text("{}")
        return real_replace(src, dst)

    monkeypatch.setattr(io.os, "replace", the_other_process_first)
    with pytest.raises(FileExistsError):
        with io.atomic_directory(target) as staging:
            (staging / "run.json").write_text('{"mine": 1}')
    assert (target / "run.json").read_text() == "{}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["task"]
