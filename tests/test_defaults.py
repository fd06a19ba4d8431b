"""The shortest commands succeed offline (issue 21), and every command's --help example runs as written
against the tiny test model (only the model path substituted)."""

from __future__ import annotations

import json
import re
import shlex
import shutil
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from prunekit.cli.main import app
from prunekit.languages import STUDY_LANGUAGES
from tests.conftest import TEST_DATA

SEVEN = list(STUDY_LANGUAGES)


def invoke(args: list[str]):
    return CliRunner().invoke(app, [str(a) for a in args])


def record_of(out: Path) -> dict:
    return json.loads((out / "prunekit.json").read_text())


def test_prune_with_only_model_method_and_out_sizes_the_calibration_to_the_text(tiny_llama, tmp_path):
    out = tmp_path / "wanda"
    result = invoke(["prune", tiny_llama, "--method", "wanda", "--out", out])
    assert result.exit_code == 0, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("calibration: ")]
    assert len(lines) == 1, result.stderr
    calib = record_of(out)["calibration"]
    n, s = calib["nsamples"], calib["seqlen"]
    assert f"calibration: {n} samples × {s} tokens" in lines[0] and "not given" in lines[0]
    assert calib["spec"] == "en" and calib["source"] == "embedded"
    assert calib["sizing"]["auto"] == ["--nsamples", "--seqlen"] and calib["sizing"]["message"] == lines[0]
    assert s <= 512  # the tiny model's context caps the study's 8192
    # the text really is the limit: one more window of this length would not fit, and the command reproduces it
    assert calib["sizing"]["windows_supplied"]["en"] == n and n < 128
    assert f"--nsamples {n} --seqlen {s}" in record_of(out)["command"]
    assert record_of(out)["conventions"]["name"] == "prunekit"


def test_explicit_sizes_the_text_cannot_supply_keep_the_clear_error(tiny_llama, tmp_path):
    result = invoke(["prune", tiny_llama, "--method", "wanda", "--nsamples", "128", "--seqlen", "2048", "--out", tmp_path / "o"])
    assert result.exit_code == 2
    assert result.stderr.startswith("error: language 'en'") and "calibration text too short" in result.stderr
    assert not (tmp_path / "o").exists()


def test_only_one_size_given_sizes_the_other(tiny_llama, tmp_path):
    out = tmp_path / "o"
    result = invoke(["prune", tiny_llama, "--method", "sparsegpt", "--seqlen", "64", "--calib", "de+sw", "--out", out, "-q"])
    assert result.exit_code == 0, result.stderr
    calib = record_of(out)["calibration"]
    assert calib["seqlen"] == 64 and calib["nsamples"] == 128  # the embedded de and sw texts hold 64 windows of 64 tokens
    assert calib["sizing"]["auto"] == ["--nsamples"] and calib["samples_per_language"] == {"de": 64, "sw": 64}


def test_magnitude_builds_no_calibration_set_and_refuses_calib(tiny_llama, tmp_path):
    out = tmp_path / "m"
    result = invoke(["prune", tiny_llama, "--method", "magnitude", "--out", out])
    assert result.exit_code == 0, result.stderr
    record = record_of(out)
    assert record["calibration"] is None and "calibration:" not in result.stderr
    assert "--calib" not in record["command"]
    refused = invoke(["prune", tiny_llama, "--method", "magnitude", "--calib", "de", "--out", tmp_path / "m2"])
    assert refused.exit_code == 2 and "error: method 'magnitude' uses no calibration text: drop --calib de" in refused.stderr
    assert not (tmp_path / "m2").exists()


def test_quantize_rtn_with_only_model_method_and_out(tiny_llama, tmp_path):
    out = tmp_path / "rtn"
    result = invoke(["quantize", tiny_llama, "--method", "rtn", "--out", out])
    assert result.exit_code == 0, result.stderr
    record = record_of(out)
    assert record["calibration"] is None and record["recipe"]["method"] == "rtn"
    refused = invoke(["quantize", tiny_llama, "--method", "rtn", "--calib", "en", "--out", tmp_path / "r2"])
    assert refused.exit_code == 2 and "uses no calibration text" in refused.stderr


