"""``prunekit find`` and ``pull --best-for`` against the loopback Hub (tests/hub_server.py): published
checkpoints of a base model are ranked by the target language's perplexity read from their cards, cards
without metrics come last with the reason, other bases and non-prunekit repos are left out, the best one is
pulled at the commit the listing saw, and every mistake (offline, unknown base, no match) is one error line."""

from __future__ import annotations

import copy
import json
import math
import os
import time
from pathlib import Path

import pytest
import yaml
from huggingface_hub import HfApi

import prunekit
from prunekit.errors import ConfigError, HubError, ModelError
from prunekit.hub import CardInputs, PushTarget, push
from prunekit.hub.find import find_checkpoints, pull_best
from prunekit.hub.public import public_json
from tests.conftest import TATOEBA
from tests.hub_server import example_results, front_matter
from tests.test_hub import FAST, TOKEN, hf_home, hub, run_cli  # noqa: F401 - fixtures

BASE = "meta/tiny-base"
SW = {"org/ckpt-a": 30.0, "org/ckpt-b": 20.0, "org/ckpt-c": 25.0}  # pushed with these Swahili perplexities
DENSE_SW = 10.0


@pytest.fixture(scope="module")
def pruned(tmp_path_factory, tiny_llama) -> Path:
    out = tmp_path_factory.mktemp("find") / "pruned"
    prunekit.prune(str(tiny_llama), "wanda",
                   calibration=prunekit.CalibrationSpec("sw", source=str(TATOEBA), nsamples=4, seqlen=32),
                   output=prunekit.OutputSpec(out), progress=False)
    return out


def results_with_sw(record: dict, sw: float, dense: bool = False) -> dict:
    results = example_results(None if dense else record, dense=dense)
    row = copy.deepcopy(results["perplexity"]["de"])
    results["perplexity"]["sw"] = row | {"ppl": sw, "nll": math.log(sw)}
    if not dense:
        results["tasks"]["belebele_swh_Latn"] = {"group": "belebele", "language": "sw", "status": "ok", "note": "",
                                                 "metrics": {"acc": sw / 100}, "stderr": {"acc": 0.01}, "samples": 900}
    return results


@pytest.fixture
def published(hub, pruned, tmp_path):
    """Three ranked checkpoints of BASE, one without results, one of another base, one repo that is not prunekit's."""
    api = HfApi(endpoint=hub.url, token=TOKEN)
    api.create_repo(BASE)
    api.upload_file(path_or_fileobj=b"---\nlicense: mit\n---\n# base\n", path_in_repo="README.md", repo_id=BASE)
    record = json.loads((pruned / "prunekit.json").read_text())
    dense = tmp_path / "dense.json"
    dense.write_text(json.dumps(results_with_sw(record, DENSE_SW, dense=True)))
    for repo_id, sw in SW.items():
        results = tmp_path / f"{repo_id.split('/')[1]}.json"
        results.write_text(json.dumps(results_with_sw(record, sw)))
        push(pruned, PushTarget(repo_id=repo_id), CardInputs(results=results, dense_results=dense, base_model=BASE), retry=FAST)
    bare = tmp_path / "bare"
    bare.mkdir()
    for path in pruned.iterdir():
        if path.name != "results.json":
            (bare / path.name).symlink_to(path)
    push(bare, PushTarget(repo_id="org/ckpt-noresults"), CardInputs(base_model=BASE), retry=FAST)
    push(pruned, PushTarget(repo_id="org/other-base"), CardInputs(results=tmp_path / "ckpt-b.json", base_model="meta/other"), retry=FAST)
    api.create_repo("org/not-prunekit")
    api.upload_file(path_or_fileobj=f"---\nbase_model: {BASE}\ntags: [pruned]\n---\n".encode(), path_in_repo="README.md",
                    repo_id="org/not-prunekit")
    return hub


def reference_ranking(hub, lang: str) -> list[tuple[str, float]]:
    """Independent of prunekit and huggingface_hub's parsing: the stored cards' YAML, read with PyYAML."""
    rows = []
    for repo_id in hub.repos:
        meta = front_matter(hub.files(repo_id).get("README.md"))
        if "prunekit" not in (meta.get("tags") or []) or meta.get("base_model") != BASE:
            continue
        for entry in meta.get("model-index") or []:
            for result in entry["results"]:
                for metric in result["metrics"]:
                    if metric["type"] == "perplexity" and result["dataset"].get("config") == lang:
                        rows.append((repo_id, metric["value"]))
    return sorted(rows, key=lambda r: r[1])


