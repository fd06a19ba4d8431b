"""The typed specs of a run (calibration, output), the method-kind check and the record's per-kind
readers: validated once, with the messages the CLI prints; no model is loaded here."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import pytest

import prunekit
from prunekit import artifacts
from prunekit.errors import ConfigError
from prunekit.pipeline import OutputSpec, method_of_kind, run_identity
from prunekit.recipe import CalibrationSpec, EngineSpec, Pattern, Recipe


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


@pytest.mark.parametrize("keyword", ["calib", "calib_source", "nsamples", "seqlen", "seed", "conventions", "out", "dtype",
                                     "checkpoint_format", "overwrite", "stream", "device", "skip_layers", "batch_size",
                                     "solve_threads", "trust_remote_code", "kind"])
def test_prune_takes_the_specs_only(keyword):
    """The fields of the specs are not keywords of ``prune`` (its entrance before the specs is gone): Python's
    own TypeError, before anything is resolved or loaded."""
    with pytest.raises(TypeError, match=f"unexpected keyword argument '{keyword}'"):
        prunekit.prune("embedded:does-not-exist", "wanda", **{keyword: None})
    assert prunekit.CalibrationSpec is CalibrationSpec and prunekit.OutputSpec is OutputSpec
    assert prunekit.EngineSpec is EngineSpec


def test_prune_s_parameters_are_the_model_the_target_and_the_specs():
    import inspect

    parameters = inspect.signature(prunekit.prune).parameters
    assert list(parameters) == ["model", "method", "sparsity", "pattern", "quantization", "calibration", "output",
                                "engine", "revision", "progress"]
    assert EngineSpec() == EngineSpec("auto", None, None, None, False)
    with pytest.raises(dataclasses.FrozenInstanceError):
        EngineSpec().device = "cpu"  # type: ignore[misc]


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


# ------------------------------------------------------------------------------------ EvaluationSpec


@pytest.mark.parametrize("kwargs,message", [
    ({"langs": "en,xx"}, "unknown language code 'xx'"),
    ({"seqlen": 1}, "--seqlen must be at least 2, got 1"),
    ({"batch_size": 0}, "--batch-size must be at least 1, got 0"),
    ({"snr_tokens": 1}, "--snr-tokens must be at least 2, got 1"),
    ({"max_windows": 0}, "--max-windows must be at least 1, got 0"),
    ({"num_fewshot": -1}, "--num-fewshot must be >= 0, got -1"),
    ({"limit": -3}, "--limit must be positive, got -3"),
    ({"backend": "vlm"}, "unknown --backend 'vlm'"),
    ({"backend": "vllm", "gpu_memory_utilization": 1.5}, r"--gpu-memory-utilization is the fraction of the GPU vLLM may take, in \(0, 1\], got 1.5"),
    ({"backend": "vllm", "max_model_len": 0}, "--max-model-len must be at least 1 token, got 0"),
    ({"gpu_memory_utilization": 0.5}, "--gpu-memory-utilization and --max-model-len are vLLM settings: add --backend vllm"),
    ({"model_args": "enforce_eager"}, "--model-args must be key=value pairs"),
    ({"dtype": "fp8"}, "unknown --dtype 'fp8'"),
    ({"conventions": "paper"}, "unknown --conventions 'paper'"),
    ({"langs": "en", "tasks": "belebel"}, "unknown task 'belebel'"),
])
def test_an_evaluation_spec_is_validated_when_it_is_made(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        prunekit.EvaluationSpec(**kwargs)


def test_an_evaluation_spec_normalizes_once_and_fingerprints_what_changes_the_numbers(tmp_path):
    spec = prunekit.EvaluationSpec(langs="sw, en", tasks="xcopa,belebele", limit=3.0, ppl_source="none", task_data=tmp_path)
    assert spec.langs == ("sw", "en") and spec.tasks == ("xcopa", "belebele") and spec.limit == 3
    assert spec.ppl_source is None and spec.task_data == str(tmp_path.resolve())
    assert prunekit.EvaluationSpec(limit=0.5).limit == 0.5
    settings = spec.to_settings()
    assert settings["langs"] == ["sw", "en"] and json.loads(json.dumps(settings)) == settings
    same = prunekit.EvaluationSpec(langs=["sw", "en"], tasks=["xcopa", "belebele"], limit=3, ppl_source=None,
                                   task_data=str(tmp_path), device="cuda", backend="vllm", task_batch_size="auto",
                                   parallelize=True, gpu_memory_utilization=0.5)
    assert same.fingerprint() == spec.fingerprint()  # where and how fast: not part of it
    for change in ({"seqlen": 1024}, {"include_bos": True}, {"limit": 4}, {"langs": "en,sw"}, {"conventions": "study"},
                   {"backend": "vllm", "max_model_len": 512}, {"model_args": "add_bos_token=false"}):
        other = prunekit.EvaluationSpec(**(dict(langs="sw,en", tasks="xcopa,belebele", limit=3, ppl_source=None,
                                                task_data=tmp_path) | change))
        assert other.fingerprint() != spec.fingerprint(), change
    assert spec.exclude_bos and not prunekit.EvaluationSpec(include_bos=True).exclude_bos


def test_the_default_languages_are_chosen_by_the_library():
    spec, note = prunekit.EvaluationSpec().with_default_languages({"calibration": {"languages": ["fr"]}})
    assert spec.langs == ("ar", "de", "en", "es", "ru", "sw", "zh", "fr") and "fr" in note
    given, none = prunekit.EvaluationSpec(langs="de").with_default_languages({"calibration": {"languages": ["fr"]}})
    assert given.langs == ("de",) and none is None


def test_every_eval_option_is_a_spec_field_of_the_same_name():
    """One name per option from the CLI to the library (``--include-bos`` is ``include_bos``)."""
    from dataclasses import fields

    from prunekit.cli.evaluation_options import OPTIONS

    names = {f.name for f in fields(prunekit.EvaluationSpec)}
    assert set(OPTIONS) <= names
    for name, (_, option) in OPTIONS.items():
        assert f"--{name.replace('_', '-')}" in option.param_decls[0], name


def test_the_sweep_evaluation_section_is_checked_by_the_spec():
    from prunekit.sweep.schema import EvaluationSection

    section = EvaluationSection(seqlen=64, max_windows=2, snr_tokens=128)
    assert section.spec(langs="en").max_windows == 2 and section.spec(langs="en").seqlen == 64
    for key, value, message in (("seqlen", 1, "must be at least 2, got 1"), ("limit", -1, "must be positive"),
                                ("num_fewshot", -2, "must be >= 0"), ("gpu_memory_utilization", 1.5, "in (0, 1], got 1.5"),
                                ("max_model_len", 0, "must be at least 1 token"), ("max_model_len", 8, "is a vLLM setting")):
        with pytest.raises(Exception) as err:
            EvaluationSection(**{key: value})
        assert message in str(err.value) and key in str(err.value)