def test_quantize_gptq_with_only_model_and_out(tiny_llama, tmp_path):
    out = tmp_path / "gptq"
    result = invoke(["quantize", tiny_llama, "--out", out])
    assert result.exit_code == 0, result.stderr
    calib = record_of(out)["calibration"]
    assert calib["spec"] == "en" and calib["sizing"]["auto"] == ["--nsamples", "--seqlen"]
    assert "calibration: " in result.stderr


def test_eval_without_langs_takes_the_study_seven_plus_the_calibration_languages(tiny_llama, tmp_path):
    pruned = tmp_path / "pruned"
    assert invoke(["prune", tiny_llama, "--method", "wanda", "--calib", "de", "--nsamples", "4", "--seqlen", "32",
                   "--out", pruned, "-q"]).exit_code == 0
    out = tmp_path / "r.json"
    result = invoke(["eval", pruned, "--seqlen", "64", "--max-windows", "1", "--out", out, "-q"])
    assert result.exit_code == 0, result.stderr
    results = json.loads(out.read_text())
    assert results["languages"] == SEVEN and set(results["perplexity"]) == set(SEVEN)
    assert "languages: ar,de,en,es,ru,sw,zh: its calibration language (de) plus the study's seven" in result.stderr
    dense = invoke(["eval", tiny_llama, "--seqlen", "64", "--max-windows", "1", "--ppl-source", "none", "--no-save", "-q"])
    assert dense.exit_code == 0 and "the study's seven (the checkpoint records no calibration language)" in dense.stderr


def test_the_embedded_text_sizes_calibration_for_the_real_gemma_tokenizer(embedded_gemma):
    """The issue's failing command: the embedded English text (2,541 Gemma tokens) with no sizes given."""
    from prunekit.calibration import build_calibration_set
    from prunekit.models import load_tokenizer, resolve_model

    tok = load_tokenizer(resolve_model(str(embedded_gemma)))
    calib = build_calibration_set(tok, "en", "embedded", None, None, use_cache=False, max_seqlen=32768)
    assert (calib.nsamples, calib.seqlen) == (20, 128)
    assert calib.sizing["message"].startswith("calibration: 20 samples × 128 tokens, the most that the embedded text supplies (en: 2,517 tokens")
    study = build_calibration_set(tok, "en", "embedded", None, None, use_cache=False, max_seqlen=32768, conventions="study")
    assert study.seqlen == 64 and study.nsamples == 2517 // 64  # the English passages are 71-111 tokens long


# ------------------------------------------------------------------------------------- --help examples

EXAMPLE = re.compile(r"^\s*(?:[A-Z][^:]*: )?(prunekit .+)$")


def help_examples(command: str) -> list[str]:
    """Every `prunekit ...` command line in the help text of ``command`` (lines such as 'Example: prunekit ...')."""
    import typer

    assert invoke([command, "--help"]).exit_code == 0
    text = typer.main.get_command(app).commands[command].help
    found = []
    for line in text.splitlines():
        match = EXAMPLE.match(line.strip())
        if match:
            found.append(re.sub(r"\s+\(.*\)\s*$", "", match.group(1)).strip())
    return found


COMMANDS = ["prune", "quantize", "eval", "compare", "sweep", "report"]


