"""Every failure a user or the machine causes is one line `error: …`, exit 2, names the file and
what to do, writes nothing and leaves nothing behind (issue 15 §3–4, issue 20 item 9).

Damaged inputs are real damaged files; a full disk, a read-only mount and CUDA running out of
memory are simulated by raising the very exception the OS or torch raises, from the call that
raises it on a real machine."""

from __future__ import annotations

import errno
import os
import shutil
import time
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

from prunekit.cli.main import app
from tests.conftest import TATOEBA

# --- helpers ------------------------------------------------------------------------------------


def run(args: list[str]):
    """The CLI in-process; returns (exit code, stderr)."""
    result = CliRunner().invoke(app, [str(a) for a in args])
    return result.exit_code, result.stderr


def snapshot(*roots: Path) -> set[str]:
    """Every path (hidden ones too) under ``roots``: what a failed command must not have changed."""
    return {str(p) for root in roots if root.exists() for p in root.rglob("*")}


def assert_user_error(args, *fragments: str, roots=()):
    before = snapshot(*roots)
    code, err = run(args)
    lines = err.strip().splitlines()
    assert code == 2, err
    assert lines and lines[0].startswith("error: "), err
    assert "internal error" not in err and "Traceback" not in err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    assert snapshot(*roots) == before, sorted(snapshot(*roots) ^ before)  # nothing written, nothing left behind
    return lines[0]


def copy_model(source: Path, target: Path) -> Path:
    shutil.copytree(source, target)
    return target


@pytest.fixture
def work(tmp_path) -> Path:
    """The folder commands write into (and must leave as they found it)."""
    folder = tmp_path / "work"
    folder.mkdir()
    return folder


