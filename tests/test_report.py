"""The leaderboard report: every number equals what the runs' results.json give (recomputed here),
best cells, dense rows, deltas, the advisor and the diagonal finding, in md/html/csv/json/png."""

from __future__ import annotations

import csv
import json
import math
import random
from pathlib import Path

import numpy as np
import pytest

from prunekit.io import versioned, write_json_atomic
from prunekit.report import build_report, diagonal_finding

LANGS = ["ar", "de", "en", "sw"]
CALIBS = ["ar", "de", "en", "sw", "en+de"]


def _status(directory: Path, stage: str) -> None:
    write_json_atomic(directory / f"{stage}.status.json", versioned("prunekit-stage-status", {"stage": stage, "state": "done"}))


def _results(ppl: dict, hidden: dict | None, tasks: dict) -> dict:
    """A results.json as prunekit.evaluation writes it (prunekit/evaluation/SCHEMA.md)."""
    return versioned("prunekit-results", {
        "model": {"spec": "m", "path": "m", "revision": None, "kind": "local", "record": None},
        "dense": None, "languages": list(ppl) or list(hidden or {}),
        "perplexity": {lang: {"ppl": v, "nll": math.log(v), "tokens": 100, "windows": 3, "seqlen": 32, "source": "x", "location": "x"} for lang, v in ppl.items()},
        "hidden_states": {} if hidden is None else {lang: {"snr_db": s, "pruning_error": p, "tokens": 100, "exclude_bos": True,
                                                             "per_layer": {"snr_db": [s], "pruning_error": [p]}} for lang, (s, p) in hidden.items()},
        "tasks": tasks, "settings": {"seqlen": 128, "max_windows": 3, "ppl_source": "embedded"}, "versions": {}, "created": "2025-01-01T00:00:00+00:00",
    })


def _tasks(rng: random.Random) -> dict:
    tasks = {f"xcopa_{lang}": {"group": "xcopa", "language": lang, "status": "ok", "note": None,
                               "metrics": {"acc": rng.uniform(0.4, 0.7)}, "stderr": {"acc": 0.02}, "samples": 100}
             for lang in ("sw", "en")}
    tasks["xcopa_de"] = {"group": "xcopa", "language": "de", "status": "n/a", "note": "no German XCOPA",
                         "metrics": {}, "stderr": {}, "samples": 0}
    return tasks


def make_runs_dir(root: Path) -> Path:
    """Two methods × five calibration sets × seeds (wanda: 3 seeds, sparsegpt: 1 seed) + a dense row.
    Wanda's perplexity is lowest on the diagonal for ar, de, en but not for sw."""
    rng = random.Random(7)
    runs_dir = root / "runs-dir"
    key = "tiny-0123abcd"
    counter = 0
    for method, seeds in (("wanda", [0, 1, 2]), ("sparsegpt", [0])):
        for calib in CALIBS:
            for seed in seeds:
                counter += 1
                run_id = f"{counter:012x}"
                directory = runs_dir / "runs" / run_id
                directory.mkdir(parents=True)
                write_json_atomic(directory / "run.json", versioned("prunekit-sweep-run", {
                    "run_id": run_id, "identity": {}, "model": {"spec": "/m", "name": "tiny", "dtype": "float32", "revision": None, "key": key},
                    "method": {"label": method, "method": method, "kind": "prune", "quantization": None},
                    "pattern": {"sparsity": 0.5, "n": 0, "m": 0, "label": "50%"}, "calibration": calib, "seed": seed,
                }))
                ppl = {}
                for lang in LANGS:
                    base = 30.0 + 5 * LANGS.index(lang) + rng.uniform(0, 1)
                    diagonal = method == "wanda" and calib == lang and lang != "sw"
                    ppl[lang] = base - (10.0 if diagonal else 0.0) + (3.0 if lang == "sw" and calib == "sw" else 0.0)
                hidden = {lang: (rng.uniform(5, 15), rng.uniform(20e-6, 120e-6)) for lang in LANGS}
                write_json_atomic(directory / "results.json", _results(ppl, hidden, _tasks(rng)))
                _status(directory, "prune")
                _status(directory, "eval")
    # a run whose evaluation never finished (killed): listed as missing, never counted
    directory = runs_dir / "runs" / "ffffffffffff"
    directory.mkdir(parents=True)
    write_json_atomic(directory / "run.json", versioned("prunekit-sweep-run", {
        "run_id": "ffffffffffff", "identity": {}, "model": {"spec": "/m", "name": "tiny", "dtype": "float32", "revision": None, "key": key},
        "method": {"label": "wanda", "method": "wanda", "kind": "prune", "quantization": None},
        "pattern": {"sparsity": 0.5, "n": 0, "m": 0, "label": "50%"}, "calibration": "en", "seed": 9,
    }))
    dense = runs_dir / "dense" / key
    dense.mkdir(parents=True)
    write_json_atomic(dense / "dense.json", versioned("prunekit-sweep-dense", {"model": {"spec": "/m", "name": "tiny", "dtype": "float32", "revision": None}}))
    write_json_atomic(dense / "results.json", _results({lang: 20.0 + i for i, lang in enumerate(LANGS)}, None, _tasks(rng)))
    _status(dense, "dense")
    return runs_dir


