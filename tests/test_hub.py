"""push / pull against a real HTTP Hub on 127.0.0.1 (tests/hub_server.py): round trips are byte-identical,
an unchanged push makes no commit, transient errors are retried, auth errors say how to log in, and the
token never shows up in any output or file."""

from __future__ import annotations

import filecmp
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import huggingface_hub
import pytest
import torch
from huggingface_hub import constants as hf_constants

import prunekit
from prunekit.errors import ConfigError, ModelError, PrunekitError
from prunekit.hub import CardInputs, PushTarget, RetryPolicy, pull, push
from prunekit.models import HUB_ALLOW_PATTERNS, load_model, resolve_model
from tests.conftest import TATOEBA
from tests.hub_server import FakeHub, example_results

TOKEN = "hf_PrunekitLoopbackTok3n_q7Zx2Vw9"  # distinctive: any leak is found by a plain substring scan
FAST = RetryPolicy(attempts=4, backoff_s=0.01)
CHECKPOINT_FILES = ["config.json", "generation_config.json", "model.safetensors", "prunekit.json",
                    "results.json", "tokenizer.json", "tokenizer_config.json"]


@pytest.fixture(scope="module")
def pruned(tmp_path_factory, tiny_llama) -> Path:
    out = tmp_path_factory.mktemp("hub") / "pruned"
    result = prunekit.prune(str(tiny_llama), "wanda",
                            calibration=prunekit.CalibrationSpec("de", source=str(TATOEBA), nsamples=4, seqlen=32),
                            output=prunekit.OutputSpec(out), progress=False)
    (out / "results.json").write_text(json.dumps(example_results(result.record, model_path=str(out)), indent=2))
    return out


@pytest.fixture
def hf_home(tmp_path) -> Path:
    return tmp_path / "hf-home"


@pytest.fixture
def hub(monkeypatch, hf_home):
    """The loopback Hub, with huggingface_hub pointed at it (and anything that forgets the endpoint pointed at a
    dead loopback port, so nothing can ever leave the machine)."""
    server = FakeHub(valid_tokens={TOKEN}).start()
    dead = "http://127.0.0.1:9"
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("HF_HOME", str(hf_home))
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hf_constants, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(hf_home / "hub"))
    monkeypatch.setattr(hf_constants, "HF_TOKEN_PATH", str(hf_home / "token"))
    monkeypatch.setattr(hf_constants, "ENDPOINT", dead)
    monkeypatch.setattr(hf_constants, "HUGGINGFACE_CO_URL_TEMPLATE", dead + "/{repo_id}/resolve/{revision}/{filename}")
    yield server
    server.stop()
    huggingface_hub.close_session()


def same_bytes(a: Path, b: Path) -> bool:
    return filecmp.cmp(a, b, shallow=False)


def published_as(local: Path, published: Path) -> bool:
    """``published`` holds ``local`` as push publishes it: the same bytes, local absolute paths aside
    (prunekit.hub.public; tests/test_publish_paths.py checks that no staged file holds one)."""
    from prunekit.hub.public import public_json

    return published.read_bytes() == public_json(local.name, local.read_bytes())


# ---- round trip ------------------------------------------------------------------------------------------

def test_push_then_pull_gives_identical_bytes_and_an_unchanged_push_makes_no_commit(hub, pruned, tmp_path):
    first = push(pruned, PushTarget(namespace="org"), retry=FAST)
    assert first.committed and first.repo_id == "org/llama-wanda-50pct-calib-de-s0"
    assert {f.path: f.status for f in first.files} == {p: "new" for p in ["README.md", *CHECKPOINT_FILES]}
    assert first.commit == hub.head(first.repo_id)
    commits = len(hub.commit_log)

    pulled = pull(first.repo_id, out=tmp_path / "pulled", retry=FAST)
    assert pulled.revision == first.commit
    assert sorted(pulled.files) == sorted(["README.md", *CHECKPOINT_FILES])
    for name in CHECKPOINT_FILES:
        assert published_as(pruned / name, pulled.path / name), name
    assert (pulled.path / "README.md").read_text(encoding="utf-8") == first.card
    assert hub.files(first.repo_id)["README.md"] == first.card.encode()

    requests_before = len(hub.requests)
    second = push(pruned, PushTarget(namespace="org"), retry=FAST)
    assert not second.committed
    assert second.commit == first.commit == hub.head(first.repo_id)
    assert {f.status for f in second.files} == {"unchanged"}
    assert len(hub.commit_log) == commits
    routes = [route for _, route, _, _ in hub.requests[requests_before:]]
    # huggingface_hub decides what is unchanged from one pre-upload request (paths, sizes, 512-byte samples) and
    # the oids the Hub answers: no commit, and no file's content is sent
    assert "commit" not in routes and routes.count("preupload") == 1


