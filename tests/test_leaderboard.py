"""The leaderboard of a sweep shaped like configs/tiny-example.yaml (2 methods × 3 calibration
languages × 2 seeds, evaluated in en/de/sw): every number recomputed here from the runs' files, the
ranking, the Hub links, results.csv, and the interactive page in a real (system) Chromium.

The runs dir is synthetic (results.json files as prunekit.evaluation writes them, see
prunekit/evaluation/SCHEMA.md), so these tests take seconds; tests/test_sweep.py reports a real sweep.
"""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
import statistics
from html.parser import HTMLParser
from pathlib import Path

import pytest

from prunekit.io import versioned, write_json_atomic
from prunekit.report import build_report
from tests.test_report import _results, _status

MODEL = "gemma-3-270m"
LANGS = ["en", "de", "sw"]
CALIBS = ["en", "de", "sw"]
METHODS = ["wanda", "sparsegpt"]
SEEDS = [0, 1]
BASE = {"en": 30.0, "de": 40.0, "sw": 60.0}
OFF_TARGET = {"en": 1.10, "de": 1.15, "sw": 1.20}  # how much a calibration set costs the other languages
FAILED_PUSH = ("wanda", "de", 1)


def ppl(method: str, calib: str, lang: str, seed: int) -> float:
    """Calibrating on a language helps that language most; wanda is a little better than SparseGPT."""
    return BASE[lang] * (1.0 if calib == lang else OFF_TARGET[calib]) * (1.0 if method == "wanda" else 1.04) * (1 + 0.01 * seed)


def tasks(values: tuple[float, float, float, float]) -> dict:
    xcopa_en, xcopa_sw, mkqa_de, mkqa_en = values
    out = {f"xcopa_{lang}": {"group": "xcopa", "language": lang, "status": "ok", "note": None, "metrics": {"acc": v},
                             "stderr": {"acc": 0.02}, "samples": 100} for lang, v in (("en", xcopa_en), ("sw", xcopa_sw))}
    out["xcopa_de"] = {"group": "xcopa", "language": "de", "status": "n/a", "note": "no German XCOPA", "metrics": {},
                       "stderr": {}, "samples": None}
    for lang, v in (("de", mkqa_de), ("en", mkqa_en)):
        out[f"mkqa_{lang}"] = {"group": "mkqa", "language": lang, "status": "ok", "note": None,
                               "metrics": {"exact_match": v / 2, "f1": v}, "stderr": {"exact_match": None, "f1": None}, "samples": 50}
    return out


def make_run(runs_dir: Path, run_id: str, method: dict, pattern: dict | None, calib: str, seed: int,
             results: dict, push: str | None = None) -> Path:
    """One run dir as the sweep leaves it: run.json, results.json, the stage statuses, push.json."""
    directory = runs_dir / "runs" / run_id
    directory.mkdir(parents=True)
    write_json_atomic(directory / "run.json", versioned("prunekit-sweep-run", {
        "run_id": run_id, "identity": {},
        "model": {"spec": "embedded:gemma-3-270m", "name": MODEL, "dtype": "float32", "revision": None, "key": "gemma-3-270m-5e1f"},
        "method": method, "pattern": pattern, "calibration": calib, "seed": seed,
    }))
    write_json_atomic(directory / "results.json", results)
    _status(directory, "prune")
    _status(directory, "eval")
    if push == "done":
        repo = f"acme/{MODEL}-{method['label']}-{calib}-s{seed}"
        write_json_atomic(directory / "push.json", versioned("prunekit-sweep-push", {
            "repo_id": repo, "url": f"https://huggingface.co/{repo}", "private": True, "commit": "0" * 40, "committed": True}))
        _status(directory, "push")
    elif push == "failed":
        write_json_atomic(directory / "push.status.json", versioned("prunekit-stage-status", {"stage": "push", "state": "failed"}))
    return directory


def make_dense(runs_dir: Path, results: dict) -> None:
    dense = runs_dir / "dense" / "gemma-3-270m-5e1f"
    dense.mkdir(parents=True)
    write_json_atomic(dense / "dense.json", versioned("prunekit-sweep-dense", {
        "model": {"spec": "embedded:gemma-3-270m", "name": MODEL, "dtype": "float32", "revision": None}}))
    write_json_atomic(dense / "results.json", results)
    _status(dense, "dense")