@pytest.fixture
def damaged(tiny_llama, tmp_path):
    """Copies of the tiny Llama with one damaged file each."""
    def make(kind: str) -> Path:
        model = copy_model(tiny_llama, tmp_path / f"model-{kind}")
        weights = model / "model.safetensors"
        if kind == "truncated":
            data = weights.read_bytes()
            weights.write_bytes(data[: len(data) // 2])
        elif kind == "garbage":
            weights.write_bytes(os.urandom(4096))
        elif kind == "empty":
            weights.write_bytes(b"")
        elif kind == "config":
            (model / "config.json").write_text('{"model_type": "llama", "hidden_size": 64,')
        elif kind == "record":
            (model / "prunekit.json").write_text("{not json")
        return model
    return make


PRUNE = ["--method", "wanda", "--calib", "en", "--calib-source", str(TATOEBA), "--nsamples", "2", "--seqlen", "16"]
EVAL = ["--langs", "en", "--ppl-source", str(TATOEBA), "--seqlen", "16", "--max-windows", "1", "--device", "cpu", "-q"]


# --- §3 damaged or unreadable inputs ------------------------------------------------------------


@pytest.mark.parametrize("kind,fragment", [("truncated", "truncated or corrupt"), ("garbage", "truncated or corrupt"),
                                           ("empty", "truncated or corrupt"), ("config", "not valid JSON")])
def test_prune_of_a_damaged_model_names_the_file(kind, fragment, damaged, work):
    model = damaged(kind)
    file = "config.json" if kind == "config" else "model.safetensors"
    assert_user_error(["prune", model, *PRUNE, "--out", work / "out"], str(model / file), fragment, roots=[work, model])


def test_eval_of_a_damaged_checkpoint_and_of_a_damaged_dense_model(damaged, tiny_llama, work):
    truncated = damaged("truncated")
    assert_user_error(["eval", truncated, *EVAL, "--out", work / "r.json"], str(truncated / "model.safetensors"),
                      roots=[work])
    assert_user_error(["eval", tiny_llama, "--dense", truncated, *EVAL, "--out", work / "r.json"],
                      str(truncated / "model.safetensors"), roots=[work])


def test_eval_of_a_checkpoint_whose_prunekit_json_is_not_json(damaged, work):
    model = damaged("record")
    assert_user_error(["eval", model, *EVAL, "--out", work / "r.json"], str(model / "prunekit.json"), "not valid JSON",
                      roots=[work])


@pytest.mark.parametrize("side", ["a", "b", "dense"])
def test_compare_with_a_damaged_checkpoint_on_either_side(side, damaged, tiny_llama, work):
    bad = damaged("truncated")
    a, b, dense = (bad if side == "a" else tiny_llama), (bad if side == "b" else tiny_llama), (bad if side == "dense" else tiny_llama)
    assert_user_error(["compare", a, b, "--dense", dense, "--only", "masks", "--out", work / "cmp", "-q"],
                      str(bad / "model.safetensors"), roots=[work])


@pytest.mark.parametrize("content,bad", [
    (b"\x00\x01\x02\xff\xfe binary" * 20, b"\xff"),  # a binary file
    ("Hallo Welt, schöne Grüße\n".encode("latin-1"), b"\xf6"),  # Latin-1: ö is 0xf6
    ("a good line\nanother good line\n".encode() + b"\x80" + b" and more\n", b"\x80"),  # one bad byte
])
def test_text_source_that_is_not_utf8_names_the_file_and_the_byte(content, bad, tiny_llama, tmp_path, work):
    offset = content.index(bad)
    texts = tmp_path / "texts"
    texts.mkdir()
    (texts / "en.txt").write_bytes(content)
    line = assert_user_error(["prune", tiny_llama, *PRUNE[:4], "--calib-source", texts, "--nsamples", "2", "--seqlen", "16",
                              "--out", work / "out"], str(texts / "en.txt"), f"byte {offset}", roots=[work])
    assert "UTF-8" in line
    assert_user_error(["eval", tiny_llama, *EVAL[:2], "--ppl-source", texts, *EVAL[4:], "--out", work / "r.json"],
                      str(texts / "en.txt"), f"byte {offset}", roots=[work])


@pytest.mark.parametrize("content", [b"\x00" * 4096, b"\x00\n\x00\n\n\x01\x02\n", b"   \n\n ... --- \n"])
def test_text_source_without_usable_text_is_refused_not_scored(content, tiny_llama, tmp_path, work):
    texts = tmp_path / "texts"
    texts.mkdir()
    (texts / "en.txt").write_bytes(content)
    assert_user_error(["eval", tiny_llama, *EVAL[:2], "--ppl-source", texts, *EVAL[4:], "--out", work / "r.json"],
                      str(texts / "en.txt"), "no usable text", roots=[work])
    assert_user_error(["prune", tiny_llama, *PRUNE[:4], "--calib-source", texts, "--nsamples", "2", "--seqlen", "16",
                       "--out", work / "out"], "no usable text", roots=[work])


def test_jsonl_text_source_that_is_not_json_names_the_file(tiny_llama, tmp_path, work):
    texts = tmp_path / "texts"
    texts.mkdir()
    (texts / "en.jsonl").write_text('{"text": "fine"}\n{"text": broken\n')
    assert_user_error(["eval", tiny_llama, *EVAL[:2], "--ppl-source", texts, *EVAL[4:], "--out", work / "r.json"],
                      str(texts / "en.jsonl"), roots=[work])


def test_usable_keeps_text_in_every_script():
    from prunekit.textsources import usable

    assert usable(" 你好 ") == "你好" and usable("مرحبا") == "مرحبا" and usable("42") == "42"
    assert usable("\x00\x00") == "" and usable(" -- \n") == ""


# --- §3 where results are written -----------------------------------------------------------------


def test_eval_out_naming_an_existing_directory(tiny_llama, work):
    (work / "results").mkdir()
    assert_user_error(["eval", tiny_llama, *EVAL, "--out", work / "results"], str(work / "results"), "is a directory",
                      roots=[work])


def _blocked(work: Path) -> Path:
    """An output location nobody can write, root included: its parent is a regular file."""
    (work / "a-file").write_text("in the way\n")
    return work / "a-file" / "out"


@pytest.fixture
def read_only(monkeypatch, work):
    """``work`` behaves as a read-only mount: creating a file in it raises EROFS, as the kernel does."""
    import tempfile

    real = tempfile.mkstemp

    def mkstemp(*args, dir=None, **kwargs):
        if dir is not None and Path(dir).resolve() == work.resolve():
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(dir))
        return real(*args, dir=dir, **kwargs)

    monkeypatch.setattr(tempfile, "mkstemp", mkstemp)
    return work


@pytest.fixture
def no_model_loads(monkeypatch):
    """The output location must be refused before any model loads."""
    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the output location was checked")

    import prunekit.evaluation.suite
    import prunekit.pipeline

    monkeypatch.setattr(prunekit.pipeline, "load_model", refuse)
    monkeypatch.setattr(prunekit.evaluation.suite, "load_model", refuse)
    monkeypatch.setattr(prunekit.evaluation.suite, "resolve_model", refuse)


def _commands(tiny_llama, tmp_path, out: Path) -> dict[str, list]:
    from tests.test_report import make_runs_dir

    runs = make_runs_dir(tmp_path / "report-input") if not (tmp_path / "report-input").exists() else tmp_path / "report-input" / "runs-dir"
    config = tmp_path / "sweep.yaml"
    config.write_text(yaml.safe_dump({
        "name": "errors", "models": [{"path": str(tiny_llama)}], "methods": ["wanda"],
        "calibration": {"sets": ["en"], "source": str(TATOEBA), "nsamples": 2, "seqlen": 16, "seeds": [0]},
        "evaluation": {"languages": ["en"], "perplexity_source": str(TATOEBA), "seqlen": 16, "max_windows": 1},
        "execution": {"device": "cpu"},
    }))
    return {
        "prune": ["prune", tiny_llama, *PRUNE, "--out", out],
        "quantize": ["quantize", tiny_llama, "--group-size", "-1", "--calib", "en", "--calib-source", TATOEBA,
                     "--nsamples", "2", "--seqlen", "16", "--out", out],
        "eval": ["eval", tiny_llama, *EVAL, "--out", out],
        "compare": ["compare", tiny_llama, tiny_llama, "--only", "masks", "--out", out, "-q"],
        "report": ["report", runs, "--out", out],
        "sweep": ["sweep", config, "--runs-dir", out, "-q"],
    }


COMMANDS = ["prune", "quantize", "eval", "compare", "report", "sweep"]


@pytest.mark.parametrize("command", COMMANDS)
def test_unwritable_output_location_fails_before_any_work(command, tiny_llama, tmp_path, work, no_model_loads):
    out = _blocked(work)
    args = _commands(tiny_llama, tmp_path, out)[command]
    assert_user_error(args, str(out), "not a directory", roots=[work])


@pytest.mark.parametrize("command", COMMANDS)
def test_read_only_output_location_fails_before_any_work(command, tiny_llama, tmp_path, read_only, no_model_loads):
    out = read_only / "out"
    args = _commands(tiny_llama, tmp_path, out)[command]
    assert_user_error(args, str(out), "read-only file system", roots=[read_only])


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_a_directory_without_write_permission_is_refused(tiny_llama, work, no_model_loads):
    locked = work / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        assert_user_error(["prune", tiny_llama, *PRUNE, "--out", locked / "out"], str(locked / "out"), roots=[work])
    finally:
        locked.chmod(0o755)


def test_prune_checks_free_space_against_the_checkpoint_size_before_loading(tiny_llama, work, monkeypatch, no_model_loads):
    from prunekit.models import expected_checkpoint_bytes

    weights = (tiny_llama / "model.safetensors").stat().st_size
    assert expected_checkpoint_bytes(str(tiny_llama), "float32") >= weights  # fp32 weights + tokenizer and config
    assert expected_checkpoint_bytes(str(tiny_llama), "bfloat16") < 0.6 * weights
    free = expected_checkpoint_bytes(str(tiny_llama), "float32") - 1
    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**12, 10**12 - free, free))
    assert_user_error(["prune", tiny_llama, *PRUNE, "--out", work / "out"], str(work / "out"), "not enough free space",
                      roots=[work])


