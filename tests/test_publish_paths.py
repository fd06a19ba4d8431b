"""What push publishes carries no local absolute path (issue 30 §2), and push finds a sweep run's results beside
its checkpoint (issue 30 §4). A real prune and evaluation of the tiny model; push --dry-run contacts nothing."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import prunekit
from prunekit.evaluation import EvaluationSpec, evaluate
from prunekit.hub import CardInputs, PushTarget, push
from prunekit.hub.public import public_json, public_text, public_value
from tests.conftest import TATOEBA

CHECKOUT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory, tiny_llama) -> dict[str, Path]:
    """A checkpoint pruned from the tiny model, evaluated with --out (SNR against the dense model: a cached dense
    state), and the dense model's own evaluation."""
    root = tmp_path_factory.mktemp("publish")
    out = root / "pruned"
    prunekit.prune(str(tiny_llama), "wanda",
                   calibration=prunekit.CalibrationSpec("de", source=str(TATOEBA), nsamples=4, seqlen=32),
                   output=prunekit.OutputSpec(out), progress=False)
    spec = EvaluationSpec(langs="de", ppl_source=str(TATOEBA), seqlen=32, device="cpu", snr_tokens=64)
    evaluate(out, spec, dense=str(tiny_llama), out=out / "results.json", progress=False)
    evaluate(tiny_llama, spec, out=root / "dense-results.json", progress=False)
    return {"root": root, "checkpoint": out, "dense": root / "dense-results.json", "base": tiny_llama}


def local_needles(*extra: Path) -> set[str]:
    needles = {str(CHECKOUT), str(Path.home()), os.environ["PRUNEKIT_CACHE"], *map(str, extra)}
    return needles | {str(Path(n).resolve()) for n in needles}


def test_no_staged_file_holds_a_local_absolute_path(evaluated, tmp_path):
    checkpoint = evaluated["checkpoint"]
    record_before = (checkpoint / "prunekit.json").read_bytes()
    results_before = (checkpoint / "results.json").read_bytes()
    needles = local_needles(tmp_path, evaluated["root"], evaluated["base"], Path(evaluated["base"]).parent.parent)
    # the files on disk do hold them (so the scan below can fail) ...
    assert str(CHECKOUT).encode() in results_before and str(evaluated["base"]).encode() in record_before
    assert os.environ["PRUNEKIT_CACHE"].encode() in results_before  # the dense state's cache file

    staging = tmp_path / "staging"
    result = push(checkpoint, PushTarget(namespace="org"), CardInputs(dense_results=evaluated["dense"]), dry_run=True, staging=staging)
    staged = sorted(p for p in staging.rglob("*") if p.is_file())
    assert {p.name for p in staged} >= {"prunekit.json", "results.json", "README.md", "config.json", "model.safetensors"}
    for path in staged:  # ... and no staged file does
        data = path.read_bytes()
        for needle in needles:
            assert needle.encode() not in data, f"{path.name} holds {needle}"
    assert result.card == (staging / "README.md").read_text(encoding="utf-8")
    # the checkpoint itself is untouched; the staged copies keep every number and name, paths as their last component
    assert (checkpoint / "prunekit.json").read_bytes() == record_before
    assert (checkpoint / "results.json").read_bytes() == results_before
    published = json.loads((staging / "results.json").read_text())
    original = json.loads(results_before)
    assert published["perplexity"]["de"]["ppl"] == original["perplexity"]["de"]["ppl"]
    assert published["perplexity"]["de"]["source"] == "tatoeba"
    assert published["model"]["record"]["run_id"] == original["model"]["record"]["run_id"]
    assert published["hidden_states"]["de"]["dense_cache"]["file"] == \
        Path(original["hidden_states"]["de"]["dense_cache"]["file"]).name
    record = json.loads((staging / "prunekit.json").read_text())
    assert record["identity"]["model"] == Path(evaluated["base"]).name
    assert "--calib-source tatoeba" in record["command"]
    assert (staging / "model.safetensors").read_bytes() == (checkpoint / "model.safetensors").read_bytes()


def test_the_sanitiser_keeps_hub_ids_urls_keywords_and_relative_paths(tmp_path):
    local = tmp_path / "runs" / "abc" / "checkpoint"
    doc = {"a": str(local), "hub": "google/gemma-3-270m", "url": "https://huggingface.co/root/x", "kw": "embedded",
           "rel": "runs/abc/results.json", "n": 3.5, "cmd": f"prunekit prune {local} --out OUT", "list": ["/opt/x/y", None],
           "tok": f"{local}#0123"}
    assert public_value(doc) == {"a": "checkpoint", "hub": "google/gemma-3-270m", "url": "https://huggingface.co/root/x",
                                 "kw": "embedded", "rel": "runs/abc/results.json", "n": 3.5,
                                 "cmd": "prunekit prune checkpoint --out OUT", "list": ["y", None], "tok": "checkpoint#0123"}
    # a vocabulary is never parsed; other JSON (a tokenizer's settings) loses only this machine's folders
    vocab = json.dumps({"model": {"vocab": {"/usr": 1, str(local): 2}}}).encode()
    assert public_json("tokenizer.json", vocab) == vocab
    settings = json.dumps({"path-like token": "/usr", "name_or_path": str(local)}).encode()
    assert json.loads(public_json("tokenizer_config.json", settings)) == {"path-like token": "/usr", "name_or_path": "checkpoint"}
    clean = b'{"a": 1}'
    assert public_json("prunekit.json", clean) is clean  # nothing to replace: the same bytes
    assert public_text(f"see {local}/x.json and https://host.org{local}") == "see x.json and https://host.org" + str(local)