def make_tiny_sweep(root: Path) -> Path:
    runs_dir = root / "runs" / "tiny-example"
    run_ids = []
    for m, method in enumerate(METHODS):
        for c, calib in enumerate(CALIBS):
            for seed in SEEDS:
                run_id = f"{m:04x}{c:04x}{seed:04x}"
                run_ids.append(run_id)
                hidden = {lang: (10.0 + 3.0 * (calib == lang) - m + 0.5 * seed + 0.1 * c, (50.0 - 10.0 * (calib == lang) + 5 * m + seed + 2 * c) * 1e-6)
                          for lang in LANGS}
                scores = (0.55 + 0.02 * c - 0.03 * m + 0.01 * seed, 0.50 + 0.05 * (calib == "sw") + 0.01 * seed,
                          0.30 + 0.04 * (calib == "de") - 0.02 * m, 0.40 + 0.01 * c + 0.005 * seed)
                results = _results({lang: ppl(method, calib, lang, seed) for lang in LANGS}, hidden, tasks(scores))
                push = None if method != "wanda" else ("failed" if (method, calib, seed) == FAILED_PUSH else "done")
                make_run(runs_dir, run_id, {"label": method, "method": method, "kind": "prune", "quantization": None},
                         {"sparsity": 0.5, "n": 0, "m": 0, "label": "50%"}, calib, seed, results, push)
    make_dense(runs_dir, _results({lang: 0.9 * BASE[lang] for lang in LANGS}, None, tasks((0.7, 0.6, 0.4, 0.5))))
    write_json_atomic(runs_dir / "sweep.json", versioned("prunekit-sweep", {
        "name": "tiny-example", "runs": run_ids, "dense": ["gemma-3-270m-5e1f"], "calibration_sets": CALIBS, "eval_languages": LANGS}))
    return runs_dir


# ------------------------------------------------------------------------------------ expectations


def mean_std(values: list[float]) -> tuple[float, float | None]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


def expected_rows(runs_dir: Path) -> dict[tuple[str, str], dict]:
    """(method, calibration) -> {column: (mean, std)} straight from the run dirs."""
    per_seed: dict[tuple[str, str], dict[str, list[float]]] = {}
    for directory in sorted((runs_dir / "runs").iterdir()):
        run = json.loads((directory / "run.json").read_text())
        res = json.loads((directory / "results.json").read_text())
        columns = per_seed.setdefault((run["method"]["label"], run["calibration"]), {})
        ppls = [res["perplexity"][lang]["ppl"] for lang in LANGS]
        snrs = [res["hidden_states"][lang]["snr_db"] for lang in LANGS]
        pes = [res["hidden_states"][lang]["pruning_error"] * 1e6 for lang in LANGS]
        for lang, p, s, e in zip(LANGS, ppls, snrs, pes):
            columns.setdefault(f"perplexity:{lang}", []).append(p)
            columns.setdefault(f"snr_db:{lang}", []).append(s)
            columns.setdefault(f"pruning_error:{lang}", []).append(e)
        columns.setdefault("perplexity:avg", []).append(math.prod(ppls) ** (1 / len(ppls)))
        columns.setdefault("snr_db:avg", []).append(sum(snrs) / len(snrs))
        columns.setdefault("pruning_error:avg", []).append(sum(pes) / len(pes))
        xcopa = [res["tasks"][t]["metrics"]["acc"] * 100 for t in ("xcopa_en", "xcopa_sw")]  # xcopa_de is n/a
        columns.setdefault("task:xcopa/acc", []).append(sum(xcopa) / 2)
        mkqa = [res["tasks"][t]["metrics"]["f1"] * 100 for t in ("mkqa_de", "mkqa_en")]  # F1, not exact match
        columns.setdefault("task:mkqa/f1", []).append(sum(mkqa) / 2)
    return {key: {col: mean_std(values) for col, values in columns.items()} for key, columns in per_seed.items()}


def best_for(expected: dict, column: str, lower: bool = True) -> tuple[str, str]:
    return (min if lower else max)(expected, key=lambda key: expected[key][column][0])


@pytest.fixture(scope="module")
def sweep_report(tmp_path_factory):
    root = tmp_path_factory.mktemp("leaderboard")
    runs_dir = make_tiny_sweep(root)
    return build_report(runs_dir, root / "report")


@pytest.fixture(scope="module")
def expected(sweep_report):
    return expected_rows(sweep_report.runs_dir)


# ------------------------------------------------------------------------------------------ tests