def _enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.mark.parametrize("path", ["in-memory", "streamed"])
def test_disk_full_while_saving_a_checkpoint_leaves_nothing(tiny_llama, work, monkeypatch, path):
    import transformers.modeling_utils

    import prunekit.streaming

    def half_written(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"\0" * 1000)  # what a full disk leaves: a part of the file
        _enospc()

    def half_copied(source, target, *args, **kwargs):
        Path(target).write_bytes(b"\0" * 1000)
        _enospc()

    if path == "in-memory":  # another dtype than the checkpoint's own: the model is loaded and saved whole
        monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", half_written)
        extra = ["--dtype", "bfloat16"]
    else:  # the layers stream into a copy of the base's shards
        monkeypatch.setattr(prunekit.streaming.shutil, "copyfile", half_copied)
        extra = []
    assert_user_error(["prune", tiny_llama, "--method", "magnitude", *extra, "--out", work / "out", "-q"],
                      str(work / "out"), "no space left", roots=[work])


def test_disk_full_reported_by_safetensors_itself(tiny_llama, work, monkeypatch):
    import transformers.modeling_utils
    from safetensors import SafetensorError

    def full(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"\0" * 10)
        raise SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space left on device" })')

    monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", full)
    assert_user_error(["prune", tiny_llama, "--method", "magnitude", "--dtype", "bfloat16", "--out", work / "out", "-q"],
                      "no space left", roots=[work])


