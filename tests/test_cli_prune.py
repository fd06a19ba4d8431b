"""`prunekit prune` end to end, and every bad input giving one clear line and no output dir."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from typer.testing import CliRunner
from transformers import AutoModelForCausalLM, AutoTokenizer

from prunekit.cli.main import app
from tests.conftest import TATOEBA


def test_prune_cli_end_to_end_reloads_with_plain_transformers(tiny_llama, tmp_path):
    out = tmp_path / "pruned"
    cmd = [sys.executable, "-m", "prunekit.cli.main", "prune", str(tiny_llama), "--method", "sparsegpt",
           "--pattern", "2:4", "--calib", "de+sw", "--calib-source", str(TATOEBA), "--nsamples", "4",
           "--seqlen", "32", "--out", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, env=os.environ | {"COLUMNS": "200"})
    assert done.returncode == 0, done.stderr
    assert "overall sparsity" in done.stdout
    model = AutoModelForCausalLM.from_pretrained(out)
    AutoTokenizer.from_pretrained(out)
    q = model.model.layers[1].self_attn.q_proj.weight
    assert ((q == 0).reshape(q.shape[0], -1, 4).sum(-1) == 2).all()
    record = json.loads((out / "prunekit.json").read_text())
    assert record["schema_version"].startswith("1.") and record["recipe"]["pattern"]["name"] == "2:4"
    assert record["calibration"]["samples_per_language"] == {"de": 2, "sw": 2}
    assert record["sparsity"]["overall"] == pytest.approx(0.5)
    assert record["command"].startswith("prunekit prune ") and "--pattern 2:4" in record["command"]
    assert all(m["relative_error"] is not None for layer in record["sparsity"]["per_layer"] for m in layer["modules"])
    assert {"torch", "transformers", "prunekit"} <= set(record["versions"])
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging dir left


BAD_INPUTS = [
    (["--calib", "xx"], "unknown language code 'xx'"),
    (["--sparsity", "0"], "strictly between 0 and 1"),
    (["--sparsity", "1"], "strictly between 0 and 1"),
    (["--sparsity", "-0.2"], "strictly between 0 and 1"),
    (["--pattern", "3:2"], "0 < N < M"),
    (["--pattern", "0:4"], "0 < N < M"),
    (["--pattern", "a:b"], "malformed --pattern 'a:b'"),
    (["--pattern", "2:4", "--sparsity", "0.6"], "--pattern 2:4 means sparsity 0.5"),
    (["--method", "wandda"], "did you mean 'wanda'"),
    (["--method", "gptq"], "use `prunekit quantize`"),
    (["--nsamples", "500", "--seqlen", "256", "--calib", "sw"], "calibration text too short"),
    (["--skip-layers", "9"], "layer 9 does not exist"),
    (["--method", "sparsegpt", "--solve-threads", "0"], "--solve-threads must be >= 1"),
]


@pytest.mark.parametrize("extra,message", BAD_INPUTS)
def test_bad_input_gives_one_clear_line_and_no_output(extra, message, tiny_llama, tmp_path):
    out = tmp_path / "out"
    args = ["prune", str(tiny_llama), "--calib", "de", "--calib-source", str(TATOEBA), "--nsamples", "2", "--seqlen", "16", "--out", str(out), "--quiet"]
    result = CliRunner().invoke(app, args + extra)
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], result.stderr
    assert not out.exists()
    assert not list(tmp_path.iterdir())


def test_missing_model_path(tmp_path):
    result = CliRunner().invoke(app, ["prune", str(tmp_path / "nope"), "--out", str(tmp_path / "o"), "--quiet"])
    assert result.exit_code == 2 and "not found" in result.stderr and not (tmp_path / "o").exists()


def test_non_empty_out_needs_overwrite(tiny_llama, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    args = ["prune", str(tiny_llama), "--calib", "de", "--calib-source", str(TATOEBA), "--nsamples", "2", "--seqlen", "16", "--out", str(out), "--quiet"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2 and "--overwrite" in result.stderr
    assert (out / "keep.txt").read_text() == "mine"
    result = CliRunner().invoke(app, args + ["--overwrite"])
    assert result.exit_code == 0, result.stderr
    assert (out / "prunekit.json").exists() and not (out / "keep.txt").exists()


def test_magnitude_needs_no_calibration(tiny_llama, tmp_path):
    import prunekit

    result = prunekit.prune(str(tiny_llama), "magnitude", output=prunekit.OutputSpec(tmp_path / "m"), progress=False)
    assert result.record["calibration"] is None and result.record["sparsity"]["overall"] == pytest.approx(0.5)
    weight = AutoModelForCausalLM.from_pretrained(tmp_path / "m").model.layers[0].mlp.up_proj.weight
    assert int((weight == 0).sum()) == weight.numel() // 2
    assert torch.isfinite(weight).all()


def test_a_commands_own_exit_code_is_not_reported_as_an_internal_error(capsys):
    import typer

    from prunekit.cli.app import user_errors

    @user_errors
    def some_runs_failed():
        raise typer.Exit(1)

    with pytest.raises(typer.Exit) as raised:
        some_runs_failed()
    assert raised.value.exit_code == 1
    assert "internal error" not in capsys.readouterr().err