def test_the_tiny_sweep_has_six_ranked_checkpoints_plus_the_dense_reference(sweep_report, expected):
    board = sweep_report.leaderboard
    assert len(board.entries) == 6 and len(board.dense) == 1
    assert {(e.method, e.calibration) for e in board.entries} == set(expected) == {(m, c) for m in METHODS for c in CALIBS}
    assert all(e.model == MODEL and e.setting == "50%" and e.seeds == SEEDS for e in board.entries)
    # ranked by the geometric mean of perplexity over the languages, best first
    assert board.rank_by.key == "perplexity:avg"
    order = sorted(expected, key=lambda key: expected[key]["perplexity:avg"][0])
    assert [(e.method, e.calibration) for e in board.entries] == order
    assert [e.rank for e in board.entries] == [1, 2, 3, 4, 5, 6]
    dense = board.dense[0]
    assert dense.is_dense and dense.rank is None
    assert dense.cells["perplexity:avg"].mean == pytest.approx(0.9 * math.prod(BASE.values()) ** (1 / 3), rel=1e-12)
    assert dense.cells["snr_db:en"].mean is None  # the reference has no SNR against itself


def test_every_leaderboard_number_equals_the_runs_results(sweep_report, expected):
    board = sweep_report.leaderboard
    keys = {c.key for c in board.columns}
    assert keys == set(next(iter(expected.values())))  # per language ×3 metrics, 3 averages, xcopa acc, mkqa F1
    for entry in board.entries:
        for column, (mean, std) in expected[(entry.method, entry.calibration)].items():
            cell = entry.cells[column]
            assert cell.mean == pytest.approx(mean, rel=1e-12), (entry.name, column)
            assert cell.std == pytest.approx(std, rel=1e-9), (entry.name, column)
    # the best checkpoint of every column is marked, and only it
    for column in board.columns:
        lower = column.metric.lower_is_better
        winner = best_for(expected, column.key, lower)
        assert [(e.method, e.calibration) for e in board.entries if e.cells[column.key].best] == [winner], column.key


def test_results_csv_is_the_leaderboard(sweep_report, expected):
    rows = list(csv.DictReader(sweep_report.files["results.csv"].open(encoding="utf-8")))
    assert len(rows) == 7 and rows[0]["method"] == "dense" and rows[0]["is_dense"] == "True" and rows[0]["rank"] == ""
    assert [int(r["rank"]) for r in rows[1:]] == [1, 2, 3, 4, 5, 6]
    for row in rows[1:]:
        want = expected[(row["method"], row["calibration"])]
        assert float(row["ppl_geomean"]) == pytest.approx(want["perplexity:avg"][0], rel=1e-12)
        assert float(row["ppl_geomean_std"]) == pytest.approx(want["perplexity:avg"][1], rel=1e-9)
        assert float(row["ppl_sw"]) == pytest.approx(want["perplexity:sw"][0], rel=1e-12)
        assert float(row["pe_x1e6_mean"]) == pytest.approx(want["pruning_error:avg"][0], rel=1e-12)
        assert float(row["mkqa_f1_pct"]) == pytest.approx(want["task:mkqa/f1"][0], rel=1e-12)
        assert row["seeds"] == "0;1" and row["setting"] == "50%"
    data = json.loads(sweep_report.files["leaderboard.json"].read_text())
    assert [r["rank"] for r in data["leaderboard"]["rows"]] == [None, 1, 2, 3, 4, 5, 6]


def test_hub_links_for_pushed_checkpoints_only(sweep_report):
    board = sweep_report.leaderboard
    for entry in board.entries:
        repos = [link["repo_id"] for link in entry.hub]
        if entry.method == "sparsegpt":
            assert repos == []
        else:
            pushed = [s for s in SEEDS if (entry.method, entry.calibration, s) != FAILED_PUSH]
            assert repos == [f"acme/{MODEL}-wanda-{entry.calibration}-s{s}" for s in pushed]
    md = sweep_report.files["report.md"].read_text()
    assert f"[acme/{MODEL}-wanda-sw-s1](https://huggingface.co/acme/{MODEL}-wanda-sw-s1)" in md
    assert f"acme/{MODEL}-wanda-de-s1" not in md  # its push failed
    html = sweep_report.files["report.html"].read_text()
    assert f'<a href="https://huggingface.co/acme/{MODEL}-wanda-en-s0">' in html