def test_disk_full_while_writing_results_leaves_nothing(tiny_llama, work, monkeypatch):
    import prunekit.io

    monkeypatch.setattr(prunekit.io.os, "fsync", _enospc)
    assert_user_error(["eval", tiny_llama, *EVAL, "--out", work / "results.json"], str(work / "results.json"),
                      "no space left", roots=[work])


def test_a_disk_error_the_checks_did_not_catch_is_still_a_user_error(tiny_llama, work, monkeypatch):
    import prunekit.pipeline

    def unwritable(*args, **kwargs):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(work / "somewhere"))

    monkeypatch.setattr(prunekit.pipeline, "load_tokenizer", unwritable)  # read on either path (streamed or whole)
    assert_user_error(["prune", tiny_llama, *PRUNE, "--out", work / "out"], str(work / "somewhere"), roots=[work])


# --- §3 corrupt state files: report ----------------------------------------------------------------


def test_report_skips_a_corrupt_results_json_with_a_warning_naming_it(tmp_path):
    from tests.test_report import make_runs_dir

    runs = make_runs_dir(tmp_path)
    damaged = sorted((runs / "runs").glob("*/results.json"))[0]
    damaged.write_text('{"kind": "prunekit-results", "perplexity": {')
    result = CliRunner().invoke(app, ["report", str(runs), "--out", str(tmp_path / "report")])
    assert result.exit_code == 0, result.output
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning: ")]
    assert len(warnings) == 1 and str(damaged) in warnings[0] and "not valid JSON" in warnings[0]
    assert (tmp_path / "report" / "report.html").is_file()


def test_report_with_only_corrupt_results_fails_clearly(tmp_path):
    from tests.test_report import make_runs_dir

    runs = make_runs_dir(tmp_path)
    for path in (runs / "runs").glob("*/results.json"):
        path.write_bytes(b"\x00" * 16)
    line = assert_user_error(["report", runs, "--out", tmp_path / "report"], "no usable results", roots=[tmp_path])
    assert "results.json" in line and "prunekit sweep" in line


# --- §4 Hub offline; --debug after the command ------------------------------------------------------


@pytest.fixture
def checkpoint(tiny_llama, tmp_path_factory) -> Path:
    import prunekit

    out = tmp_path_factory.mktemp("errors-ckpt") / "ckpt"
    prunekit.prune(str(tiny_llama), "magnitude", output=prunekit.OutputSpec(out), engine=prunekit.EngineSpec("cpu"),
                   progress=False)
    return out