def test_a_changed_result_commits_only_the_files_that_changed(hub, pruned, tmp_path):
    push(pruned, PushTarget(namespace="org"), retry=FAST)
    results = json.loads((pruned / "results.json").read_text())
    results["perplexity"]["de"]["ppl"] = 99.8765
    changed = tmp_path / "results.json"
    changed.write_text(json.dumps(results))
    result = push(pruned, PushTarget(namespace="org"), CardInputs(results=changed), retry=FAST)
    assert result.committed
    assert {f.path for f in result.files if f.status == "changed"} == {"README.md", "results.json"}
    assert sorted(hub.commit_log[-1][2]) == ["README.md", "results.json"]  # what the server received
    assert "99.88" in hub.files(result.repo_id)["README.md"].decode()


def test_the_repo_mirrors_the_checkpoint_so_stale_files_are_deleted(hub, pruned, tmp_path):
    repo = push(pruned, PushTarget(namespace="org"), retry=FAST).repo_id
    bare = tmp_path / "bare"
    shutil.copytree(pruned, bare)
    (bare / "results.json").unlink()
    result = push(bare, PushTarget(repo_id=repo), retry=FAST)
    assert {f.path: f.status for f in result.files}["results.json"] == "deleted"
    remote = hub.files(repo)
    assert "results.json" not in remote and "model.safetensors" in remote
    assert "No evaluation results were published" in remote["README.md"].decode()


def test_push_to_a_branch_leaves_main_alone(hub, pruned):
    result = push(pruned, PushTarget(repo_id="org/branchy", revision="calib-de"), retry=FAST)
    assert result.committed and result.revision == "calib-de"
    assert "model.safetensors" in hub.files("org/branchy", "calib-de")
    assert set(hub.files("org/branchy", "main")) == {".gitattributes"}


def test_dry_run_writes_the_exact_staging_folder_and_contacts_nothing(hub, pruned, tmp_path, monkeypatch):
    monkeypatch.delenv("HF_TOKEN")  # a dry run needs no token either
    staging = tmp_path / "staging"
    result = push(pruned, PushTarget(namespace="org"), dry_run=True, staging=staging)
    assert result.dry_run and not result.committed and result.staging == staging
    assert sorted(p.name for p in staging.iterdir()) == sorted(["README.md", *CHECKPOINT_FILES])
    for name in CHECKPOINT_FILES:
        assert published_as(pruned / name, staging / name), name
    assert (staging / "README.md").read_text(encoding="utf-8") == result.card
    assert [f.path for f in result.files] == sorted(p.name for p in staging.iterdir())
    assert hub.requests == []
    push(pruned, PushTarget(namespace="org"), dry_run=True, staging=staging)  # an earlier staging may be replaced
    with pytest.raises(ConfigError, match="not an earlier push staging"):
        push(pruned, PushTarget(namespace="org"), dry_run=True, staging=tmp_path)


def test_a_private_push_is_invisible_without_the_token(hub, pruned, tmp_path, monkeypatch):
    result = push(pruned, PushTarget(repo_id="org/secret", private=True), retry=FAST)
    assert hub.repos["org/secret"].private
    assert pull("org/secret", out=tmp_path / "with-token", retry=FAST).revision == result.commit
    monkeypatch.delenv("HF_TOKEN")
    with pytest.raises(ModelError, match="not found.*hf auth login"):
        pull("org/secret", out=tmp_path / "without-token", retry=FAST)


