"""The process lm-eval's vLLM backend runs in: ``python -m prunekit.evaluation.lm_worker REQUEST.json
RESULTS.jsonl`` (started by ``prunekit.evaluation.lm_backend.run_worker``). vLLM's GPU memory and CUDA
context are this process's and end with it, so nothing of them is left beside prunekit afterwards.

The request is JSON only (no pickle): the lm-eval backend name and its keyword arguments, the task
cells, ``--task-data`` and simple_evaluate's settings. Each task's result is appended to RESULTS.jsonl
as soon as it finishes, so the parent keeps the tasks done before a failure."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

RESULT_KEYS = ("results", "groups", "versions", "n-samples", "group_subtasks", "lm_eval_version", "chat_template_sha")


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2:
        print("usage: python -m prunekit.evaluation.lm_worker REQUEST.json RESULTS.jsonl", file=sys.stderr)
        return 2
    import lm_eval
    from lm_eval.api.registry import get_model

    from prunekit.evaluation.harness import build_lm_eval_spec, build_prunekit_config, task_manager
    from prunekit.evaluation.tasks import TaskCell

    request = json.loads(Path(args[0]).read_text(encoding="utf-8"))
    out = Path(args[1])
    manager = task_manager(request["uses_defaults"])
    lm = get_model(request["backend"])(**request["lm_args"])
    for item in request["cells"]:
        cell = TaskCell(**item)
        spec = build_prunekit_config(cell, request["task_data"]) if cell.kind == "prunekit" else build_lm_eval_spec(cell, request["task_data"])
        loaded = manager.load([spec])
        task = loaded["groups"].get(cell.name) or loaded["tasks"][cell.name]
        res = lm_eval.simple_evaluate(model=lm, tasks=[task], log_samples=False, fewshot_as_multiturn=False,
                                      task_manager=manager, **request["evaluate"])
        kept: dict[str, Any] = {key: res.get(key) for key in RESULT_KEYS if key in res}
        with out.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps({"task": cell.name, "result": kept}, default=str) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