def expected_cells(runs_dir: Path) -> dict:
    """Recompute (metric, method, calibration, column) -> (mean, sample std or None, n) from the files."""
    groups: dict = {}
    for directory in (runs_dir / "runs").iterdir():
        if not (directory / "results.json").exists():
            continue
        run = json.loads((directory / "run.json").read_text())
        res = json.loads((directory / "results.json").read_text())
        key = (run["method"]["label"], run["calibration"])
        for lang in LANGS:
            groups.setdefault(("perplexity",) + key + (lang,), []).append(res["perplexity"][lang]["ppl"])
            groups.setdefault(("snr_db",) + key + (lang,), []).append(res["hidden_states"][lang]["snr_db"])
            groups.setdefault(("pruning_error",) + key + (lang,), []).append(res["hidden_states"][lang]["pruning_error"] * 1e6)
        for task, entry in res["tasks"].items():
            if entry["status"] == "ok":
                groups.setdefault(("task:xcopa/acc",) + key + (task,), []).append(entry["metrics"]["acc"] * 100)
    out = {}
    for k, values in groups.items():
        std = float(np.std(values, ddof=1)) if len(values) > 1 else None
        out[k] = (sum(values) / len(values), std, len(values))
    return out


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    root = tmp_path_factory.mktemp("report")
    runs_dir = make_runs_dir(root)
    return build_report(runs_dir, root / "out")


def test_every_report_number_equals_the_runs_results(report):
    expected = expected_cells(report.runs_dir)
    seen = 0
    for table in report.tables:
        for block in table.blocks:
            for row in block.rows:
                for column in table.columns:
                    cell = row.cells[column.key]
                    key = (table.metric.id, block.method, row.calibration, column.key)
                    if key not in expected:
                        assert cell.mean is None and cell.status == "n/a"
                        continue
                    mean, std, n = expected[key]
                    assert cell.n == n
                    assert cell.mean == pytest.approx(mean, rel=1e-12)
                    if std is None:
                        assert cell.std is None
                    else:
                        assert cell.std == pytest.approx(std, rel=1e-9)
                    seen += 1
    assert seen == len(expected) == 2 * 5 * (3 * 4 + 2)
    # the same numbers in cells.csv and leaderboard.json
    rows = list(csv.DictReader(report.files["cells.csv"].open()))
    for rec in rows:
        if rec["is_dense"] == "True" or not rec["mean"]:
            continue
        mean, std, n = expected[(rec["metric"], rec["method"], rec["calibration"], rec["column"])]
        assert float(rec["mean"]) == pytest.approx(mean, rel=1e-12) and int(rec["n"]) == n
        assert (rec["std"] == "") == (std is None)
    data = json.loads(report.files["leaderboard.json"].read_text())
    assert data["kind"] == "prunekit-report" and data["schema_version"].startswith("1.")
    assert len(data["cells"]) == len(rows)


