"""`prunekit.analysis.compare` and `prunekit compare` end to end; hooks against independent references."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from prunekit.analysis import CompareSpec, compare
from prunekit.analysis.activations import PassSettings, prepare_texts, run_pass
from prunekit.errors import ConfigError
from prunekit.io import read_versioned
from prunekit.models import load_model
from tests.conftest import TATOEBA, build_tiny_model

QUIET = PassSettings(progress=False)

ROOT = Path(__file__).resolve().parents[1]
DRIFT_8 = CompareSpec(langs="de,sw", text_source=str(TATOEBA), only="drift", max_tokens=8)


def prune_copy(src: Path, dst: Path, seed: int, density: float = 0.5) -> Path:
    shutil.copytree(src, dst)
    file = dst / "model.safetensors"
    state = load_file(file)
    gen = torch.Generator().manual_seed(seed)
    for name, tensor in state.items():
        if name.endswith("_proj.weight"):
            tensor[torch.rand(tensor.shape, generator=gen) < density] = 0.0
    save_file(state, file, metadata={"format": "pt"})
    return dst


@pytest.fixture(scope="module")
def trio(tmp_path_factory, tiny_llama) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("compare")
    return {
        "dense": tiny_llama,
        "a": prune_copy(tiny_llama, root / "a", seed=1),
        "b": prune_copy(tiny_llama, root / "b", seed=2),
        "b_same": prune_copy(tiny_llama, root / "b_same", seed=2),
    }


def test_analysis_does_not_import_the_pruning_stack(trio, tmp_path):
    code = (
        "import sys\n"
        "import prunekit.analysis as a\n"
        "from prunekit.analysis import api, masks, lsar, lape, drift, activations, figures, checkpoints\n"
        "import prunekit.cli.compare\n"
        f"a.compare({str(trio['a'])!r}, {str(trio['b'])!r}, a.CompareSpec(langs='de,sw', text_source={str(TATOEBA)!r}, "
        f"only='masks,drift', max_tokens=16), out={str(tmp_path / 'out')!r}, progress=False)\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[:2] in (['prunekit', 'engine'], ['prunekit', 'pipeline'],"
        " ['prunekit', 'methods']))\n"
        "print('LOADED', bad)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert "LOADED []" in done.stdout


def test_drift_hooks_read_the_residual_stream_not_the_final_norm(trio):
    result = compare(trio["dense"], trio["a"], CompareSpec(langs="de,sw", text_source=str(TATOEBA), only="drift",
                                                         max_tokens=60), progress=False)
    drift = result["drift"]["per_target"]["b"]["per_language"]
    assert result["reference"] == "a" and result["targets"] == ["b"]
    dense, tok, _ = load_model(str(trio["dense"]))
    pruned, _, _ = load_model(str(trio["a"]))
    texts = prepare_texts(tok, ["de", "sw"], str(TATOEBA), max_tokens=60)

    def final_layer_outputs(model, ids):  # independent: the input of the final norm
        got = {}
        handle = model.model.norm.register_forward_pre_hook(lambda m, args: got.setdefault("h", args[0]))
        out = model(input_ids=ids, output_hidden_states=True)
        handle.remove()
        return out.hidden_states, got["h"]

    for lang in ("de", "sw"):
        sums = np.zeros(3)
        post_norm = 0.0
        tokens = 0
        with torch.no_grad():
            for s in texts.samples[lang]:
                hd, last_d = final_layer_outputs(dense, s.input_ids[None])
                hp, last_p = final_layer_outputs(pruned, s.input_ids[None])
                for layer in range(2):  # hidden_states[l + 1] is the output of layer l, except the last
                    sums[layer] += (hd[layer + 1] - hp[layer + 1]).abs().double().sum().item()
                sums[2] += (last_d - last_p).abs().double().sum().item()
                post_norm += (hd[-1] - hp[-1]).abs().double().sum().item()
                tokens += s.input_ids.numel()
        expected = sums / (tokens * 64)
        assert drift[lang]["tokens"] == tokens
        assert np.allclose(drift[lang]["mean_abs"], expected, rtol=1e-5)
        assert drift[lang]["mean_abs"][2] != pytest.approx(post_norm / (tokens * 64), rel=1e-3)


def test_sentence_embeddings_exclude_bos_and_special_tokens(tiny_llama, tmp_path):
    from tokenizers.processors import TemplateProcessing
    from transformers import AutoTokenizer

    model_dir = tmp_path / "with-bos"
    shutil.copytree(tiny_llama, model_dir)
    tok = AutoTokenizer.from_pretrained(model_dir)
    tok.backend_tokenizer.post_processor = TemplateProcessing(
        single="<bos> $A", special_tokens=[("<bos>", tok.bos_token_id)]
    )
    texts = prepare_texts(tok, ["de", "en"], str(TATOEBA), max_tokens=40)
    sample = texts.samples["de"][0]
    assert int(sample.input_ids[0]) == tok.bos_token_id
    assert not bool(sample.valid[0]) and bool(sample.valid[1:].all())
    assert texts.provenance["languages"]["de"]["valid_tokens"] == 40
    model, _, _ = load_model(str(model_dir))
    result = run_pass(model, texts, label="test", embeddings=True, settings=QUIET)
    with torch.no_grad():
        hidden = model(input_ids=sample.input_ids[None], output_hidden_states=True).hidden_states
    expected = hidden[1][0, 1:].double().mean(dim=0).numpy()  # layer 0 output, BOS left out
    assert result.embeddings["de"].dtype == np.float64
    assert np.allclose(result.embeddings["de"][0, 0], expected, atol=1e-6)
    assert not np.allclose(result.embeddings["de"][0, 0], hidden[1][0].double().mean(dim=0).numpy(), atol=1e-6)


def test_a_checkpoint_against_an_identical_copy_shows_no_change(trio):
    result = compare(trio["b"], trio["b_same"], CompareSpec(langs="de,en,sw", text_source=str(TATOEBA),
                                                            only="masks,lsar,drift", max_tokens=40), progress=False)
    assert result["masks"]["comparisons"]["between"]["global"]["iou"] == 1.0
    for layer in result["lsar"]["per_target"]["b"]["per_layer"]:
        for cell in layer["per_language"].values():
            assert cell["delta_agnostic"] == 0 and cell["delta_specific"] == 0
        assert layer["orthogonality"]["reference"]["max_rel"] < 1e-10
    for per in result["drift"]["per_target"]["b"]["per_language"].values():
        assert per["mean_abs"] == [0.0, 0.0, 0.0]
    assert result["lape"] is None and result["analyses"] == ["masks", "lsar", "drift"]


def test_compare_writes_versioned_json_figures_summary_and_lape_arrays(trio, tmp_path):
    out = tmp_path / "cmp"
    spec = CompareSpec(langs="de,sw", text_source=str(TATOEBA), max_tokens=50, deactivate=True)
    result = compare(trio["a"], trio["b"], spec, dense=trio["dense"], out=out, progress=False)
    data = read_versioned(out / "compare.json", "prunekit-compare")
    chosen = {k: v for k, v in spec.to_settings().items() if k not in ("only", "trust_remote_code")}
    assert data["settings"] == chosen | {"device": "cpu", "conventions": "prunekit"}  # as resolved
    assert data["fingerprint"] == spec.fingerprint() and data["analyses"] == list(spec.only)
    assert data["kind"] == "prunekit-compare" and data["schema_version"].startswith("1.")
    assert data == json.loads(json.dumps(result))
    assert data["reference"] == "dense" and data["targets"] == ["a", "b"]
    assert data["masks"]["dense_aware"] and set(data["lsar"]["per_target"]) == {"a", "b"}
    assert data["texts"]["languages"]["de"]["valid_tokens"] == 50
    for name in ("masks_iou", "lsar", "lape", "drift"):
        assert (out / "figures" / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = (out / "summary.md").read_text()
    for heading in ("## Mask IoU", "## LSAR drift", "## Hidden-state drift", "## LAPE", "## Neuron deactivation"):
        assert heading in summary
    if "## Perplexity" in summary:  # issue 30 §6: its own settings and why they differ from eval's
        assert "perplexity: each passage scored on its own" in summary and "comparable only between runs" in summary
    arrays = np.load(out / "lape.npz", allow_pickle=False)
    assert arrays["dense_lape"].shape == (3, 128) and arrays["a_activation_probability"].shape == (3, 128, 2)
    assert list(arrays["langs"]) == ["de", "sw"]
    lape = data["lape"]
    assert lape["bins"]["bins"] == 50 and set(lape["bins"]["global"]) == {"reference", "a", "b"}
    deact = lape["deactivation"]["per_model"]["dense"]
    assert any(cells is not None for cells in deact.values())
    assert set(data["perplexity"]) == {"dense", "a", "b"}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging dir left


def test_models_with_different_tokenizers_are_refused_for_model_runs(trio, tmp_path):
    from tokenizers.processors import TemplateProcessing
    from transformers import AutoTokenizer

    from prunekit.errors import ModelError

    other = tmp_path / "other-tokenizer"
    shutil.copytree(trio["b"], other)
    tok = AutoTokenizer.from_pretrained(other)
    tok.backend_tokenizer.post_processor = TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 1)])
    tok.save_pretrained(other)
    with pytest.raises(ModelError, match=r"\(b\) has a different tokenizer than .*\(a\)"):
        compare(trio["a"], other, DRIFT_8, progress=False)
    # a tokenizer saved again without changes passes the check
    same = tmp_path / "same-tokenizer"
    shutil.copytree(trio["b"], same)
    AutoTokenizer.from_pretrained(trio["b"]).save_pretrained(same)
    compare(trio["a"], same, DRIFT_8, progress=False)


def test_schema_document_names_every_top_level_field(trio):
    result = compare(trio["a"], trio["b"], CompareSpec(only="masks"), progress=False)
    schema = (ROOT / "analysis" / "SCHEMA.md").read_text()
    block = schema.split("## `compare.json`")[1]
    for key in list(result) + ["files"]:
        assert f"\n{key} " in block, key
    for key in result["masks"]:
        assert key in block, key


def test_existing_output_and_bad_options_are_refused_before_any_work(trio, tmp_path):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "file").write_text("x")
    with pytest.raises(ConfigError, match="not empty"):
        compare(trio["a"], trio["b"], CompareSpec(only="masks"), out=out, progress=False)
    with pytest.raises(ConfigError, match="unknown analysis 'iou'"):
        CompareSpec(only="masks,iou")
    with pytest.raises(ConfigError, match="two or more"):
        CompareSpec(only="lsar", langs="de")
    with pytest.raises(ConfigError, match="subspace"):
        CompareSpec(only="lsar", subspace="shared")


def test_cli_compare_prints_tables_and_writes_the_output_dir(trio, tmp_path):
    from prunekit.cli.main import app

    out = tmp_path / "cli"
    runner = CliRunner()
    done = runner.invoke(app, ["compare", str(trio["a"]), str(trio["b"]), "--dense", str(trio["dense"]),
                               "--langs", "de,sw", "--text-source", str(TATOEBA), "--only", "masks,drift",
                               "--max-tokens", "30", "--out", str(out)], env={"COLUMNS": "200"})
    assert done.exit_code == 0, done.output
    assert "Mask IoU" in done.stdout and "Hidden-state drift" in done.stdout
    assert (out / "compare.json").exists() and (out / "figures" / "drift.png").exists()
    assert "perplexity: each passage scored on its own (up to 512 tokens), its first 30 tokens of passages per language" in " ".join(done.stdout.split())


def test_cli_reports_mismatched_models_and_dense_inputs_in_one_line(trio, tmp_path, tokenizer):
    from prunekit.cli.main import app

    gemma = build_tiny_model("gemma3", tokenizer, tmp_path / "gemma")
    runner = CliRunner()
    done = runner.invoke(app, ["compare", str(trio["a"]), str(gemma), "--only", "masks", "--out", str(tmp_path / "x")])
    assert done.exit_code == 2
    assert done.stderr.count("\n") == 1 and "first mismatching tensor 'model.layers.0." in done.stderr
    assert not (tmp_path / "x").exists()
    done = runner.invoke(app, ["compare", str(trio["a"]), str(trio["dense"]), "--only", "masks", "-q",
                               "--out", str(tmp_path / "y")])
    assert done.exit_code == 0
    assert "warning: checkpoint b" in done.stderr and "measured sparsity 0.0000" in done.stderr


def test_cli_help_teaches_with_an_example():
    from prunekit.cli.main import app

    done = CliRunner().invoke(app, ["compare", "--help"], env={"COLUMNS": "200"})
    assert done.exit_code == 0
    assert "Example: prunekit compare" in done.stdout and "--seeds-a" in done.stdout


@pytest.mark.gemma
def test_gemma_checkpoints_pruned_on_different_languages_compare_end_to_end(embedded_gemma, tmp_path):
    import time

    import prunekit

    t0 = time.perf_counter()
    for lang in ("de", "sw"):
        prunekit.prune(str(embedded_gemma), "wanda",
                       calibration=prunekit.CalibrationSpec(lang, source=str(TATOEBA), nsamples=4, seqlen=64),
                       output=prunekit.OutputSpec(tmp_path / lang), progress=False)
    pruned = time.perf_counter() - t0
    result = compare(tmp_path / "de", tmp_path / "sw", CompareSpec(langs="de,sw", only="masks,drift", max_tokens=24),
                     dense=embedded_gemma, out=tmp_path / "cmp", progress=False)
    masks = result["masks"]
    assert masks["num_layers"] == 18 and len(masks["comparisons"]["between"]["per_layer"]) == 18 * 7
    glob = masks["comparisons"]["between"]["global"]
    # the dequantized GGUF weights hold exact zeros; Wanda prunes them first, and the dense-aware masks leave them out
    native = masks["natively_zero"]["total"]
    assert native > 0
    assert [(c + native) / glob["numel"] for c in glob["counts"]] == [pytest.approx(0.5, abs=0.01)] * 2
    # calibration language changes some of the Wanda masks, but far fewer than chance would
    assert glob["chance"] < glob["iou"] < 1.0
    assert result["names"]["a"] == "a (de)" and result["names"]["b"] == "b (sw)"
    drift = result["drift"]["per_target"]
    assert set(drift) == {"a", "b"} and all(v > 0 for v in drift["a"]["per_language"]["sw"]["mean_abs"])
    assert (tmp_path / "cmp" / "figures" / "masks_iou.png").exists()
    print(f"prune x2: {pruned:.1f}s, compare: {result['timings']['total_s']:.1f}s, IoU {glob['iou']:.3f}")


def test_each_model_is_freed_before_the_next_is_opened(trio, monkeypatch):
    """Issue 20 item 11: the reference model's memory is given back before a target is opened."""
    import weakref

    from prunekit.analysis import api
    from prunekit.evaluation import forward

    opened: list[weakref.ref] = []
    alive_at_open: list[int] = []
    original = forward.open_weights

    def spy(*args, **kwargs):
        alive_at_open.append(sum(1 for ref in opened if ref() is not None))
        weights = original(*args, **kwargs)
        opened.append(weakref.ref(weights.model))
        return weights

    monkeypatch.setattr(api, "open_weights", spy)
    compare(trio["dense"], trio["a"], CompareSpec(langs="de,sw", text_source=str(TATOEBA), only="drift", max_tokens=16),
            dense=None, progress=False)
    assert len(opened) == 2 and alive_at_open == [0, 0]