def test_a_file_changed_in_place_is_committed_even_at_the_same_size(hub, pruned, tmp_path):
    """huggingface_hub compares contents (the git blob sha1 of regular files, the sha256 of LFS files) with what
    the Hub holds, not sizes: one byte changed in place is found, and only that file is committed."""
    repo = push(pruned, PushTarget(namespace="org"), retry=FAST).repo_id
    edited = tmp_path / "edited"
    shutil.copytree(pruned, edited)
    config = (edited / "generation_config.json").read_bytes()
    changed = config[:-1] + (b" " if config[-1:] != b" " else b"\n")
    (edited / "generation_config.json").write_bytes(changed)
    assert len(changed) == len(config) and changed != config
    result = push(edited, PushTarget(repo_id=repo), retry=FAST)
    assert result.committed
    assert {f.path: f.status for f in result.files if f.status != "unchanged"} == {"generation_config.json": "changed"}
    assert hub.commit_log[-1][2] == ["generation_config.json"]
    assert hub.files(repo)["generation_config.json"] == changed


def test_a_files_status_compares_the_git_blob_before_and_after_the_commit():
    """Regular files by their git blob sha1; LFS files by their pointer's blob, which carries the content's sha256."""
    from huggingface_hub.hf_api import RepoFile

    from prunekit.hub import file_status

    data = b"weights" * 1000
    blob = hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
    regular = RepoFile(path="m", size=len(data), oid=blob)
    assert file_status(None, regular) == "new"
    assert file_status(regular, RepoFile(path="m", size=len(data), oid=blob)) == "unchanged"
    assert file_status(regular, RepoFile(path="m", size=len(data), oid="0" * 40)) == "changed"  # same size
    lfs = {"size": len(data), "oid": hashlib.sha256(data).hexdigest(), "pointerSize": 134}
    pointer = RepoFile(path="m", size=len(data), oid="1" * 40, lfs=lfs)
    assert file_status(pointer, RepoFile(path="m", size=len(data), oid="1" * 40, lfs=lfs)) == "unchanged"
    assert file_status(pointer, RepoFile(path="m", size=len(data), oid="2" * 40, lfs={**lfs, "oid": "f" * 64})) == "changed"


def test_staging_links_big_weights_and_copies_small_files(tmp_path):
    from prunekit.hub import LINK_MIN_BYTES, stage_folder

    big, small = tmp_path / "model.safetensors", tmp_path / "config.json"
    big.write_bytes(b"\0" * LINK_MIN_BYTES)
    small.write_text("{}")
    staging = tmp_path / "staging"
    stage_folder({"model.safetensors": big, "config.json": small}, "card\n", None, staging)
    assert (staging / "model.safetensors").stat().st_ino == big.stat().st_ino  # no second copy of the weights
    assert (staging / "config.json").stat().st_ino != small.stat().st_ino
    assert (staging / "README.md").read_text() == "card\n"


# ---- failures ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("route,status", [("create", 503), ("commit", 503), ("create", 0)])
def test_transient_failures_are_retried_until_the_push_succeeds(hub, pruned, route, status):
    hub.fail(route, status, times=2)  # status 0: the server drops the connection without an answer
    result = push(pruned, PushTarget(namespace="org"), retry=FAST)
    assert result.committed
    assert hub.count(route) == 3
    assert set(hub.files(result.repo_id)) >= set(CHECKPOINT_FILES)


def test_pull_retries_a_hub_that_answers_503_twice(hub, pruned, tmp_path):
    pushed = push(pruned, PushTarget(namespace="org"), retry=FAST)
    hub.fail("info", 503, times=2)
    pulled = pull(pushed.repo_id, out=tmp_path / "pulled", retry=FAST)
    assert pulled.revision == pushed.commit
    assert same_bytes(pruned / "model.safetensors", pulled.path / "model.safetensors")


def test_a_hub_that_keeps_failing_gives_a_clear_error(hub, pruned):
    hub.fail("create", 503, times=10)
    with pytest.raises(PrunekitError, match=r"kept failing while creating .*503.*4 attempts"):
        push(pruned, PushTarget(namespace="org"), retry=FAST)
    assert hub.count("create") == 4


def test_a_rejected_token_says_how_to_log_in(hub, pruned):
    hub.valid_tokens = {"hf_someone_else"}
    with pytest.raises(PrunekitError) as info:
        push(pruned, PushTarget(namespace="org"), retry=FAST)
    message = str(info.value)
    assert "401" in message and "hf auth login" in message and "HF_TOKEN" in message
    assert TOKEN not in message


