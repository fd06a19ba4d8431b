"""The typed specs of a run (calibration, output), the method-kind check and the record's per-kind
readers: validated once, with the messages the CLI prints; no model is loaded here."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

import prunekit
from prunekit import artifacts
from prunekit.errors import ConfigError
from prunekit.pipeline import OutputSpec, method_of_kind, run_identity, specs_from_keywords
from prunekit.recipe import CalibrationSpec, Pattern, Recipe


@pytest.mark.parametrize("kwargs,message", [
    ({"languages": "xx"}, "unknown language code 'xx'"),
    ({"nsamples": 0}, "--nsamples must be at least 1, got 0"),
    ({"seqlen": 1}, "--seqlen must be at least 2, got 1"),
    ({"conventions": "paper"}, "unknown --conventions 'paper'"),
])
def test_a_calibration_spec_is_validated_when_it_is_made(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        CalibrationSpec(**kwargs)


def test_the_method_fills_in_or_refuses_the_calibration_text():
    spec = CalibrationSpec(source=Path("texts"), conventions=" Study ")
    assert spec.source == "texts" and spec.conventions == "study"
    assert spec.for_method("wanda", True).languages == "en"
    assert spec.for_method("magnitude", False) == spec and not spec.uses_text
    with pytest.raises(ConfigError, match="method 'magnitude' uses no calibration text: drop --calib de"):
        CalibrationSpec("de").for_method("magnitude", False)


def test_the_run_identity_is_the_one_it_was_before_the_spec():
    """Run ids name sweep run dirs and Hub repos: the spec must hash to the same identity as the loose fields did."""
    recipe = Recipe("wanda", pattern=Pattern(0.5))
    spec = CalibrationSpec("en+de", "embedded", 128, 2048, 1)
    identity, run_id = run_identity("org/m", None, recipe, spec, "auto", None)
    before = {"model": "org/m", "revision": None, "recipe": recipe.to_json(),
              "calibration": {"calib": "en+de", "source": "embedded", "nsamples": 128, "seqlen": 2048, "seed": 1},
              "dtype": "auto", "skip_layers": None}
    assert identity == before
    assert run_id == hashlib.sha256(json.dumps(before, sort_keys=True).encode()).hexdigest()[:12]
    assert run_identity("org/m", None, recipe, CalibrationSpec(), "auto", None)[0]["calibration"] is None


def test_an_output_spec_is_validated_when_it_is_made():
    assert OutputSpec("out").out == Path("out")
    with pytest.raises(ConfigError, match="unknown --dtype 'float8'"):
        OutputSpec("out", dtype="float8")
    with pytest.raises(ConfigError, match="--format must be one of packed, dense, got 'gguf'"):
        OutputSpec("out", checkpoint_format="gguf")


def test_prune_takes_the_specs_or_the_keywords_they_are_made_of():
    calibration, output = specs_from_keywords(None, None, {"calib": "sw", "nsamples": 4, "out": "o", "dtype": "float32"})
    assert calibration == CalibrationSpec("sw", nsamples=4) and output == OutputSpec("o", "float32")
    with pytest.raises(TypeError, match="calibration= or calib=, not both"):
        specs_from_keywords(CalibrationSpec("sw"), None, {"calib": "de"})
    with pytest.raises(TypeError, match="unexpected keyword argument 'calibrate'"):
        specs_from_keywords(None, None, {"calibrate": "de"})
    assert prunekit.CalibrationSpec is CalibrationSpec and prunekit.OutputSpec is OutputSpec


def test_the_method_kind_is_checked_by_the_library():
    assert method_of_kind("gptq", "quantize").kind == "quantize" and method_of_kind("gptq").name == "gptq"
    with pytest.raises(ConfigError, match=r"'gptq' is a quantization method: use `prunekit quantize` \(pruning methods: "):
        method_of_kind("gptq", "prune")
    with pytest.raises(ConfigError, match="'wanda' is a pruning method: use `prunekit prune --method wanda`"):
        method_of_kind("wanda", "quantize")


def test_records_are_read_by_their_kind():
    pruned = {"recipe": {"method": "wanda", "kind": "prune"}, "sparsity": {"overall": 0.5}, "timings": {"prune_s": 2.0}}
    quantized = {"recipe": {"method": "gptq", "kind": "quantize"}, "quantization": {"format": "pack-quantized"},
                 "timings": {"quantize_s": 3.0}}
    old_quantized = {"recipe": {"method": "gptq", "quantization": {"bits": 4}}, "quantization": {"format": "dense"}}
    assert artifacts.record_kind(pruned) == "prune" and artifacts.record_kind(old_quantized) == "quantize"
    assert artifacts.overall_sparsity(pruned) == 0.5 and artifacts.overall_sparsity(quantized) is None
    assert artifacts.quantization_summary(quantized) == {"format": "pack-quantized"} and artifacts.quantization_summary(pruned) is None
    assert artifacts.method_seconds(pruned) == 2.0 and artifacts.method_seconds(quantized) == 3.0
    assert artifacts.sparsity_summary(quantized) is None and artifacts.method_seconds(old_quantized) is None