@pytest.fixture
def offline(monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("PRUNEKIT_HUB_RETRIES", "5")
    monkeypatch.setenv("PRUNEKIT_HUB_BACKOFF", "3")  # a retry would take seconds: the test would see it


def test_push_and_pull_offline_fail_at_once(offline, checkpoint, work):
    for args in (["push", checkpoint, "--repo-id", "org/x"], ["pull", "org/x", "--out", work / "pulled"]):
        started = time.perf_counter()
        line = assert_user_error(args, "HF_HUB_OFFLINE", roots=[work, checkpoint])
        assert time.perf_counter() - started < 2.0 and "try again later" not in line
    # a dry run contacts nothing, so it still works offline
    code, err = run(["push", checkpoint, "--repo-id", "org/x", "--dry-run", "--staging", work / "staging"])
    assert code == 0, err


def test_offline_mode_met_inside_a_hub_call_is_not_retried():
    from huggingface_hub.errors import OfflineModeIsEnabled

    from prunekit.errors import PrunekitError
    from prunekit.hub import RetryPolicy, hub_call

    calls = []

    def call():
        calls.append(1)
        raise OfflineModeIsEnabled("offline")

    with pytest.raises(PrunekitError, match="HF_HUB_OFFLINE"):
        hub_call("reading org/x", call, repo_id="org/x", endpoint="https://hub.example", retry=RetryPolicy(5, 10.0))
    assert calls == [1]


def test_debug_is_accepted_after_the_command(monkeypatch, capsys):
    from prunekit.cli import app as app_module
    from prunekit.cli.main import main

    monkeypatch.setitem(app_module.DEBUG, "enabled", False)
    with pytest.raises(SystemExit) as exit_info:
        main(["eval", "no-such-model-dir/", "--debug"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.startswith("error: model 'no-such-model-dir/' not found")  # not "No such option"
    assert app_module.DEBUG["enabled"]

    import prunekit.pipeline

    def bug(*args, **kwargs):
        raise RuntimeError("a prunekit bug")

    monkeypatch.setattr(prunekit.pipeline, "load_tokenizer", bug)
    with pytest.raises(RuntimeError, match="a prunekit bug"):  # --debug: the traceback, not one line
        main(["prune", "embedded:gemma-3-270m", "--method", "magnitude", "--out", "/nonexistent/x", "--debug"])
    monkeypatch.setitem(app_module.DEBUG, "enabled", False)
    with pytest.raises(SystemExit) as exit_info:
        main(["prune", "embedded:gemma-3-270m", "--method", "magnitude", "--out", "/nonexistent/x"])
    assert exit_info.value.code == 1 and "internal error" in capsys.readouterr().err


# --- issue 20 item 9: CUDA out of memory ----------------------------------------------------------


def test_cuda_out_of_memory_is_a_user_error_with_advice(tiny_llama, work, monkeypatch):
    import prunekit.pipeline

    def oom(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; 79.1 GiB total capacity)")

    monkeypatch.setattr(prunekit.pipeline, "load_tokenizer", oom)
    line = assert_user_error(["prune", tiny_llama, *PRUNE, "--out", work / "out"], "out of GPU memory", roots=[work])
    for advice in ("--dtype", "--nsamples", "--batch-size", "--device cpu"):
        assert advice in line
    assert torch.cuda.OutOfMemoryError is torch.OutOfMemoryError  # one class: both spellings are caught


# --- §5 the model card tells the truth -------------------------------------------------------------


def test_card_names_the_eval_command_and_publishes_no_local_path(checkpoint, tmp_path):
    import json

    from prunekit.hub import render_model_card

    record = json.loads((checkpoint / "prunekit.json").read_text())
    local = str(Path(record["base_model"]["path"]).parent)
    record["calibration"] = {"spec": "de", "languages": ["de"], "source": str(TATOEBA), "nsamples": 2, "seqlen": 16, "seed": 0}
    record["command"] = record["command"].replace("--dtype", f"--calib de --calib-source {TATOEBA} --dtype")
    for base_model in (None, "meta-llama/Llama-3.1-8B"):
        card = render_model_card(record, repo_id="org/x", base_model=base_model)
        assert "prunekit eval org/x" in card and "prunekit evaluate" not in card
        assert local not in card and str(TATOEBA) not in card and str(Path.home()) + "/" not in card
        assert "--calib-source tatoeba" in card
        if base_model is None:
            assert "`llama` (a local base model, not on the Hub" in card
            assert "prunekit prune llama " in card
        else:
            assert f"https://huggingface.co/{base_model}" in card and f"prunekit prune {base_model} " in card


def test_an_existing_in_place_directory_needs_only_itself_writable(read_only):
    from prunekit.errors import ConfigError
    from prunekit.io import check_output_location

    runs = read_only / "runs"
    runs.mkdir()  # a sweep's runs dir that exists, inside a folder that is now read-only
    assert check_output_location(runs, in_place=True, option="--runs-dir") == runs
    with pytest.raises(ConfigError, match="read-only file system"):  # an atomic dir is staged in the parent
        check_output_location(runs)
    with pytest.raises(ConfigError, match="is a directory"):
        check_output_location(runs, kind="file")


def test_a_misspelt_backend_fails_before_loading_even_without_tasks(tiny_llama, work):
    assert_user_error(["eval", tiny_llama, *EVAL, "--backend", "vlm", "--out", work / "r.json"],
                      "unknown --backend 'vlm'", roots=[work])