def test_find_ranks_by_the_target_language_and_lists_cards_without_metrics_last(published):
    found = find_checkpoints(BASE, "sw", retry=FAST)
    ranked = [(row.repo_id, row.perplexity) for row in found.ranked]
    assert ranked == reference_ranking(published, "sw") == sorted(SW.items(), key=lambda kv: kv[1])
    assert [row.rank for row in found.ranked] == [1, 2, 3]
    assert [row.repo_id for row in found.rows] == ["org/ckpt-b", "org/ckpt-c", "org/ckpt-a", "org/ckpt-noresults"]
    best, last = found.rows[0], found.rows[-1]
    assert best.ratio_to_dense == pytest.approx(20.0 / DENSE_SW) and best.dense_perplexity == DENSE_SW
    assert best.revision == published.head("org/ckpt-b")
    assert best.method == "wanda" and best.kind == "prune" and best.calibration == "sw" and "unstructured" in best.recipe
    assert best.tasks == {"belebele_swh_Latn acc": pytest.approx(20.0)}  # in points, the target language only
    assert last.rank is None and last.perplexity is None and "model-index" in last.reason
    # no language: the geometric mean over each card's perplexities
    mean = find_checkpoints(BASE, retry=FAST)
    card = front_matter(published.files("org/ckpt-a")["README.md"])
    values = [m["value"] for e in card["model-index"] for r in e["results"] for m in r["metrics"] if m["type"] == "perplexity"]
    a = next(row for row in mean.rows if row.repo_id == "org/ckpt-a")
    assert a.perplexity == pytest.approx(math.exp(sum(map(math.log, values)) / len(values)))


def test_find_filters_by_method_and_author_and_says_what_is_wrong(published):
    assert [r.repo_id for r in find_checkpoints(BASE, "sw", method="wanda", author="org", retry=FAST).ranked][:1] == ["org/ckpt-b"]
    with pytest.raises(ConfigError, match="no prunekit checkpoints of meta/tiny-base .*method sparsegpt"):
        find_checkpoints(BASE, "sw", method="sparsegpt", retry=FAST)
    with pytest.raises(ConfigError, match="author someone-else"):
        find_checkpoints(BASE, "sw", author="someone-else", retry=FAST)
    with pytest.raises(ModelError, match="meta/no-such-model' was not found"):
        find_checkpoints("meta/no-such-model", "sw", retry=FAST)
    with pytest.raises(ConfigError, match="invalid --lang"):
        find_checkpoints(BASE, "Swahili", retry=FAST)
    with pytest.raises(ConfigError, match="none of the 4 prunekit checkpoints .* reports xh perplexity"):
        pull_best("xh", BASE, retry=FAST)


def test_pull_best_for_downloads_the_top_checkpoint_at_the_listed_commit(published, tmp_path):
    best = pull_best("sw", BASE, out=tmp_path / "best", retry=FAST)
    assert best.chosen.repo_id == "org/ckpt-b" and best.revision == published.head("org/ckpt-b")
    assert "lowest sw perplexity (20.00, 2.00x dense)" in best.why and "next: org/ckpt-c" in best.why
    assert (tmp_path / "best" / "README.md").read_bytes() == published.files("org/ckpt-b")["README.md"]
    assert yaml.safe_load((tmp_path / "best" / "results.json").read_text())["perplexity"]["sw"]["ppl"] == 20.0


def cli_env(hub, tmp_path) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING"))}
    env.update(HF_TOKEN=TOKEN, HF_ENDPOINT=hub.url, HF_HOME=str(tmp_path / "cli-home"), HF_HUB_DISABLE_XET="1",
               HF_HUB_OFFLINE="0", HF_HUB_DISABLE_TELEMETRY="1", PRUNEKIT_HUB_BACKOFF="0.01", COLUMNS="220")
    return env