def test_the_leaderboard_opens_report_md(sweep_report, expected):
    md = sweep_report.files["report.md"].read_text()
    assert md.index("## Leaderboard") < md.index("## The study's tables") < md.index("## Perplexity")
    section = md[md.index("## Leaderboard"):md.index("### Best checkpoint")]
    table = [line for line in section.splitlines() if line.startswith("| ")]
    assert len(table) == 1 + 1 + 7  # header, alignment, dense + 6 checkpoints
    assert table[2].startswith(f"| — | {MODEL} | dense |")
    first = min(expected, key=lambda key: expected[key]["perplexity:avg"][0])
    assert table[3].startswith(f"| 1 | {MODEL} | {first[0]} | 50% | {first[1]} | 0, 1 | **")
    best_sw = best_for(expected, "perplexity:sw")
    assert f"| sw (Swahili): perplexity | {MODEL} · {best_sw[0]} 50% · calibration {best_sw[1]} |" in md


class _Rows(HTMLParser):
    """The text of each row of table#leaderboard's tbody, as a browser without JavaScript shows it."""

    def __init__(self):
        super().__init__()
        self.inside = self.body = False
        self.rows: list[list[str]] = []
        self.depth = 0

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "table" and attrs.get("id") == "leaderboard":
            self.inside = True
        elif self.inside and tag == "tbody":
            self.body = True
        elif self.body and tag == "tr":
            self.rows.append([])
        elif self.body and tag == "td":
            self.rows[-1].append("")

    def handle_endtag(self, tag):
        if tag == "tbody" and self.body:
            self.body = self.inside = False

    def handle_data(self, data):
        if self.body and self.rows and self.rows[-1]:
            self.rows[-1][-1] += data.strip()


def test_static_page_is_the_ranked_table(sweep_report):
    html = sweep_report.files["report.html"].read_text()
    parser = _Rows()
    parser.feed(html)
    assert len(parser.rows) == 6
    assert [row[0] for row in parser.rows] == ["1", "2", "3", "4", "5", "6"]
    top = sweep_report.leaderboard.entries[0]
    assert parser.rows[0][1:5] == [MODEL, top.method, "50%", top.calibration]
    assert html.index('id="leaderboard"') < html.index("The study's tables")
    assert 'id="leaderboard-filter"' in html and 'id="target-language"' in html
    assert "<script src" not in html and "http://" not in html.replace(f"https://huggingface.co/acme/{MODEL}", "")


def test_quantized_checkpoints_show_their_bits(tmp_path):
    runs_dir = tmp_path / "runs"
    quant = {"bits": 4, "group_size": 128, "act_order": False, "static_groups": True, "symmetric": False}
    for i, seed in enumerate((0, 1)):
        make_run(runs_dir, f"{i:012x}", {"label": "gptq-w4g128", "method": "gptq", "kind": "quantize", "quantization": quant},
                 None, "en", seed, _results({"en": 31.0 + seed}, None, {}))
    make_run(runs_dir, "0000000000aa", {"label": "gptq-w8", "method": "gptq", "kind": "quantize", "quantization": quant | {"bits": 8, "group_size": -1}},
             None, "en", 0, _results({"en": 30.5}, None, {}))
    report = build_report(runs_dir, tmp_path / "out", heatmaps=False)
    board = report.leaderboard
    assert [(e.method, e.setting) for e in board.entries] == [("gptq-w8", "8-bit"), ("gptq-w4g128", "4-bit g128")]
    assert board.entries[1].cells["perplexity:avg"].mean == pytest.approx(31.5) and board.entries[1].cells["perplexity:avg"].std == pytest.approx(math.sqrt(0.5))
    assert board.dense == [] and [c.key for c in board.columns] == ["perplexity:avg", "perplexity:en"]


def test_cli_report_open_opens_the_page_in_the_browser(sweep_report, tmp_path, monkeypatch):
    import webbrowser

    from typer.testing import CliRunner

    from prunekit.cli.main import app

    opened = []
    monkeypatch.setattr(webbrowser, "open", lambda url, *a, **k: opened.append(url) or True)
    result = CliRunner().invoke(app, ["report", str(sweep_report.runs_dir), "--out", str(tmp_path / "r"), "--open"])
    assert result.exit_code == 0, result.output
    assert opened == [(tmp_path / "r" / "report.html").resolve().as_uri()]
    assert "leaderboard: 6 checkpoints; best by PPL geo-mean" in result.output
    opened.clear()
    result = CliRunner().invoke(app, ["report", str(sweep_report.runs_dir), "--out", str(tmp_path / "r2")])
    assert result.exit_code == 0 and opened == []


# --------------------------------------------------------------------------- in a real browser

CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]


