"""The embedded default end to end: the study's diagonal on the real Gemma-3-270M."""

from __future__ import annotations

import json

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