def test_a_compare_spec_is_validated_once_and_fingerprints_what_changes_the_numbers():
    """Issue 27 §1: CompareSpec, like EvaluationSpec: frozen, each bad value refused when it is made, naming the flag;
    its fingerprint ignores where and how fast the comparison runs."""
    import dataclasses

    import prunekit
    from prunekit.errors import ConfigError

    spec = CompareSpec(langs="sw,de", only="drift,masks")
    assert spec.langs == ("sw", "de") and spec.only == ("masks", "drift") and prunekit.CompareSpec is CompareSpec
    assert CompareSpec().langs == ("ar", "de", "en", "es", "ru", "sw", "zh") and CompareSpec().only == ("masks", "lsar", "lape", "drift")
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.langs = ("en",)
    for bad, flag in ((dict(only="iou"), "--only"), (dict(subspace="shared"), "--subspace"), (dict(max_tokens=0), "--max-tokens"),
                      (dict(batch_size=0), "--batch-size"), (dict(max_length=0), "--max-length"),
                      (dict(only="lsar", langs="de"), "--langs"), (dict(lsar_rank=3, langs="de,sw"), "--lsar-rank"),
                      (dict(langs="xx"), "xx"), (dict(lape_thresholds="nope"), "nope")):
        with pytest.raises(ConfigError, match=flag):
            CompareSpec(**bad)
    assert spec.fingerprint() == CompareSpec(langs="sw,de", only="masks,drift", device="cpu", batch_size=8).fingerprint()
    assert spec.fingerprint() != CompareSpec(langs="sw,de", only="masks,drift", max_tokens=64).fingerprint()
    assert spec.to_settings()["lape_thresholds"] == CompareSpec(lape_thresholds="none").lape_thresholds