def test_no_token_fails_before_any_request(hub, pruned, monkeypatch):
    monkeypatch.delenv("HF_TOKEN")
    with pytest.raises(PrunekitError, match="hf auth login"):
        push(pruned, PushTarget(namespace="org"), retry=FAST)
    assert hub.requests == []


def test_push_needs_a_destination_and_a_prunekit_checkpoint(hub, pruned, tiny_llama):
    with pytest.raises(ConfigError, match="--repo-id"):
        push(pruned, PushTarget(), retry=FAST)
    with pytest.raises(ConfigError, match="invalid repo id"):
        push(pruned, PushTarget(repo_id="org/bad--name"), retry=FAST)
    with pytest.raises(ConfigError, match="prunekit.json"):
        push(tiny_llama, PushTarget(namespace="org"), retry=FAST)
    assert hub.requests == []


def test_pull_of_a_missing_repo_is_a_clear_error(hub):
    with pytest.raises(ModelError, match="org/nothing-here.*not found"):
        pull("org/nothing-here", retry=FAST)


# ---- any Hub id is accepted wherever a checkpoint is ----------------------------------------------------

def test_resolve_model_downloads_a_hub_id_from_hf_endpoint_and_records_the_commit(hub, pruned):
    result = push(pruned, PushTarget(namespace="org"), retry=FAST)
    source = resolve_model(result.repo_id)
    assert source.kind == "hub" and source.revision == result.commit
    assert same_bytes(source.path / "model.safetensors", pruned / "model.safetensors")
    model, _, source = load_model(result.repo_id)
    local, _, _ = load_model(str(pruned))
    for (name, a), (_, b) in zip(model.state_dict().items(), local.state_dict().items()):
        assert torch.equal(a, b), name
    assert set(HUB_ALLOW_PATTERNS) >= {"prunekit.json", "results.json", "README.md"}


def test_a_hub_id_already_cached_resolves_offline_and_an_offline_pull_into_a_directory_fails_at_once(hub, pruned, tmp_path,
                                                                                                    monkeypatch):
    """One download path: offline, model resolution and pull read the Hub cache; a copy into a directory needs the Hub."""
    result = push(pruned, PushTarget(namespace="org"), retry=FAST)
    online = resolve_model(result.repo_id)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    requests = len(hub.requests)
    offline = resolve_model(result.repo_id)
    assert offline.path == online.path and offline.revision == result.commit
    assert pull(result.repo_id, retry=FAST).revision == result.commit
    with pytest.raises(PrunekitError, match="HF_HUB_OFFLINE"):
        pull(result.repo_id, out=tmp_path / "copy", retry=FAST)
    assert not (tmp_path / "copy").exists() and len(hub.requests) == requests


# ---- the CLI never shows or stores the token ------------------------------------------------------------

def run_cli(args: list[str], env: dict, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "prunekit.cli.main", *args], env=env, cwd=cwd,
                          capture_output=True, text=True, timeout=300)