def sweep_layout(evaluated, runs: Path, dense_spec: str | None = None) -> Path:
    """RUNS/runs/<hash>/{checkpoint,results.json} and RUNS/dense/<key>/{dense.json,results.json}, as a sweep writes."""
    checkpoint = evaluated["checkpoint"]
    run_id = json.loads((checkpoint / "prunekit.json").read_text())["run_id"]
    run = runs / "runs" / run_id
    shutil.copytree(checkpoint, run / "checkpoint", ignore=shutil.ignore_patterns("results.json"))
    shutil.copy(checkpoint / "results.json", run / "results.json")
    dense = runs / "dense" / "llama-0123abcd"
    dense.mkdir(parents=True)
    spec = dense_spec or str(evaluated["base"])
    (dense / "dense.json").write_text(json.dumps({"kind": "prunekit-sweep-dense", "schema_version": "1.0",
                                                  "model": {"spec": spec, "name": "llama", "dtype": "auto", "revision": None}}))
    dense_results = json.loads(evaluated["dense"].read_text())
    dense_results["model"]["spec"] = spec
    (dense / "results.json").write_text(json.dumps(dense_results))
    other = runs / "dense" / "other-99999999"  # another model's dense evaluation is never taken
    other.mkdir()
    (other / "dense.json").write_text(json.dumps({"model": {"spec": "someone/else"}}))
    (other / "results.json").write_text(json.dumps({"model": {"spec": "someone/else"}}))
    return run / "checkpoint"


def test_push_finds_a_sweep_runs_results_and_the_dense_results_and_says_so(evaluated, tmp_path):
    checkpoint = sweep_layout(evaluated, tmp_path / "sweep")
    result = push(checkpoint, PushTarget(namespace="org"), dry_run=True, staging=tmp_path / "staging")
    run_results, dense_results = checkpoint.parent / "results.json", tmp_path / "sweep" / "dense" / "llama-0123abcd" / "results.json"
    assert any(str(run_results) in note and "beside" in note for note in result.notes), result.notes
    assert any(str(dense_results) in note for note in result.notes), result.notes
    staged = json.loads((tmp_path / "staging" / "results.json").read_text())
    assert staged["perplexity"]["de"]["ppl"] == json.loads(run_results.read_text())["perplexity"]["de"]["ppl"]
    # the card compares against the dense model: the same card as with both flags given
    explicit = push(checkpoint, PushTarget(namespace="org"), CardInputs(results=run_results, dense_results=dense_results), dry_run=True, staging=tmp_path / "staging2")
    assert explicit.card == result.card and explicit.notes == []
    link = tmp_path / "wanda-de"  # a readable name linked to the run's checkpoint finds the same files
    link.symlink_to(checkpoint, target_is_directory=True)
    linked = push(link, PushTarget(namespace="org"), dry_run=True, staging=tmp_path / "staging-link")
    assert linked.card == result.card and len(linked.notes) == 2
    shutil.rmtree(dense_results.parent)  # without the dense evaluation the card has no comparison
    alone = push(checkpoint, PushTarget(namespace="org"), CardInputs(results=run_results), dry_run=True, staging=tmp_path / "staging3")
    assert alone.card != result.card and any("add --dense-results" in note for note in alone.notes)


def test_push_says_which_flag_to_add_when_it_finds_nothing(evaluated, tmp_path):
    checkpoint = sweep_layout(evaluated, tmp_path / "sweep", dense_spec="not/the-base")
    result = push(checkpoint, PushTarget(namespace="org"), dry_run=True, staging=tmp_path / "staging")
    assert any("--dense-results" in note and "none found" in note for note in result.notes), result.notes
    # results of another run beside the checkpoint are not taken
    (checkpoint.parent / "results.json").write_text(json.dumps({"model": {"record": {"run_id": "someone-else"}}}))
    env = {**os.environ, "COLUMNS": "400"}
    run = subprocess.run([sys.executable, "-m", "prunekit.cli.main", "push", str(checkpoint), "--namespace", "org",
                          "--dry-run", "--staging", str(tmp_path / "cli-staging")],
                         env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert "results: none found" in run.stdout and "add --results RESULTS.json" in run.stdout, run.stdout
    assert not (tmp_path / "cli-staging" / "results.json").exists()