def test_single_seed_has_no_std_and_the_markdown_shows_mean_pm_std(report):
    table = report.table("perplexity")
    wanda, sparsegpt = table.block("tiny", "wanda"), table.block("tiny", "sparsegpt")
    assert all(c.std is None and c.n == 1 for row in sparsegpt.rows for c in row.cells.values())
    cell = wanda.rows[0].cells["ar"]
    md = report.files["report.md"].read_text()
    assert f"{cell.mean:.2f} ± {cell.std:.2f}" in md
    settings = md[md.index("## Perplexity"):].split("\n")[2]  # issue 30 §6: how perplexity was measured, and why it differs
    assert settings.startswith("perplexity: ") and "comparable only between runs with the same settings" in settings
    assert settings == report.perplexity_settings
    from markupsafe import escape

    assert str(escape(settings)) in report.files["report.html"].read_text()


def test_best_cell_per_column_and_deltas_against_dense(report):
    for metric in ("perplexity", "snr_db", "pruning_error"):
        table = report.table(metric)
        for block in table.blocks:
            for column in table.columns:
                means = {row.calibration: row.cells[column.key].mean for row in block.rows}
                best = (min if metric != "snr_db" else max)(means.values())
                marked = {row.calibration for row in block.rows if row.cells[column.key].best}
                assert marked == {c for c, m in means.items() if m == best}
    ppl = report.table("perplexity")
    for block in ppl.blocks:
        assert block.dense is not None
        for i, lang in enumerate(LANGS):
            assert block.dense.cells[lang].mean == 20.0 + i
            for row in block.rows:
                assert row.cells[lang].delta == pytest.approx(row.cells[lang].mean - (20.0 + i))
    # hidden-state metrics compare against the dense model: no dense row there
    assert all(block.dense is None for block in report.table("pruning_error").blocks)
    # n/a task cells are kept as n/a, not dropped
    acc = report.table("xcopa/acc")
    assert [c.label for c in acc.columns] == ["de", "en", "sw"]
    assert all(row.cells["xcopa_de"].status == "n/a" for row in acc.blocks[0].rows)
    assert "no German XCOPA" == acc.blocks[0].rows[0].cells["xcopa_de"].note


def test_advisor_and_diagonal_finding(report):
    lines = diagonal_finding(report, "perplexity")
    assert "calibrating on the target language gave the lowest perplexity in 3 of 4 languages (wanda, tiny)" in lines
    advice = {(a.method, a.metric, a.language): a for a in report.advisor}
    ppl = report.table("perplexity").block("tiny", "wanda")
    sw = advice[("wanda", "perplexity", "sw")]
    own = next(r for r in ppl.rows if r.calibration == "sw").cells["sw"].mean
    best_row = min(ppl.rows, key=lambda r: r.cells["sw"].mean)
    assert sw.best_calibration == best_row.calibration != "sw"
    assert sw.own_value == own and sw.margin == pytest.approx(own - best_row.cells["sw"].mean) and sw.margin > 0
    en = advice[("wanda", "perplexity", "en")]
    assert en.best_calibration == "en" and en.margin == 0 and en.own_is_best
    snr = advice[("wanda", "snr_db", "de")]
    own_snr = next(r for r in report.table("snr_db").block("tiny", "wanda").rows if r.calibration == "de").cells["de"].mean
    assert snr.margin == pytest.approx(snr.best_value - own_snr) and snr.margin >= 0
    # issue 30: what the reader sees leaves out the rows where the target language's own set was best (margin 0)
    assert sw in report.advice and en not in report.advice
    assert all(not a.own_is_best for a in report.advice)
    best_own = sum(bool(a.own_is_best) for a in report.advisor)
    with_own = sum(a.own_value is not None for a in report.advisor)
    assert 0 < best_own < with_own
    assert f"best for {best_own} of {with_own} target language" in report.advice_summary
    md = (report.out_dir / "report.md").read_text()
    advisor_md = md[md.index("## Calibration advisor"):]
    assert report.advice_summary in advisor_md
    assert advisor_md.count("| tiny | wanda |") + advisor_md.count("| tiny | sparsegpt |") <= len(report.advice)
    assert json.loads((report.out_dir / "leaderboard.json").read_text())["advisor"].__len__() == len(report.advisor)


