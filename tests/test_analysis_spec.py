"""CompareSpec: every bad value fails when the spec is made, naming its field; the fingerprint is stable and
covers what changes the numbers; the CLI's options map one to one onto the spec."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from prunekit.analysis import CompareSpec
from prunekit.evaluation.spec import OptionError
from tests.conftest import TATOEBA

ROOT = Path(__file__).resolve().parents[1]
STUDY_SEVEN = ("ar", "de", "en", "es", "ru", "sw", "zh")


# --- validation -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("values, field, message", [
    ({"only": "masks,iou"}, "only", "unknown analysis 'iou' in --only; choose from masks,lsar,lape,drift"),
    ({"only": ""}, "only", "unknown analysis '' in --only"),
    ({"langs": "xx"}, "langs", "unknown language code 'xx'"),
    ({"langs": "de", "only": "lsar"}, "langs", "lsar compare languages: pass two or more with --langs (e.g. de,en,sw)"),
    ({"langs": "de"}, "langs", "lsar and lape compare languages"),
    ({"langs": "de,sw", "lsar_rank": 2}, "lsar_rank", "--lsar-rank must be between 1 and K−1 = 1"),
    ({"langs": "de,en,sw", "lsar_rank": 0}, "lsar_rank", "--lsar-rank must be between 1 and K−1 = 2"),
    ({"subspace": "shared"}, "subspace", "unknown --subspace 'shared'; use one of per_model, dense"),
    ({"lape_thresholds": "loose"}, "lape_thresholds", "unknown LAPE thresholds 'loose'"),
    ({"lape_thresholds": {"top_rate": 2.0}}, "lape_thresholds", "LAPE threshold top_rate must be in (0, 1]"),
    ({"max_tokens": 0}, "max_tokens", "--max-tokens must be a positive number of tokens per language"),
    ({"max_length": 0}, "max_length", "--max-length must be at least 1 token, got 0"),
    ({"batch_size": 0}, "batch_size", "--batch-size must be at least 1"),
    ({"chunk_elements": 0}, "chunk_elements", "--chunk-elements must be at least 1, got 0"),
    ({"dtype": "int4"}, "dtype", "unknown --dtype 'int4'"),
    ({"device": "gpu0"}, "device", "unknown --device 'gpu0': use auto, cpu or cuda[:i]"),
    ({"conventions": "paper"}, "conventions", "unknown --conventions 'paper'"),
    ({"text_source": "/no/such/dir"}, "text_source", "text source '/no/such/dir' is neither 'mc4', 'embedded' nor"),
    ({"text_source": str(TATOEBA), "langs": "de,fr"}, "text_source", "no text for language 'fr'"),
])
def test_each_bad_value_is_an_option_error_naming_its_field(values, field, message):
    with pytest.raises(OptionError) as caught:
        CompareSpec(**values)
    assert caught.value.option == field
    assert message in str(caught.value), str(caught.value)


def test_text_is_only_checked_when_a_model_runs_and_masks_need_no_languages():
    spec = CompareSpec(only="masks", langs="de", text_source="/no/such/dir", lsar_rank=5)
    assert spec.only == ("masks",) and not spec.runs_models


def test_values_are_normalized_once_and_the_spec_is_frozen():
    spec = CompareSpec(only=["drift", "masks"], langs=" de , sw ", lape_thresholds="none", conventions="STUDY")
    assert spec.only == ("masks", "drift")  # the analyses' own order
    assert spec.langs == ("de", "sw")
    assert spec.lape_thresholds == {"top_rate": 0.01, "filter_rate": None, "activation_bar_ratio": None}
    assert spec.conventions == "study"
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.langs = ("en", "de")  # type: ignore[misc]


def test_the_library_chooses_the_default_languages_and_analyses():
    spec = CompareSpec()
    assert spec.langs == STUDY_SEVEN and spec.only == ("masks", "lsar", "lape", "drift")
    assert CompareSpec(langs="all") == spec


# --- settings and fingerprint ------------------------------------------------------------------------

def test_settings_are_every_field_as_json():
    spec = CompareSpec(langs="de,sw", only="masks,drift", max_tokens=64)
    settings = spec.to_settings()
    assert list(settings) == [f.name for f in dataclasses.fields(CompareSpec)]
    assert settings["langs"] == ["de", "sw"] and settings["only"] == ["masks", "drift"] and settings["max_tokens"] == 64
    assert json.loads(json.dumps(settings)) == settings


def test_fingerprint_is_a_hash_of_the_measured_choices():
    spec = CompareSpec(langs="de,sw", only="masks,drift", max_tokens=64, device="cpu", chunk_elements=4096)
    measured = {k: v for k, v in spec.to_settings().items() if k not in ("device", "batch_size", "chunk_elements", "trust_remote_code")}
    expected = hashlib.sha256(json.dumps(measured, sort_keys=True).encode()).hexdigest()[:16]  # independent reference
    assert spec.fingerprint() == expected


def test_fingerprint_is_stable_across_spellings_and_processes_and_moves_with_the_numbers():
    spec = CompareSpec(langs="de,sw", only="masks,drift")
    same = CompareSpec(langs=["de", "sw"], only=["drift", "masks"], lape_thresholds=None, device="cpu", batch_size=4,
                       chunk_elements=8, trust_remote_code=True)
    assert spec.fingerprint() == same.fingerprint()
    code = ("from prunekit.analysis import CompareSpec; "
            "print(CompareSpec(langs='de,sw', only='masks,drift').fingerprint())")
    other_process = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                                   env={"PYTHONHASHSEED": "123", "PATH": ""}, check=True)
    assert other_process.stdout.strip() == spec.fingerprint()
    for changed in ({"max_tokens": 10}, {"max_length": 128}, {"dtype": "float32"}, {"langs": "de,en"},
                    {"only": "masks"}, {"subspace": "dense"}, {"text_source": "mc4"}):
        values = {"langs": "de,sw", "only": "masks,drift"} | changed
        assert CompareSpec(**values).fingerprint() != spec.fingerprint(), changed


# --- the CLI builds the spec once, from one option per field -------------------------------------------

@pytest.fixture
def captured(monkeypatch):
    """Run `prunekit compare` up to the library call, keeping what it was given."""
    import prunekit.analysis

    calls: list[tuple] = []

    def fake_compare(a, b, spec, **kwargs):
        calls.append((a, b, spec, kwargs))
        return {"warnings": [], "files": []}

    monkeypatch.setattr(prunekit.analysis, "compare", fake_compare)
    return calls


def _invoke(args: list[str]):
    from prunekit.cli.main import app

    return CliRunner().invoke(app, ["compare", *args], env={"COLUMNS": "200"})


def test_every_option_is_a_spec_field_under_its_name():
    import typer

    from prunekit.cli.compare_options import OPTIONS
    from prunekit.cli.main import app

    fields = {f.name for f in dataclasses.fields(CompareSpec)}
    assert set(OPTIONS) == fields - {"chunk_elements"}  # the one library-only choice
    params = {p.name: p for p in typer.main.get_command(app).commands["compare"].params}
    for name in OPTIONS:
        assert f"--{name.replace('_', '-')}" in params[name].opts, name


def test_cli_options_map_onto_the_spec(captured, tmp_path):
    out = tmp_path / "cmp"
    done = _invoke(["A", "B", "--dense", "D", "--seeds-a", "A2,A3", "--seeds-b", "B2", "--langs", "de,en,sw",
                    "--text-source", "mc4", "--only", "lsar,masks", "--max-tokens", "100", "--max-length", "64",
                    "--lsar-rank", "2", "--subspace", "dense", "--lape-thresholds", "tang", "--deactivate",
                    "--dtype", "float32", "--device", "cpu", "--batch-size", "3", "--trust-remote-code",
                    "--conventions", "study", "--out", str(out), "--overwrite", "-q"])
    assert done.exit_code == 0, done.output
    (a, b, spec, kwargs), = captured
    assert (a, b) == (["A", "A2", "A3"], ["B", "B2"])
    assert spec == CompareSpec(langs="de,en,sw", text_source="mc4", only="masks,lsar", max_tokens=100, max_length=64,
                               lsar_rank=2, subspace="dense", lape_thresholds="tang", deactivate=True, dtype="float32",
                               device="cpu", batch_size=3, trust_remote_code=True, conventions="study")
    assert kwargs == {"dense": "D", "out": out, "overwrite": True, "progress": False}


def test_cli_defaults_are_the_library_defaults(captured, tmp_path):
    done = _invoke(["A", "B", "--out", str(tmp_path / "cmp"), "-q"])
    assert done.exit_code == 0, done.output
    assert captured[0][2] == CompareSpec()


def test_cli_bad_option_is_one_error_line_naming_the_flag_before_any_work(captured, tmp_path):
    done = _invoke(["A", "B", "--langs", "de,sw", "--lsar-rank", "3", "--out", str(tmp_path / "cmp")])
    assert done.exit_code == 2
    assert done.stderr.strip() == "error: --lsar-rank must be between 1 and K−1 = 1"
    assert not captured and not (tmp_path / "cmp").exists()


# --- the sweep's analysis stage builds one spec too ---------------------------------------------------------

def test_the_sweep_analysis_stage_hands_compare_one_spec_from_its_section(captured, tiny_llama, tmp_path):
    from prunekit.artifacts import record_path
    from prunekit.sweep import stages
    from prunekit.sweep.config import load_config
    from prunekit.sweep.grid import expand

    config = load_config({
        "name": "cmp", "models": [{"path": str(tiny_llama)}], "methods": ["wanda"],
        "calibration": {"sets": ["de", "sw"], "source": str(TATOEBA), "nsamples": 2, "seqlen": 16, "seeds": [0, 1]},
        "evaluation": {"languages": ["de", "sw"], "perplexity_source": str(TATOEBA), "seqlen": 16},
        "analysis": {"pairs": [["de", "sw"]], "only": ["masks", "drift"], "max_tokens": 32},
        "execution": {"device": "cpu"},
    })
    task, = expand(config).analysis
    for run_id in task.runs:  # stand-ins for the pruned checkpoints (compare itself is replaced)
        record_path(tmp_path / "runs" / run_id / "checkpoint").parent.mkdir(parents=True)
        record_path(tmp_path / "runs" / run_id / "checkpoint").write_text("{}")
    stages.run_analysis(config, tmp_path, task, progress=False)
    (a, b, spec, kwargs), = captured
    assert spec == CompareSpec(langs="de,sw", text_source=config.ppl_source, only="masks,drift", max_tokens=32,
                               dtype=task.model.dtype, device="cpu")
    assert [Path(c).parent.name for c in a] == list(task.runs_a) and [Path(c).parent.name for c in b] == list(task.runs_b)
    assert kwargs["dense"] == task.model.spec and kwargs["overwrite"] is True


def test_the_sweep_redoes_an_analysis_when_its_section_changes_what_it_measures(tiny_llama, tmp_path):
    """The analysis stage's fingerprint is its CompareSpec's: another analysis or token budget runs it
    again; where it runs (the device) does not."""
    from prunekit.sweep.config import load_config
    from prunekit.sweep.grid import expand
    from prunekit.sweep.layout import analysis_fingerprint

    def fingerprint(analysis: dict, device: str = "cpu") -> str:
        config = load_config({
            "name": "cmp", "models": [{"path": str(tiny_llama)}], "methods": ["wanda"],
            "calibration": {"sets": ["de", "sw"], "source": str(TATOEBA), "nsamples": 2, "seqlen": 16},
            "evaluation": {"languages": ["de", "sw"], "perplexity_source": str(TATOEBA), "seqlen": 16},
            "analysis": {"pairs": [["de", "sw"]], **analysis},
            "execution": {"device": device},
        })
        task, = expand(config).analysis
        return analysis_fingerprint(config, tmp_path, task)

    base = fingerprint({"only": ["masks", "drift"], "max_tokens": 32})
    assert fingerprint({"only": ["masks", "drift"], "max_tokens": 32}) == base
    assert fingerprint({"only": ["masks"], "max_tokens": 32}) != base
    assert fingerprint({"only": ["masks", "drift"], "max_tokens": 64}) != base
    assert fingerprint({"only": ["masks", "drift"], "max_tokens": 32}, device="auto") == base