def test_the_compare_command_makes_one_spec_from_its_options(monkeypatch, tmp_path):
    """Each option has the spec field's name; the command hands the spec whole to the library."""
    from typer.testing import CliRunner

    import prunekit.analysis as analysis
    from prunekit.cli.compare_options import OPTIONS
    from prunekit.cli.main import app

    assert set(OPTIONS) <= {f.name for f in dataclasses_fields(CompareSpec)}
    seen = {}

    def fake(a, b, spec, **kwargs):
        seen.update(a=a, b=b, spec=spec, **kwargs)
        return {"warnings": [], "files": []}

    monkeypatch.setattr(analysis, "compare", fake)
    done = CliRunner().invoke(app, ["compare", "A", "B", "--langs", "de,sw", "--only", "masks", "--max-tokens", "9",
                                    "--out", str(tmp_path / "o"), "-q"])
    assert done.exit_code == 0, done.output
    assert seen["spec"] == CompareSpec(langs="de,sw", only="masks", max_tokens=9)
    assert seen["dense"] is None and seen["out"] == tmp_path / "o"
    bad = CliRunner().invoke(app, ["compare", "A", "B", "--subspace", "shared", "--out", str(tmp_path / "o")])
    assert bad.exit_code == 2 and "unknown --subspace 'shared'" in bad.output


def dataclasses_fields(cls):
    import dataclasses

    return dataclasses.fields(cls)
