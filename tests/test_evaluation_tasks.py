"""Downstream tasks: the study's suite as groups, n/a cells, MKQA F1, and local lm-eval tasks end to end."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import pytest
from typer.testing import CliRunner

from prunekit.errors import ConfigError
from prunekit.evaluation import EvaluationSpec, evaluate, plan_tasks
from prunekit.evaluation.tasks import utils as task_utils
from prunekit.io import read_versioned
from tests.conftest import TEST_DATA, TATOEBA

F1 = task_utils.mkqa_f1


# ------------------------------------------------------------------------------------ MKQA F1

def _plan(backend, parallelize, device, task_batch_size, batch_size, path=None, dtype=None, **options):
    """``plan_backend`` of the spec these settings make (the spec is what the suite passes)."""
    from prunekit.evaluation import lm_backend
    from prunekit.evaluation.spec import EvaluationSpec

    spec = EvaluationSpec(backend=backend, parallelize=parallelize, task_batch_size=task_batch_size, batch_size=batch_size, **options)
    return lm_backend.plan_backend(spec, device, path=path, dtype=dtype)



@pytest.mark.parametrize(
    "prediction, golds, lang, expected",
    [
        ("The Beatles", ["Beatles"], "en", 1.0),  # English article dropped
        ("Dave Edmunds band", ["Dave Edmunds"], "en", 0.8),  # P = 2/3, R = 1
        ("Edmunds", ["Dave Edmunds", "Edmunds"], "en", 1.0),  # best over aliases
        ("Der Rhein, Fluss", ["Rhein"], "de", 2 / 3),  # German article and comma dropped: [rhein, fluss] vs [rhein]
        ("los Andes", ["Andes"], "es", 1.0),
        ("الكتاب الأحمر", ["كتاب أحمر"], "ar", 1.0),  # every "ال" removed (the official Arabic pattern)
        ("مدينة القاهرة", ["القاهرة"], "ar", 2 / 3),
        ("北京市", ["北京"], "zh_cn", 0.8),  # characters are tokens: P = 2/3, R = 1
        ("《北京》", ["北京"], "zh_cn", 2 / 3),  # CJK brackets are not ASCII punctuation: they stay as tokens
        ("巴黎", ["北京", "巴黎"], "zh_cn", 1.0),
        ("", ["Paris"], "en", 0.0),
        ("London", ["Paris"], "en", 0.0),
    ],
)
def test_mkqa_f1_matches_hand_worked_cases(prediction, golds, lang, expected):
    assert F1(prediction, golds, lang) == pytest.approx(expected)


def test_mkqa_exact_match_and_normalisation():
    assert task_utils.mkqa_normalize("  The  Rolling-Stones! ", "en") == "rollingstones"
    assert task_utils.mkqa_tokens("上海 Shanghai", "zh_cn") == list("上海shanghai")
    assert task_utils.mkqa_exact_match("the Beatles.", ["Beatles"], "en") == 1.0
    assert task_utils.mkqa_exact_match("Beatles band", ["Beatles"], "en") == 0.0
    assert task_utils.mkqa_process_results({"golds": ["Paris"], "mkqa_lang": "en"}, ["\n Paris\nQuestion: x"]) == {
        "f1": 1.0, "exact_match": 1.0}


def _mkqa_example(i: int, kind: str = "entity") -> dict:
    answers = {
        "en": [{"type": kind, "text": f"Answer {i}", "aliases": [f"A{i}"]}],
        "de": [{"type": kind, "text": f"Antwort {i}", "aliases": []}],
        "zh_cn": [{"type": kind, "text": f"答案{i}"}],
    }
    if kind == "unanswerable":
        answers = {lang: [{"type": kind, "text": None}] for lang in answers}
    return {"example_id": 1000 + i, "query": f"question {i}?", "answers": answers,
            "queries": {"en": f"question {i}?", "de": f"Frage {i}?", "zh_cn": f"问题{i}？"}}


def test_mkqa_docs_apply_the_study_filter():
    from datasets import Dataset

    rows = [_mkqa_example(0), _mkqa_example(1, "unanswerable"), _mkqa_example(2, "long_answer"), _mkqa_example(3, "date")]
    docs = task_utils.mkqa_docs_de(Dataset.from_list(rows))
    assert [d["question"] for d in docs] == ["Frage 0?", "Frage 3?"]
    assert docs[0]["golds"] == ["Antwort 0"] and docs[0]["mkqa_lang"] == "de"
    en = task_utils.mkqa_docs_en(Dataset.from_list(rows))
    assert en[0]["golds"] == ["A0", "Answer 0"]


def test_final_number_reads_thousands_separators_and_takes_the_last_number():
    assert task_utils.final_number("It costs 2,125 dollars.") == 2125
    assert task_utils.final_number("First 3 then 4.5") == task_utils.parse_number("4.5")
    assert task_utils.final_number("no digits") is None
    assert task_utils.mgsm_process_results({"answer": "2,125"}, ["so 2125"]) == {"exact_match": 1.0}
    assert task_utils.mgsm_process_results({"answer": 18}, ["18 or 19"]) == {"exact_match": 0.0}


# ------------------------------------------------------------------------------------ planning


def test_study_suite_expands_per_language_with_na_cells_and_notes():
    cells = {c.name: c for c in plan_tasks("study", ["en", "sw", "zh"])}
    assert cells["arc_challenge"].language == "en" and cells["arc_easy"].kind == "lm-eval"
    assert cells["arc_zh"].kind == "lm-eval" and cells["m_mmlu_zh"].kind == "lm-eval"
    assert cells["belebele_swh_Latn"].kind == "lm-eval" and cells["belebele_zho_Hans"].language == "zh"
    assert cells["mkqa_zh"].kind == "prunekit" and cells["mkqa_en"].kind == "prunekit"
    for missing in ("arc_sw", "hellaswag_sw", "hellaswag_zh", "m_mmlu_sw", "mkqa_sw"):
        assert cells[missing].kind == "n/a" and cells[missing].note, missing
    assert "Swahili" in cells["mkqa_sw"].note and "hellaswag" in cells["hellaswag_zh"].note.lower()


def test_unknown_task_and_unknown_language_are_config_errors(tiny_llama):
    with pytest.raises(ConfigError, match="unknown task 'belebel'.*did you mean"):
        plan_tasks("belebel", ["en"])
    with pytest.raises(ConfigError, match="unknown language code 'xx'"):
        evaluate(tiny_llama, EvaluationSpec(langs="en,xx", ppl_source=None, tasks="xcopa"), progress=False)


def test_language_a_task_lacks_is_reported_na_with_a_note(tiny_llama):
    res = evaluate(tiny_llama, EvaluationSpec(langs="de", ppl_source=None, tasks="xcopa,mkqa_de", task_data=TEST_DATA, device="cpu"), progress=False)
    cell = res["tasks"]["xcopa_local_de"]
    assert cell["status"] == "n/a" and "XCOPA has no German" in cell["note"] and cell["metrics"] == {}
    # mkqa_de is runnable, but its data file is not under --task-data: n/a naming the file it looked for
    assert res["tasks"]["mkqa_de"]["status"] == "n/a" and "mkqa.jsonl.gz" in res["tasks"]["mkqa_de"]["note"]


def test_local_task_without_task_data_or_with_a_chat_template_it_lacks_fails_clearly(tiny_llama):
    with pytest.raises(ConfigError, match="pass --task-data DIR with xcopa/sw/test.jsonl"):
        evaluate(tiny_llama, EvaluationSpec(langs="sw", ppl_source=None, tasks="xcopa", device="cpu"), progress=False)
    with pytest.raises(ConfigError, match="no chat template"):
        evaluate(tiny_llama, EvaluationSpec(langs="sw", ppl_source=None, tasks="xcopa", task_data=TEST_DATA, chat_template=True, device="cpu"), progress=False)


# ------------------------------------------------------------------------------- end to end


def _check_ok(cell: dict, metric: str, samples: int) -> None:
    assert cell["status"] == "ok" and cell["note"] is None
    assert 0.0 <= cell["metrics"][metric] <= 1.0
    assert cell["stderr"][metric] is not None and math.isfinite(cell["stderr"][metric])
    assert cell["samples"] == samples


def test_xcopa_from_local_files_runs_end_to_end(tiny_llama):
    res = evaluate(tiny_llama, EvaluationSpec(langs="sw,zh", ppl_source=None, tasks="xcopa", task_data=TEST_DATA, limit=10, device="cpu", bootstrap_iters=1), progress=False)
    for lang in ("sw", "zh"):
        cell = res["tasks"][f"xcopa_local_{lang}"]
        assert cell["group"] == "xcopa" and cell["language"] == lang
        _check_ok(cell, "acc", 10)
    assert res["settings"]["chat_template"] is False and res["settings"]["num_fewshot"] == 0


def test_mgsm_and_mkqa_generate_until_tasks_run_end_to_end(tiny_llama, tmp_path):
    data = tmp_path / "task-data"
    (data / "mkqa").mkdir(parents=True)
    rows = [_mkqa_example(0), _mkqa_example(1, "unanswerable"), _mkqa_example(2), _mkqa_example(3, "number")]
    (data / "mkqa" / "mkqa.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    (data / "mgsm").symlink_to(TEST_DATA / "mgsm", target_is_directory=True)
    res = evaluate(tiny_llama, EvaluationSpec(langs="zh", ppl_source=None, tasks="mgsm,mkqa", task_data=data, limit=3, device="cpu", bootstrap_iters=1), progress=False)
    _check_ok(res["tasks"]["mgsm_local_zh"], "exact_match", 3)
    mkqa = res["tasks"]["mkqa_zh"]
    _check_ok(mkqa, "f1", 3)  # 3 answerable short-answer questions survive the study's filter
    assert 0.0 <= mkqa["metrics"]["exact_match"] <= mkqa["metrics"]["f1"] + 1e-12


def test_builtin_lm_eval_task_reads_local_rows_offline(tiny_llama, tmp_path):
    data = tmp_path / "task-data"
    data.mkdir()
    rows = [
        {"link": "x", "question_number": i, "flores_passage": f"Passage {i} about rivers.", "question": f"Which river {i}?",
         "mc_answer1": "Rhein", "mc_answer2": "Elbe", "mc_answer3": "Donau", "mc_answer4": "Main",
         "correct_answer_num": str(1 + i % 4), "dialect": "deu_Latn", "ds": "2023-01-01"}
        for i in range(4)
    ]
    (data / "belebele_deu_Latn.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    res = evaluate(tiny_llama, EvaluationSpec(langs="de", ppl_source=None, tasks="belebele", task_data=data, device="cpu", bootstrap_iters=1), progress=False)
    cell = res["tasks"]["belebele_deu_Latn"]
    _check_ok(cell, "acc", 4)
    assert "acc_norm" in cell["metrics"]


def test_cli_eval_writes_the_versioned_results_and_prints_tables(tiny_llama, tmp_path):
    from prunekit.cli.main import app

    texts = tmp_path / "texts"
    texts.mkdir()
    lines = (TATOEBA / "sw.txt").read_text(encoding="utf-8").splitlines()[:10]
    (texts / "sw.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    out = tmp_path / "results.json"
    result = CliRunner().invoke(app, [
        "eval", str(tiny_llama), "--langs", "sw", "--ppl-source", str(texts), "--seqlen", "32",
        "--tasks", "xcopa,arc", "--task-data", str(TEST_DATA), "--limit", "4", "--device", "cpu",
        "--bootstrap-iters", "1", "--out", str(out),
    ])
    assert result.exit_code == 0, result.output
    data = read_versioned(out, "prunekit-results")
    for key in ("model", "dense", "languages", "perplexity", "hidden_states", "tasks", "settings", "versions", "created"):
        assert key in data
    assert set(data["model"]) >= {"spec", "path", "revision", "kind", "record"}
    assert data["languages"] == ["sw"] and data["hidden_states"] == {} and data["dense"] is None
    assert set(data["perplexity"]["sw"]) >= {"ppl", "nll", "tokens", "windows", "seqlen", "source", "location"}
    assert data["tasks"]["xcopa_local_sw"]["status"] == "ok" and data["tasks"]["arc_sw"]["status"] == "n/a"
    assert "xcopa_local_sw" in result.output and "perplexity" in result.output


def test_cli_unknown_task_exits_2_with_one_line(tiny_llama):
    from prunekit.cli.main import app

    result = CliRunner().invoke(app, ["eval", str(tiny_llama), "--tasks", "no_such_task", "--ppl-source", "none"])
    assert result.exit_code == 2
    assert "unknown task 'no_such_task'" in result.output and "Traceback" not in result.output


def test_exported_task_configs_load_in_plain_lm_eval(tmp_path):
    from lm_eval.tasks import TaskManager

    from prunekit.evaluation.harness import export_task_configs

    out = export_task_configs(TEST_DATA, tmp_path / "tasks")
    assert "{task_data}" not in (out / "xcopa_local_zh.yaml").read_text(encoding="utf-8")
    task = TaskManager(include_path=str(out), include_defaults=False).load(["xcopa_local_zh"])["tasks"]["xcopa_local_zh"]
    doc = next(iter(task.test_docs()))
    assert task.doc_to_text(doc).endswith(("因为", "所以")) and len(task.doc_to_choice(doc)) == 2


# ------------------------------------------------------------------ backends, batch size, resumption


def _fake_results(name: str) -> dict:
    return {"results": {name: {"alias": name, "acc,none": 0.5, "acc_stderr,none": 0.25}},
            "n-samples": {name: {"original": 4, "effective": 4}}, "versions": {name: 1.0},
            "lm_eval_version": "test", "chat_template_sha": None}


def test_tasks_are_saved_as_they_finish_and_a_killed_evaluation_resumes(tiny_llama, tmp_path, monkeypatch):
    """Issue 20 item 6: a killed evaluation keeps its finished tasks; run again, it does only the rest."""
    import lm_eval

    from prunekit.evaluation import harness

    ran: list[str] = []

    def simple_evaluate(model, tasks, **kwargs):
        name = tasks[0].config.task
        if kill and len(ran) == 1:
            raise KeyboardInterrupt  # the job is killed during the second task
        ran.append(name)
        return _fake_results(name)

    monkeypatch.setattr(lm_eval, "simple_evaluate", simple_evaluate)
    monkeypatch.setattr(harness, "make_lm", lambda plan, model, tokenizer: "lm")
    out = tmp_path / "results.json"
    spec = EvaluationSpec(langs="sw,zh", ppl_source=None, tasks="xcopa", task_data=TEST_DATA, device="cpu", limit=4)
    options = dict(spec=spec, progress=False, out=out)
    kill = True
    with pytest.raises(KeyboardInterrupt):
        evaluate(tiny_llama, **options)
    partial = harness.partial_results_path(out)
    assert ran == ["xcopa_local_sw"] and partial.exists() and not out.exists()
    assert set(json.loads(partial.read_text())["tasks"]) == {"xcopa_local_sw"}

    kill = False
    res = evaluate(tiny_llama, **options)
    assert ran == ["xcopa_local_sw", "xcopa_local_zh"]  # the finished task was not run again
    assert {cell["status"] for cell in res["tasks"].values()} == {"ok"}
    assert res["versions"]["lm_eval_tasks"] == {"xcopa_local_sw": 1.0, "xcopa_local_zh": 1.0}
    assert out.exists() and not partial.exists()

    # Other settings (here: the limit) do not reuse saved tasks.
    kill = True
    ran.clear()
    with pytest.raises(KeyboardInterrupt):
        evaluate(tiny_llama, **options)
    kill = False
    evaluate(tiny_llama, **(options | {"spec": replace(spec, limit=3)}))
    assert ran == ["xcopa_local_sw", "xcopa_local_sw", "xcopa_local_zh"]


def test_task_batch_size_is_auto_on_a_gpu_and_the_cpu_path_is_unchanged(tiny_llama):
    import torch

    from prunekit.evaluation.harness import lm_arguments

    cpu = _plan("hf", None, torch.device("cpu"), None, 4, path=tiny_llama)
    assert (cpu.backend, cpu.parallelize, cpu.batch_size, cpu.loads_itself) == ("hf", False, 4, False)
    assert lm_arguments(cpu, "MODEL", "TOK") == {"pretrained": "MODEL", "tokenizer": "TOK", "batch_size": 4, "parallelize": False}
    assert _plan("hf", None, torch.device("cuda"), None, 4, path=tiny_llama).batch_size == "auto"
    assert _plan("hf", None, torch.device("cpu"), "auto:2", 4).batch_size == "auto:2"
    assert _plan("hf", None, torch.device("cpu"), "16", 4).batch_size == 16
    for bad in ("0", "many", "auto:x"):
        with pytest.raises(ConfigError, match="--task-batch-size"):
            _plan("hf", None, torch.device("cpu"), bad, 4)


def test_parallelize_and_vllm_arguments_on_a_simulated_gpu_node(tiny_llama, monkeypatch):
    import importlib.util

    import torch

    from prunekit.evaluation import harness

    with pytest.raises(ConfigError, match="--parallelize"):
        _plan("hf", True, torch.device("cpu"), None, 4, path=tiny_llama)  # no GPU here
    with pytest.raises(ConfigError, match="pip install"):
        _plan("vllm", None, torch.device("cpu"), None, 4, path=tiny_llama)
    with pytest.raises(ConfigError, match="unknown --backend"):
        _plan("tgi", None, torch.device("cpu"), None, 4)

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    # Four GPUs visible: parallelize stays off unless asked (a worker's lm-eval never spreads over them by itself).
    one = _plan("hf", None, torch.device("cuda"), None, 8, path=tiny_llama, dtype=torch.bfloat16)
    assert not one.parallelize and not one.loads_itself
    plan = _plan("hf", True, torch.device("cuda"), None, 8, path=tiny_llama, dtype=torch.bfloat16)
    assert plan.parallelize and plan.loads_itself and plan.model(lambda: pytest.fail("loaded"), "cuda") is None
    assert harness.lm_arguments(plan, None, "TOK") == {
        "pretrained": str(tiny_llama), "tokenizer": "TOK", "dtype": "bfloat16", "batch_size": "auto",
        "parallelize": True, "trust_remote_code": False}
    with pytest.raises(ConfigError, match="in-memory"):
        _plan("hf", True, torch.device("cuda"), None, 8, path=None)

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == "vllm" else real_find_spec(name, *a))
    vllm = _plan("vllm", None, torch.device("cuda"), None, 8, path=tiny_llama, dtype=torch.bfloat16)
    assert vllm.backend == "vllm" and not vllm.parallelize and vllm.in_subprocess and vllm.visible_devices == "0"
    assert harness.lm_arguments(vllm, None, "TOK") == {
        "pretrained": str(tiny_llama), "tokenizer": str(tiny_llama), "dtype": "bfloat16", "batch_size": "auto",
        "tensor_parallel_size": 1, "trust_remote_code": False}
    tp = _plan("vllm", True, torch.device("cuda"), None, 8, path=tiny_llama, dtype=torch.bfloat16)
    assert harness.lm_arguments(tp, None, None)["tensor_parallel_size"] == 4 and tp.visible_devices is None
    made = {}

    class FakeVLLM:
        def __init__(self, **kwargs):
            made.update(kwargs)

    monkeypatch.setattr("lm_eval.api.registry.get_model", lambda name: {"vllm": FakeVLLM}[name])
    harness.make_lm(tp, None, object())
    assert made["pretrained"] == str(tiny_llama) and made["tensor_parallel_size"] == 4