def system_chromium() -> str | None:
    """Debian's chromium (never a browser Playwright downloads); PRUNEKIT_CHROMIUM names another binary."""
    named = os.environ.get("PRUNEKIT_CHROMIUM")
    if named:
        return named if Path(named).exists() else None
    return shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install -e '.[dev]')")
    executable = system_chromium()
    if executable is None:
        pytest.skip("no system Chromium: browser tests need Debian's `chromium` (apt-get install chromium; .ci/run installs it)")
    with sync_api.sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=executable, headless=True, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser, sweep_report):
    """The report page, with every console error, page error and request it makes recorded."""
    context = browser.new_context()
    log = {"errors": [], "requests": [], "failed": []}
    context.on("request", lambda request: log["requests"].append(request.url))
    context.on("requestfailed", lambda request: log["failed"].append(request.url))
    tab = context.new_page()
    tab.on("console", lambda message: log["errors"].append(message.text) if message.type == "error" else None)
    tab.on("pageerror", lambda error: log["errors"].append(str(error)))
    url = sweep_report.files["report.html"].resolve().as_uri()
    tab.goto(url)
    tab.wait_for_load_state("load")
    tab.log, tab.url_of_report = log, url
    yield tab
    context.close()


def body_rows(page) -> list[dict]:
    """The rows of the leaderboard body the page shows (laid out on screen), top to bottom."""
    return page.eval_on_selector_all("#leaderboard > tbody > tr", """rows => rows.filter(r => r.getClientRects().length > 0).map(r => ({
        name: r.dataset.name, rank: r.cells[0].textContent.trim(), best: r.classList.contains('target-best'),
        cells: Array.from(r.cells).map(c => c.textContent.trim()), values: Array.from(r.cells).map(c => c.dataset.value)}))""")


def column_index(page, key: str) -> int:
    return int(page.get_attribute(f'#leaderboard th[data-col="{key}"]', "data-index"))


def name(method: str, calib: str) -> str:
    return f"{MODEL} · {method} 50% · calibration {calib}"


def test_page_loads_without_errors_broken_images_or_network(page, sweep_report):
    assert page.log["errors"] == []
    images = page.eval_on_selector_all("img", "imgs => imgs.map(i => i.complete && i.naturalWidth > 0)")
    assert len(images) == len(sweep_report.heatmaps) > 0 and all(images)
    assert page.is_visible("#leaderboard-filter") and page.is_visible("#target-language")
    assert len(body_rows(page)) == 6 and page.locator("#leaderboard > thead > tr.dense").count() == 1
    # use every control, then check that nothing but the page itself was ever requested
    page.click('#leaderboard th[data-col="perplexity:de"]')
    page.fill("#leaderboard-filter", "wanda")
    page.select_option("#target-language", "perplexity:sw")
    assert page.log["errors"] == [] and page.log["failed"] == []
    assert [u for u in page.log["requests"] if u != page.url_of_report and not u.startswith("data:")] == []


def test_sorting_a_column_orders_the_rows_and_again_reverses_them(page, expected):
    for key, lower in (("perplexity:sw", True), ("snr_db:avg", False)):
        header = f'#leaderboard th[data-col="{key}"]'
        index = column_index(page, key)
        page.click(header)
        values = [float(row["values"][index]) for row in body_rows(page)]
        assert values == sorted(values, reverse=not lower)  # the first click puts the best first
        assert page.get_attribute(header, "aria-sort") == ("ascending" if lower else "descending")
        page.click(header)
        again = [float(row["values"][index]) for row in body_rows(page)]
        assert again == sorted(values, reverse=lower)
        want = sorted(expected, key=lambda k: expected[k][key][0], reverse=lower)
        assert [row["name"] for row in body_rows(page)] == [name(*k) for k in want]
    page.click('#leaderboard th[data-index="4"]')  # calibration: text, A→Z
    calibrations = [row["cells"][4] for row in body_rows(page)]
    assert calibrations == sorted(calibrations) and calibrations[0] == "de"


def test_the_filter_hides_rows_that_do_not_match(page):
    page.fill("#leaderboard-filter", "sparsegpt")
    shown = body_rows(page)
    assert len(shown) == 3 and all(row["cells"][2] == "sparsegpt" for row in shown)
    assert page.locator("#leaderboard > tbody > tr:not([hidden])").count() == 3
    page.fill("#leaderboard-filter", "WANDA sw")  # every word must match: method and calibration
    assert [row["name"] for row in body_rows(page)] == [name("wanda", "sw")]
    page.fill("#leaderboard-filter", MODEL)
    assert len(body_rows(page)) == 6
    page.fill("#leaderboard-filter", "zz-no-such-checkpoint")
    assert body_rows(page) == [] and "0 of 6 checkpoints shown" in page.text_content("#leaderboard-status")
    page.fill("#leaderboard-filter", "")
    assert len(body_rows(page)) == 6


