"""`prunekit eval CHECKPOINT` with nothing else: results saved in the checkpoint dir, SNR against the recorded base
model when it is on this machine (never downloaded), and both stated."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from prunekit.cli.main import app

EVAL = ["--langs", "en", "--seqlen", "64", "--max-windows", "1", "-q"]


def invoke(args):
    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def base_and_pruned(tiny_llama, tmp_path_factory) -> tuple[Path, Path]:
    """A copy of the tiny model as the base (a test may delete it) and a checkpoint pruned from it."""
    root = tmp_path_factory.mktemp("eval-defaults")
    base = shutil.copytree(tiny_llama, root / "base")
    pruned = root / "pruned"
    result = invoke(["prune", base, "--method", "magnitude", "--out", pruned, "-q"])
    assert result.exit_code == 0, result.stderr
    return base, pruned


def test_eval_saves_in_the_checkpoint_and_measures_snr_against_the_recorded_base(base_and_pruned):
    base, pruned = base_and_pruned
    result = invoke(["eval", pruned, *EVAL])
    assert result.exit_code == 0, result.stderr
    target = pruned / "results.json"
    assert f"results: {target} (the default" in result.stderr
    assert f"dense reference: {base} (the base model recorded in prunekit.json)" in result.stderr
    saved = json.loads(target.read_text())
    assert Path(saved["dense"]["spec"]) == base
    assert saved["hidden_states"]["en"]["tokens"] > 0 and saved["hidden_states"]["en"]["snr_db"] is not None
    # the same as naming the dense model: identical figures
    explicit = invoke(["eval", pruned, *EVAL, "--dense", base, "--out", pruned.parent / "explicit.json"])
    assert explicit.exit_code == 0, explicit.stderr
    named = json.loads((pruned.parent / "explicit.json").read_text())
    assert named["hidden_states"]["en"]["snr_db"] == pytest.approx(saved["hidden_states"]["en"]["snr_db"])
    assert named["perplexity"]["en"]["ppl"] == pytest.approx(saved["perplexity"]["en"]["ppl"])

    # push's locator finds them
    from prunekit.artifacts import read_record
    from prunekit.hub.locate import find_results

    assert find_results(pruned, read_record(pruned)) == target


def test_no_dense_opts_out_and_contradictions_are_refused(base_and_pruned, tmp_path):
    _, pruned = base_and_pruned
    out = tmp_path / "r.json"
    result = invoke(["eval", pruned, *EVAL, "--no-dense", "--out", out])
    assert result.exit_code == 0, result.stderr
    assert "dense reference" not in result.stderr and "results:" not in result.stderr
    saved = json.loads(out.read_text())
    assert saved["dense"] is None and saved["hidden_states"] == {}
    both = invoke(["eval", pruned, *EVAL, "--no-dense", "--dense", pruned])
    assert both.exit_code == 2 and both.stderr.startswith("error: --dense and --no-dense")


def test_a_base_that_is_gone_or_unwritable_dirs_are_stated(tiny_llama, tmp_path):
    base = shutil.copytree(tiny_llama, tmp_path / "gone")
    pruned = tmp_path / "pruned"
    assert invoke(["prune", base, "--method", "magnitude", "--out", pruned, "-q"]).exit_code == 0
    shutil.rmtree(base)
    if os.geteuid() != 0:  # root writes anywhere
        pruned.chmod(0o555)
    try:
        result = invoke(["eval", pruned, *EVAL])
    finally:
        pruned.chmod(0o755)
    assert result.exit_code == 0, result.stderr
    assert f"the recorded base model {base} is not on this machine: {base} no longer exists); add --dense MODEL" in result.stderr
    if os.geteuid() != 0:
        assert f"results: not saved ({pruned.resolve()} is not writable); add --out RESULTS.json" in result.stderr
        assert not (pruned / "results.json").exists()


def test_a_hub_base_is_used_only_from_the_cache(tiny_llama, tmp_path, monkeypatch):
    from huggingface_hub import constants

    from prunekit.evaluation.defaults import default_results_path, recorded_base
    from prunekit.models import ModelSource

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    sha = "0123456789abcdef0123456789abcdef01234567"
    record = {"base_model": {"spec": "org/tiny", "kind": "hub", "revision": sha, "path": "/somewhere/else"}}
    source, line = recorded_base(record)
    assert source is None
    assert "org/tiny is not on this machine, not in the Hugging Face cache, and eval downloads nothing unasked; --dense org/tiny downloads it" in line
    snapshot = tmp_path / "hub" / "models--org--tiny" / "snapshots" / sha
    shutil.copytree(tiny_llama, snapshot)
    source, line = recorded_base(record)
    assert source is not None and source.path == snapshot and (source.kind, source.spec, source.revision) == ("hub", "org/tiny", sha)
    assert line.startswith("dense reference: org/tiny@0123456789ab (the base model recorded in prunekit.json, from the Hugging Face cache")
    assert recorded_base(None)[0] is None and "no prunekit.json naming a base model" in recorded_base(None)[1]
    path, why = default_results_path(ModelSource("org/tiny", snapshot, "hub", sha))
    assert path is None and "org/tiny is a Hub id" in why


# ------------------------------------------------------------------ one explanation of the perplexity settings

def test_one_line_explains_each_perplexity_and_how_it_differs_from_evals():
    from prunekit.demo import DEMO_EVAL_SEQLEN, DEMO_EVAL_WINDOWS
    from prunekit.evaluation import EvaluationSpec
    from prunekit.evaluation.perplexity import DEFAULT_SEQLEN, describe_perplexity

    assert EvaluationSpec().seqlen == DEFAULT_SEQLEN == 2048 and EvaluationSpec().ppl_source == "embedded"
    plain = describe_perplexity({"source": "embedded", "seqlen": 2048, "max_windows": None}, {"en": {"windows": 1, "tokens": 1500}})
    assert plain == ("perplexity: the embedded held-out text, windows of 2048 tokens over the joined documents, all of them "
                     "(1 window, 1,500 scored tokens per language)")
    demo = describe_perplexity({"seqlen": DEMO_EVAL_SEQLEN, "max_windows": DEMO_EVAL_WINDOWS})
    assert demo.startswith("perplexity: the embedded held-out text, windows of 128 tokens over the joined documents, the first 3; "
                           "differs from `prunekit eval`'s defaults (128-token windows instead of 2048; the first 3 windows "
                           "instead of all the text): perplexities are comparable only under the same settings")
    compare = describe_perplexity({"windowing": "documents", "source": "embedded", "max_length": 512, "max_tokens": None},
                                  {"de": {"tokens": 900}, "en": {"tokens": 1100}})
    assert "each document scored on its own, cut at 512 tokens, all the text (900–1,100 scored tokens per language); " \
           "differs from `prunekit eval`'s defaults (per-document instead of 2048-token windows over the joined text)" in compare
    mc4 = describe_perplexity({"source": "mc4", "seqlen": 2048, "max_windows": None})  # 256 by default
    assert "mC4's validation split, windows of 2048 tokens over the joined documents, the first 256;" in mc4
    assert "(mc4 text instead of the embedded text)" in mc4 and "256 windows instead" not in mc4


def test_eval_prints_its_perplexity_settings(base_and_pruned, tmp_path):
    _, pruned = base_and_pruned
    result = invoke(["eval", pruned, "--langs", "en", "--seqlen", "64", "--max-windows", "1", "--no-dense",
                     "--out", tmp_path / "r.json"])
    assert result.exit_code == 0, result.stderr
    tokens = json.loads((tmp_path / "r.json").read_text())["perplexity"]["en"]["tokens"]
    assert (f"perplexity: the embedded held-out text, windows of 64 tokens over the joined documents, the first 1 (1 window, "
            f"{tokens:,} scored tokens per language); differs from `prunekit eval`'s defaults (64-token windows instead of 2048; "
            "the first 1 windows instead of all the text)") in " ".join(result.stdout.split())


def test_the_demo_says_how_its_perplexity_differs(monkeypatch, tmp_path):
    import prunekit.demo
    from prunekit.demo import DemoResult

    monkeypatch.setattr(prunekit.demo, "run_demo", lambda *a, **k: DemoResult(tmp_path, tmp_path / "report", ["a finding"], 0))
    result = CliRunner().invoke(app, ["demo", "--out", str(tmp_path)], env={"COLUMNS": "400"})
    assert result.exit_code == 0, result.output
    assert ("perplexity: the embedded held-out text, windows of 128 tokens over the joined documents, the first 3; differs from "
            "`prunekit eval`'s defaults (128-token windows instead of 2048; the first 3 windows instead of all the text)") in result.stdout
    assert "(the demo's time budget)" in result.stdout and "finding: a finding" in result.stdout