@pytest.fixture
def examples_dir(tmp_path, tiny_llama, monkeypatch):
    """A working directory holding what the examples refer to: checkpoints named as in the examples
    (gemma-de, de-s0, ... pruned from the tiny model), task data in data/, configs/tiny-example.yaml
    with the tiny model's path."""
    import prunekit

    monkeypatch.chdir(tmp_path)
    for lang in ("de", "sw"):  # one pruned checkpoint per language, copied under the other names (the seeds)
        prunekit.prune(str(tiny_llama), "wanda", calibration=prunekit.CalibrationSpec(lang, nsamples=4, seqlen=32),
                       output=prunekit.OutputSpec(f"{lang}-s0"), progress=False)
        for name in (f"{lang}-s1", f"{lang}-s2") + (("gemma-de",) if lang == "de" else ()):
            shutil.copytree(f"{lang}-s0", name)
    shutil.copytree(TEST_DATA, "data")
    config = (Path(__file__).resolve().parents[1] / "configs" / "tiny-example.yaml").read_text()
    Path("configs").mkdir()
    Path("configs/tiny-example.yaml").write_text(config.replace("embedded:gemma-3-270m", str(tiny_llama)))
    return tmp_path


def test_every_help_example_runs_as_written_against_the_tiny_model(examples_dir, tiny_llama):
    ran: dict[str, float] = {}
    for command in COMMANDS:
        examples = help_examples(command)
        assert examples, f"`prunekit {command} --help` shows no example"
        for example in examples:
            for part in example.split(" && "):
                if part in ran:  # `report`'s example is the second half of `sweep`'s
                    continue
                args = shlex.split(part.replace("embedded:gemma-3-270m", str(tiny_llama)))
                assert args[0] == "prunekit"
                started = time.perf_counter()
                result = invoke(args[1:] + (["-q"] if args[1] in ("prune", "quantize", "eval", "compare") else []))
                assert result.exit_code == 0, f"{part}\n{result.stdout}\n{result.stderr}"
                ran[part] = time.perf_counter() - started
    assert {part.split()[1] for part in ran} == set(COMMANDS)
    print("\n".join(f"{seconds:6.1f}s  {part}" for part, seconds in ran.items()))


def test_eval_saves_beside_the_checkpoint_and_takes_the_recorded_base_as_dense(tiny_llama, tmp_path, monkeypatch):
    """Issue 30 §7: `prunekit eval CHECKPOINT` alone writes CHECKPOINT/results.json (where push finds it) and
    measures SNR against the base the record names, when it is there without a download; it says both."""
    from prunekit.artifacts import read_record
    from prunekit.hub.locate import find_results

    base = tmp_path / "base"
    shutil.copytree(tiny_llama, base)
    pruned = tmp_path / "pruned"
    assert invoke(["prune", base, "--method", "wanda", "--calib", "de", "--nsamples", "4", "--seqlen", "32",
                   "--out", pruned, "-q"]).exit_code == 0
    short = ["--langs", "de,en", "--seqlen", "64", "--max-windows", "1", "-q"]
    result = invoke(["eval", pruned, *short])
    assert result.exit_code == 0, result.stderr
    assert f"results: {pruned / 'results.json'} (beside the checkpoint, where push finds them" in result.stderr
    assert f"dense reference: {base.resolve()}, the base the checkpoint's record names" in result.stderr
    results = json.loads((pruned / "results.json").read_text())
    assert set(results["hidden_states"]) == {"de", "en"} and results["dense"] is not None
    assert find_results(pruned, read_record(pruned)) == pruned / "results.json"

    monkeypatch.chdir(tmp_path)
    alone = invoke(["eval", pruned, *short, "--no-dense", "--out", "alone.json"])
    assert alone.exit_code == 0 and "dense reference" not in alone.stderr
    assert json.loads((tmp_path / "alone.json").read_text())["hidden_states"] == {}
    shutil.move(base, tmp_path / "moved")
    gone = invoke(["eval", pruned, *short, "--no-save"])
    assert gone.exit_code == 0 and f"the recorded base {base} is no longer at {base.resolve()}" in gone.stderr
    for both in (["--no-save", "--out", "x.json"], ["--no-dense", "--dense", str(tiny_llama)]):
        assert invoke(["eval", pruned, *short, *both]).exit_code == 2