def test_the_target_language_re_ranks_and_highlights_its_best_checkpoint(page, expected):
    first = body_rows(page)[0]
    overall = best_for(expected, "perplexity:avg")
    assert first["name"] == name(*overall) and first["best"] and first["rank"] == "1"
    for lang in LANGS:
        page.select_option("#target-language", f"perplexity:{lang}")
        rows = body_rows(page)
        want = sorted(expected, key=lambda k: expected[k][f"perplexity:{lang}"][0])
        assert [row["name"] for row in rows] == [name(*k) for k in want], lang
        assert rows[0]["name"] == name("wanda", lang)  # calibrating on the target language wins here
        assert rows[0]["best"] and not any(row["best"] for row in rows[1:])
        assert [row["rank"] for row in rows] == ["1", "2", "3", "4", "5", "6"]
        assert name("wanda", lang) in page.text_content("#leaderboard-status")
    page.select_option("#target-language", "task:xcopa/acc")  # a task: higher is better
    assert body_rows(page)[0]["name"] == name(*best_for(expected, "task:xcopa/acc", lower=False))
    page.fill("#leaderboard-filter", "sparsegpt")  # the highlight follows the filter: best of what is shown
    shown = body_rows(page)
    sparse = {k: v for k, v in expected.items() if k[0] == "sparsegpt"}
    assert shown[0]["best"] and shown[0]["name"] == name(*best_for(sparse, "task:xcopa/acc", lower=False))
    page.fill("#leaderboard-filter", "")
    page.select_option("#target-language", "")
    assert [row["name"] for row in body_rows(page)] == [name(*k) for k in sorted(expected, key=lambda k: expected[k]["perplexity:avg"][0])]


def test_readable_without_javascript(browser, sweep_report):
    context = browser.new_context(java_script_enabled=False)
    try:
        tab = context.new_page()
        tab.goto(sweep_report.files["report.html"].resolve().as_uri())
        assert not tab.is_visible("#leaderboard-controls")  # controls that would do nothing stay hidden
        rows = tab.eval_on_selector_all("#leaderboard > tbody > tr", "rows => rows.map(r => r.cells[0].textContent.trim())")
        assert rows == ["1", "2", "3", "4", "5", "6"] and tab.is_visible("#leaderboard > tbody > tr.target-best")
    finally:
        context.close()


def test_without_perplexity_the_ranking_falls_back_to_the_next_average(tmp_path):
    """A sweep evaluated with --ppl-source none, one calibration-free method (seed None), an unchanged
    model (SNR +∞): ranked by the first average there is, ∞ written so that the page reads it back."""
    from prunekit.report.render import data_value

    runs_dir = tmp_path / "runs"
    magnitude = {"label": "magnitude", "method": "magnitude", "kind": "prune", "quantization": None}
    pattern = {"sparsity": 0.5, "n": 0, "m": 0, "label": "50%"}
    for i, (snr, acc) in enumerate(((8.0, 0.61), (math.inf, 0.64))):
        results = _results({}, {"en": (snr, 0.0 if math.isinf(snr) else 1e-5)}, tasks((acc, acc, 0.3, 0.3)))
        make_run(runs_dir, f"{i:012x}", magnitude | {"label": f"magnitude-{i}"}, pattern, "none", None, results)
    report = build_report(runs_dir, tmp_path / "out", heatmaps=False)
    board = report.leaderboard
    assert board.rank_by.key == "snr_db:avg" and board.rank_by.metric.better == "higher"
    assert [e.method for e in board.entries] == ["magnitude-1", "magnitude-0"] and [e.rank for e in board.entries] == [1, 2]
    assert board.entries[0].seeds == [None] and board.entries[0].cells["snr_db:avg"].mean == math.inf
    assert not board.entries[0].cells["snr_db:avg"].best and board.entries[1].cells["snr_db:avg"].best  # ∞ is no score to beat
    assert data_value(math.inf) == "Infinity" and data_value(None) == "" and data_value(math.nan) == ""
    html = report.files["report.html"].read_text()
    assert 'data-value="Infinity"' in html and "perplexity" not in [c.metric.id for c in board.columns]