def test_cli_push_and_pull_never_print_log_or_write_the_token(hub, pruned, tmp_path):
    home = tmp_path / "cli-hf-home"
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING"))}
    env.update(HF_TOKEN=TOKEN, HF_ENDPOINT=hub.url, HF_HOME=str(home), HF_HUB_DISABLE_XET="1", HF_HUB_OFFLINE="0",
               HF_HUB_DISABLE_TELEMETRY="1", PRUNEKIT_CACHE=str(tmp_path / "cli-prunekit-cache"),
               PRUNEKIT_HUB_BACKOFF="0.01", PYTHONWARNINGS="always", COLUMNS="200")
    runs = [
        run_cli(["push", str(pruned), "--namespace", "org", "--dry-run", "--staging", str(tmp_path / "staging")], env, cwd),
        run_cli(["push", str(pruned), "--namespace", "org"], env, cwd),
        run_cli(["push", str(pruned), "--namespace", "org"], env, cwd),
        run_cli(["pull", "org/llama-wanda-50pct-calib-de-s0", "--out", str(tmp_path / "pulled")], env, cwd),
        run_cli(["pull", "org/llama-wanda-50pct-calib-de-s0"], env, cwd),  # into the HF cache under HF_HOME
    ]
    for run in runs:
        assert run.returncode == 0, run.stderr
    assert "nothing was sent" in runs[0].stdout
    assert "pushed commit" in runs[1].stdout and "unchanged" in runs[2].stdout
    assert same_bytes(pruned / "model.safetensors", tmp_path / "pulled" / "model.safetensors")
    hub.valid_tokens = {"hf_someone_else"}
    rejected = run_cli(["push", str(pruned), "--namespace", "org"], env, cwd)
    assert rejected.returncode == 2 and "hf auth login" in rejected.stderr
    runs.append(rejected)

    # the token was really used ...
    assert any(auth == f"Bearer {TOKEN}" for _, route, _, auth in hub.requests if route == "commit")
    # ... and appears in no output ...
    for run in runs:
        assert TOKEN not in run.stdout and TOKEN not in run.stderr
    # ... and in no file written: staging, download, HF home and cache, prunekit cache, working dir, checkpoint
    scanned = 0
    for root in (tmp_path, pruned):
        for path in root.rglob("*"):
            if path.is_file() and not path.is_symlink():
                assert TOKEN.encode() not in path.read_bytes(), path
                scanned += 1
    assert scanned >= 2 * len(CHECKPOINT_FILES)
    assert list(home.glob("hub/models--org--llama-wanda-50pct-calib-de-s0/snapshots/*/model.safetensors"))
    assert any((tmp_path / "staging").iterdir())


# ---- push's specs and the public functions' documentation (issue 27 §7) ------------------------------------

def test_push_target_and_card_inputs_are_checked_once_when_made(tmp_path):
    import dataclasses

    with pytest.raises(ConfigError, match="say where to push"):
        PushTarget()
    with pytest.raises(ConfigError, match="invalid repo id"):
        PushTarget(repo_id="org/bad--name")
    with pytest.raises(ConfigError, match="invalid --namespace 'o--rg'"):
        PushTarget(namespace="o--rg")
    target = PushTarget(repo_id="org/name", namespace="ignored", private=True, revision="calib-de")
    assert target.repo_for({}) == "org/name"
    with pytest.raises(dataclasses.FrozenInstanceError):
        target.private = False  # type: ignore[misc]
    card = CardInputs(results=str(tmp_path / "r.json"), dense_results="~/dense.json")
    assert card.results == tmp_path / "r.json" and card.dense_results == Path.home() / "dense.json"
    assert CardInputs().results is None and CardInputs().base_model is None


def test_push_and_pull_take_at_most_ten_parameters_each_documented_in_huggingface_hub_style():
    import inspect

    from prunekit.hub import transfer

    for function in (push, pull, transfer.prepare_push):
        parameters = inspect.signature(function).parameters
        assert len(parameters) <= 10, function.__name__
        doc = inspect.getdoc(function)
        for section in ("Args:", "Returns:", "Raises:"):
            assert section in doc, (function.__name__, section)
        args = doc.split("Args:")[1].split("Returns:")[0]
        for name, parameter in parameters.items():  # each named with its type, and its default when it has one
            assert f"    {name} (" in "    " + args, (function.__name__, name)
            line = args.split(f"{name} (")[1].split("\n")[0]
            assert ("*optional*" in line) == (parameter.default is not inspect.Parameter.empty), (function.__name__, name)
    for function in (push, pull):
        assert "Example:" in inspect.getdoc(function) and ">>> " in inspect.getdoc(function)


def test_push_cli_builds_the_specs_and_says_where_to_push_as_one_error_line(pruned, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from prunekit.cli.main import app

    monkeypatch.chdir(tmp_path)
    missing = CliRunner().invoke(app, ["push", str(pruned), "--dry-run"])
    assert missing.exit_code == 2 and "error: say where to push" in missing.output
    staged = CliRunner().invoke(app, ["push", str(pruned), "--repo-id", "org/cli-dry", "--private", "--revision", "b",
                                      "--dry-run", "--staging", str(tmp_path / "staging")])
    assert staged.exit_code == 0, staged.output
    assert "org/cli-dry @ b" in staged.output and (tmp_path / "staging" / "README.md").is_file()
    assert "results: using" in staged.output  # the checkpoint's own results.json, found without --results
