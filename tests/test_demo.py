"""The embedded default end to end: the study's diagonal on the real Gemma-3-270M."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from prunekit.demo import run_demo
from prunekit.errors import ConfigError


@pytest.mark.gemma
def test_demo_diagonal_each_language_is_best_under_its_own_calibration(embedded_gemma, tmp_path):
    result = run_demo(langs="de,sw", methods="wanda", out=tmp_path / "demo", progress=False)
    assert result.exit_code == 0
    perplexity = {}
    for path in (tmp_path / "demo" / "runs").glob("runs/*/results.json"):
        results = json.loads(path.read_text())
        calib = "+".join(results["model"]["record"]["calibration"]["languages"])
        perplexity[calib] = {lang: cell["ppl"] for lang, cell in results["perplexity"].items()}
        assert set(results["hidden_states"]) == {"de", "sw"}
    assert set(perplexity) == {"de", "sw"}
    assert perplexity["de"]["de"] < perplexity["sw"]["de"]
    assert perplexity["sw"]["sw"] < perplexity["de"]["sw"]
    assert (result.report_dir / "report.html").exists() and (result.report_dir / "report.md").exists()
    assert list((result.report_dir).glob("**/*.png"))
    assert any("2 of 2 languages" in line for line in result.findings), result.findings
    # issue 30 §5: the checkpoints by method and language, links a rerun refreshes, and push finds their results
    from prunekit.artifacts import read_record
    from prunekit.demo import name_checkpoints
    from prunekit.hub.locate import find_dense_results, find_results

    named = dict(result.checkpoints)
    assert sorted(named) == ["wanda-de", "wanda-sw"]
    for name, link in named.items():
        assert link == tmp_path / "demo" / "checkpoints" / name and link.is_symlink()
        assert not Path(os.readlink(link)).is_absolute() and (link / "prunekit.json").is_file()
        record = read_record(link)
        assert "+".join(record["calibration"]["languages"]) == name.split("-")[1]
        found = find_results(link, record)
        assert found is not None and found.resolve() == (link.resolve().parent / "results.json")
        assert find_dense_results(link, record, json.loads(found.read_text())) is not None
    readme = (tmp_path / "demo" / "checkpoints" / "README.md").read_text()
    assert "| `wanda-de` | `../runs/runs/" in readme
    stale = tmp_path / "demo" / "checkpoints" / "wanda-xx"
    os.symlink("../runs/runs/gone/checkpoint", stale)
    assert dict(name_checkpoints(tmp_path / "demo" / "runs", tmp_path / "demo" / "checkpoints")) == named
    assert not stale.is_symlink() and result.seconds > 0


def test_demo_rejects_languages_without_embedded_text(tmp_path):
    with pytest.raises(ConfigError, match="no 'fr'"):
        run_demo(langs="de,fr", out=tmp_path / "d", progress=False)
    with pytest.raises(ConfigError, match="at least two"):
        run_demo(langs="de", out=tmp_path / "d", progress=False)
    with pytest.raises(ConfigError, match="unknown pruning method 'wandda'"):
        run_demo(langs="de,sw", methods="wandda", out=tmp_path / "d", progress=False)
    with pytest.raises(ConfigError, match=r"did you mean 'sparsegpt'"):
        run_demo(langs="de,sw", methods="wanda,sparsgpt", out=tmp_path / "d", progress=False)
    with pytest.raises(ConfigError, match="--nsamples must be at least 1"):
        run_demo(langs="de,sw", nsamples=0, out=tmp_path / "d", progress=False)
    if not torch.cuda.is_available():  # a missing GPU fails before the first run, once
        with pytest.raises(ConfigError, match="no CUDA device"):
            run_demo(langs="de,sw", device="cuda", out=tmp_path / "d", progress=False)
    assert not (tmp_path / "d").exists()


def fake_demo_runs(runs_dir: Path, runs: dict[str, tuple[str, str]]) -> None:
    """A runs dir as the demo's sweep leaves it: sweep.json listing the runs, each run's run.json and checkpoint/."""
    from prunekit.artifacts import RUN_FILE, SWEEP_FILE, SWEEP_KIND, SWEEP_RUN_KIND
    from prunekit.io import versioned, write_json_atomic

    write_json_atomic(runs_dir / SWEEP_FILE, versioned(SWEEP_KIND, {"runs": list(runs)}))
    for run_id, (method, calibration) in runs.items():
        (runs_dir / "runs" / run_id / "checkpoint").mkdir(parents=True)
        write_json_atomic(runs_dir / "runs" / run_id / RUN_FILE,
                          versioned(SWEEP_RUN_KIND, {"method": {"label": method}, "calibration": calibration}))


def test_demo_checkpoints_are_named_by_relative_links_or_by_their_paths_where_links_cannot_be_made(tmp_path, monkeypatch):
    from prunekit.demo import name_checkpoints

    runs, target = tmp_path / "demo" / "runs", tmp_path / "demo" / "checkpoints"
    fake_demo_runs(runs, {"aaa111": ("wanda", "sw"), "bbb222": ("sparsegpt", "de")})
    named = name_checkpoints(runs, target)
    assert named == [("wanda-sw", target / "wanda-sw"), ("sparsegpt-de", target / "sparsegpt-de")]
    assert os.readlink(target / "wanda-sw") == os.path.join("..", "runs", "runs", "aaa111", "checkpoint")
    assert (target / "wanda-sw").resolve() == (runs / "runs" / "aaa111" / "checkpoint").resolve()
    assert "| `sparsegpt-de` | `../runs/runs/bbb222/checkpoint` |" in (target / "README.md").read_text()
    assert not [p for p in target.iterdir() if p.name.startswith(".")]  # no staging link left behind

    def no_links(*args, **kwargs):
        raise OSError("operation not permitted")

    monkeypatch.setattr(os, "symlink", no_links)
    other = tmp_path / "demo" / "checkpoints-nolinks"
    assert name_checkpoints(runs, other) == [("wanda-sw", runs / "runs" / "aaa111" / "checkpoint"),
                                             ("sparsegpt-de", runs / "runs" / "bbb222" / "checkpoint")]
    assert "| `wanda-sw` | `../runs/runs/aaa111/checkpoint` |" in (other / "README.md").read_text()