def test_recorded_dense_never_downloads(tmp_path, monkeypatch):
    """A Hub base is taken only from the Hugging Face cache; an embedded one only when its package is installed;
    a Hub id or an embedded model's results go to the current directory."""
    import prunekit.evaluation.defaults as defaults
    from prunekit.artifacts import CHECKPOINT_KIND, write_record
    from prunekit.io import versioned

    checkpoint = tmp_path / "ckpt"
    checkpoint.mkdir()
    write_record(checkpoint, versioned(CHECKPOINT_KIND, {"base_model": {"spec": "org/base", "kind": "hub", "revision": "abc"}}))
    monkeypatch.setattr(defaults, "_hub_snapshot", lambda repo, revision: None)
    spec, note = defaults.recorded_dense(checkpoint)
    assert spec is None and "not in the Hugging Face cache; give --dense org/base to download it" in note
    snapshot = tmp_path / "snapshots" / "abc"
    monkeypatch.setattr(defaults, "_hub_snapshot",
                        lambda repo, revision: snapshot if (repo, revision) == ("org/base", "abc") else None)
    source = defaults.recorded_dense(checkpoint)[0]  # the cached snapshot itself: using it asks the Hub nothing
    assert (source.spec, source.path, source.kind, source.revision) == ("org/base", snapshot, "hub", "abc")
    write_record(checkpoint, versioned(CHECKPOINT_KIND, {"base_model": {"spec": "embedded:no-such", "kind": "embedded"}}))
    assert defaults.recorded_dense(checkpoint)[0] is None
    assert defaults.recorded_dense(tmp_path / "no-record") == (None, None)
    monkeypatch.chdir(tmp_path)
    assert defaults.default_results_path("org/base")[0] == tmp_path / "base.results.json"
    assert defaults.default_results_path("embedded:gemma-3-270m")[0] == tmp_path / "gemma-3-270m.results.json"


def test_one_explanation_of_the_perplexity_settings_matches_the_defaults():
    """Issue 30 §6: the note says why eval, the demo and compare give three perplexities; its figures are the
    defaults themselves, and each place prints its own settings with it."""
    from prunekit.analysis.activations import DEFAULT_MAX_LENGTH
    from prunekit.artifacts import PERPLEXITY_SETTINGS_NOTE, passage_perplexity_settings, windows_perplexity_settings
    from prunekit.demo import DEMO_EVAL_SEQLEN, DEMO_EVAL_WINDOWS
    from prunekit.evaluation import EvaluationSpec

    assert EvaluationSpec().max_windows is None
    assert f"every window of {EvaluationSpec().seqlen} tokens" in PERPLEXITY_SETTINGS_NOTE
    assert f"first {DEMO_EVAL_WINDOWS} windows of {DEMO_EVAL_SEQLEN} tokens" in PERPLEXITY_SETTINGS_NOTE
    assert f"(up to {DEFAULT_MAX_LENGTH} tokens)" in PERPLEXITY_SETTINGS_NOTE
    assert windows_perplexity_settings({"seqlen": 128, "max_windows": 3, "ppl_source": "embedded"}) == (
        "perplexity: the first 3 windows of 128 tokens of the embedded held-out text per language")
    assert passage_perplexity_settings({"max_length": 512, "max_tokens": None, "text_source": "embedded"}) == (
        "perplexity: each passage scored on its own (up to 512 tokens), all its passages per language, embedded text")


def test_eval_prints_its_perplexity_settings(tiny_llama, tmp_path):
    result = CliRunner().invoke(app, ["eval", str(tiny_llama), "--langs", "en", "--seqlen", "64", "--max-windows", "1",
                                      "--no-save"], terminal_width=400)
    assert result.exit_code == 0, result.output
    text = " ".join(result.stdout.split())
    assert "perplexity: the first 1 window of 64 tokens of the embedded held-out text per language." in text
    assert "comparable only between runs with the same settings" in text