def test_advisor_where_the_target_language_always_wins_is_one_sentence():
    from prunekit.report import Report
    from prunekit.report.tables import AdvisorRow

    rows = [AdvisorRow("m", "wanda", "50%", "perplexity", "Perplexity", lang, lang, lang, 10.0, 10.0, 0.0, True)
            for lang in ("de", "sw", "zh")]
    report = Report.__new__(Report)
    report.advisor = rows
    assert report.advice == []
    assert report.advice_summary == ("Calibrating on the target language was best for every target language and "
                                     "metric (3 of 3); no other calibration set beat it.")


def test_report_files_heatmaps_and_self_contained_html(report):
    out = report.out_dir
    for name in ("report.md", "report.html", "results.csv", "cells.csv", "leaderboard.json"):
        assert (out / name).is_file()
    # one heatmap per (model, method) block and metric: ppl, snr, pe, xcopa/acc
    assert len(report.heatmaps) == 2 * 4
    for path in report.heatmaps:
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64,") == len(report.heatmaps)
    assert 'src="heatmaps/' not in html and "<script src" not in html and "http://" not in html and "https://" not in html
    assert 'class="best' in html and "diag" in html
    assert "ffffffffffff" in html and "not evaluated yet" in html  # the unfinished run is listed, not counted
    md = (out / "report.md").read_text()
    assert "Pruning error of hidden states ×10⁶" in md and "Calibration advisor" in md and "| tiny | dense | — |" in md


def test_report_of_an_empty_runs_dir_says_what_to_do(tmp_path):
    from prunekit.errors import ConfigError

    with pytest.raises(ConfigError, match="does not exist"):
        build_report(tmp_path / "nope", tmp_path / "out")
    (tmp_path / "runs" / "runs").mkdir(parents=True)
    with pytest.raises(ConfigError, match="no evaluated runs"):
        build_report(tmp_path / "runs", tmp_path / "out")


def test_diagonal_heatmap_cells_are_outlined(report):
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: F401 - Agg, no display needed

    from prunekit.report.render import heatmap

    table = report.table("perplexity")
    block = table.block("tiny", "wanda")
    path = heatmap(table, block, report.out_dir / "check.png")
    image = __import__("matplotlib.image", fromlist=["imread"]).imread(path)
    red = (image[..., 0] > 0.9) & (image[..., 1] < 0.15) & (image[..., 2] < 0.15)
    assert red.sum() > 100  # the outlines of the 4 diagonal cells (ar, de, en, sw calibration rows)


def test_cli_report_writes_the_report_and_prints_the_diagonal_finding(report, tmp_path):
    from typer.testing import CliRunner

    from prunekit.cli.main import app

    result = CliRunner().invoke(app, ["report", str(report.runs_dir), "--out", str(tmp_path / "cli")])
    assert result.exit_code == 0, result.output
    assert "in 3 of 4 languages (wanda, tiny)" in result.output and "1 run(s) have no results yet" in result.output
    assert (tmp_path / "cli" / "report.html").is_file() and len(list((tmp_path / "cli" / "heatmaps").glob("*.png"))) == 8