def test_cli_find_json_table_pull_best_for_and_offline(published, tmp_path):
    env, cwd = cli_env(published, tmp_path), tmp_path
    as_json = run_cli(["find", "--base", BASE, "--lang", "sw", "--json"], env, cwd)
    assert as_json.returncode == 0, as_json.stderr
    rows = json.loads(as_json.stdout)["checkpoints"]
    assert [r["repo_id"] for r in rows] == ["org/ckpt-b", "org/ckpt-c", "org/ckpt-a", "org/ckpt-noresults"]
    table = run_cli(["find", "--base", BASE, "--lang", "sw"], env, cwd)
    assert table.returncode == 0 and "org/ckpt-b" in table.stdout and "pull --best-for sw" in table.stdout
    pulled = run_cli(["pull", "--best-for", "sw", "--base", BASE, "--out", str(tmp_path / "got")], env, cwd)
    assert pulled.returncode == 0, pulled.stderr
    assert "chose org/ckpt-b @ " + published.head("org/ckpt-b") in pulled.stdout and (tmp_path / "got" / "model.safetensors").is_file()
    for args, message in ((["find", "--base", "meta/nothing-here"], "was not found"),
                          (["find", "--base", BASE, "--method", "magnitude"], "no prunekit checkpoints"),
                          (["pull", "--best-for", "sw"], "--best-for LANG needs --base")):
        done = run_cli(args, env, cwd)
        assert done.returncode == 2 and done.stderr.startswith("error: ") and message in done.stderr, done.stderr
        assert len(done.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("offline", [{"HF_ENDPOINT": "http://127.0.0.1:9"}, {"HF_HUB_OFFLINE": "1"}], ids=["refused", "offline-mode"])
def test_find_offline_fails_fast_with_one_error_line(hub, tmp_path, offline):
    env = cli_env(hub, tmp_path) | offline | {"PRUNEKIT_HUB_BACKOFF": "1"}
    started = time.perf_counter()
    done = run_cli(["find", "--base", BASE, "--lang", "sw"], env, tmp_path)
    assert time.perf_counter() - started < 5
    assert done.returncode == 2 and done.stderr.startswith("error: ") and len(done.stderr.strip().splitlines()) == 1
    assert ("cannot reach the Hub" if "HF_ENDPOINT" in offline else "HF_HUB_OFFLINE") in done.stderr


def test_find_library_raises_hub_error_when_refused(hub):
    started = time.perf_counter()
    with pytest.raises(HubError, match="cannot reach the Hub at http://127.0.0.1:9"):
        find_checkpoints(BASE, "sw", endpoint="http://127.0.0.1:9")
    assert time.perf_counter() - started < 5


# ---- a new user's path: sweep with push -> collection -> hosted leaderboard -> find -> pull --best-for ---------

TINY_BASE = "meta/tiny-llama"



def test_a_pushed_sweep_makes_a_collection_a_space_and_find_ranks_its_checkpoints(hub, tiny_llama, tmp_path, one_thread):
    from prunekit.hub.space import external_requests
    from prunekit.sweep import run_sweep

    api = HfApi(endpoint=hub.url, token=TOKEN)
    api.create_repo(TINY_BASE)
    api.upload_folder(folder_path=str(tiny_llama), repo_id=TINY_BASE)
    langs = ["en", "de", "sw"]
    config = {
        "name": "tiny-study", "models": [{"id": TINY_BASE}], "methods": ["wanda", "sparsegpt"],
        "calibration": {"sets": langs, "source": str(TATOEBA), "nsamples": 4, "seqlen": 32, "seeds": [0]},
        "evaluation": {"languages": langs, "perplexity_source": str(TATOEBA), "seqlen": 32, "max_windows": 4,
                       "batch_size": 8},
        "execution": {"device": "cpu"},
        "push": {"namespace": "org", "private": False, "endpoint": hub.url, "leaderboard": "org/leaderboard"},
    }
    runs_dir = tmp_path / "runs"
    summary = run_sweep(config, runs_dir, progress=False)
    assert summary.ok, summary.lines()
    pushed = {json.loads((d / "push.json").read_text())["repo_id"]: d for d in (runs_dir / "runs").iterdir()}
    assert len(pushed) == 6 and set(hub.repos) == {TINY_BASE, *pushed}

    # one collection, one item per checkpoint, each with its calibration set and headline perplexity
    assert len(hub.collections) == 1
    collection = next(iter(hub.collections.values()))
    assert collection.title == "tiny-study (prunekit sweep)"
    assert sorted(item["id"] for item in collection.items) == sorted(pushed)
    assert any(f"Hub collection: {hub.url}/collections/{collection.slug}" in note for note in summary.notes)
    for item in collection.items:
        results = json.loads((pushed[item["id"]] / "results.json").read_text())
        calib = json.loads((pushed[item["id"]] / "checkpoint" / "prunekit.json").read_text())["calibration"]["languages"]
        assert f"calibrated on {calib[0]}; {calib[0]} perplexity {results['perplexity'][calib[0]]['ppl']:.2f}" in item["note"]["text"]
    # each card links the collection, the leaderboard and its two siblings (same method, other calibration sets)
    for repo_id in pushed:
        card = hub.files(repo_id)["README.md"].decode()
        assert f"/collections/{collection.slug}" in card and f"{hub.url}/spaces/org/leaderboard" in card
        method = "sparsegpt" if "sparsegpt" in repo_id else "wanda"
        siblings = {r for r in pushed if r != repo_id and method in r and ("sparsegpt" in r) == (method == "sparsegpt")}
        assert len(siblings) == 2 and all(f"[`{s}`]" in card for s in siblings), card
        assert card.count("<!-- prunekit:related -->") == 1
    # a rerun changes nothing
    commits = len(hub.commit_log)
    again = run_sweep(config, runs_dir, progress=False)
    assert again.ok and len(hub.commit_log) == commits and len(next(iter(hub.collections.values())).items) == 6

    env = cli_env(hub, tmp_path)
    # the hosted leaderboard
    report = run_cli(["report", str(runs_dir), "--out", str(tmp_path / "report"), "--push", "org/leaderboard"], env, tmp_path)
    assert report.returncode == 0, report.stderr
    space = hub.spaces["org/leaderboard"].resolve("main").files
    assert {"index.html", "results.csv", "README.md"} <= set(space)
    assert space["index.html"] == (tmp_path / "report" / "report.html").read_bytes()
    assert external_requests(space["index.html"].decode()) == []
    assert "sdk: static" in space["README.md"].decode()
    # ... which the sweep's collection now holds too, and the cards kept their one related section
    assert "linked from the collection" in report.stdout
    items = next(iter(hub.collections.values())).items
    assert len(items) == 7 and {"id": "org/leaderboard", "type": "space"}.items() <= items[-1].items()
    assert all(hub.files(r)["README.md"].decode().count("<!-- prunekit:related -->") == 1 for r in pushed)

    # find ranks the six by their Swahili perplexity, as the runs measured it
    found = run_cli(["find", "--base", TINY_BASE, "--lang", "sw", "--json"], env, tmp_path)
    assert found.returncode == 0, found.stderr
    rows = json.loads(found.stdout)["checkpoints"]
    measured = sorted(pushed, key=lambda r: json.loads((pushed[r] / "results.json").read_text())["perplexity"]["sw"]["ppl"])
    assert [row["repo_id"] for row in rows] == measured
    assert all(row["ratio_to_dense"] and row["ratio_to_dense"] > 0 for row in rows)
    pulled = run_cli(["pull", "--best-for", "sw", "--base", TINY_BASE, "--out", str(tmp_path / "best")], env, tmp_path)
    assert pulled.returncode == 0, pulled.stderr
    assert f"chose {measured[0]} @ {hub.head(measured[0])}" in pulled.stdout
    record = pushed[measured[0]] / "checkpoint" / "prunekit.json"  # as published: local paths as their last component
    assert (tmp_path / "best" / "prunekit.json").read_bytes() == public_json(record.name, record.read_bytes())


def test_report_push_options_are_checked_before_any_work(tmp_path):
    from typer.testing import CliRunner

    from prunekit.cli.main import app

    for args, message in ((["--private"], "--private and --endpoint only apply with --push"),
                          (["--push", "no-namespace"], "invalid repo id 'no-namespace'")):
        done = CliRunner().invoke(app, ["report", str(tmp_path / "runs"), "--out", str(tmp_path / "out"), *args])
        assert done.exit_code == 2 and message in done.stderr, done.stderr
        assert not (tmp_path / "out").exists()


def test_the_sweeps_collection_keys_are_validated_and_kept_out_of_the_push_fingerprint():
    from prunekit.sweep import load_config

    base = {"models": ["embedded:gemma-3-270m"], "methods": ["wanda"], "calibration": {"sets": ["de"]}}
    config = load_config(base | {"push": {"namespace": "org", "collection": "My study", "leaderboard": "org/board"}})
    assert config.collection == {"title": "My study", "leaderboard": "org/board"}
    assert config.push == load_config(base | {"push": {"namespace": "org"}}).push  # no re-push when they change
    for push, message in (({"leaderboard": "board"}, "push.leaderboard: 'board' is not a Space id"),
                          ({"collection": "x" * 61}, "push.collection: a collection title has 1 to 60 characters")):
        with pytest.raises(ConfigError, match=message):
            load_config(base | {"push": {"namespace": "org", **push}})
