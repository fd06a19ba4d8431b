"""Cards as text: the model card and a sweep's collection README, rendered from ``hub_cards/*.j2`` and checked
with huggingface_hub's own card classes before they are returned."""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any, Iterable

from prunekit.hub.card import build_card_content, public_text
from prunekit.hub.names import base_model_name, recipe_slug


def _num(value: Any, spec: str = ".2f") -> str:
    if value is None:
        return "n/a"
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return "nan" if math.isnan(value) else format(value, spec)
    return str(value)


FILTERS = {
    "num": _num,
    "signed": lambda value, spec="+.2f": _num(value, spec),
    "pct": lambda value: "n/a" if value is None else _num(100.0 * value) + "%",
    "points": lambda value: "n/a" if value is None else _num(100.0 * value),
    "scaled": lambda value, scale: "n/a" if value is None else _num(scale * value),
}


def _render(template: str, **context: Any) -> str:
    """A card template rendered (trimmed blocks, strict variables, the number filters), blank runs squeezed."""
    import jinja2

    from prunekit.hub_cards import template_text

    env = jinja2.Environment(loader=jinja2.FunctionLoader(template_text), undefined=jinja2.StrictUndefined,
                             trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True, autoescape=False)
    env.filters.update(FILTERS)
    return re.sub(r"\n{3,}", "\n\n", env.get_template(template).render(**context)).rstrip() + "\n"


def render_model_card(record: dict[str, Any], results: dict[str, Any] | None = None,
                      dense_results: dict[str, Any] | None = None, repo_id: str = "namespace/model",
                      base_model: str | None = None) -> str:
    """The README.md of a pruned checkpoint's repo.

    Args:
        record, results, dense_results, repo_id, base_model: as for :func:`build_card_content`.
    Returns:
        The card, with no local absolute path, validated by :func:`validate_model_card`.
    Raises:
        ConfigError: as :func:`build_card_content`.
    """
    from prunekit.hub_cards import MODEL_CARD

    content = build_card_content(record, results, dense_results, repo_id, base_model)
    text = public_text(_render(MODEL_CARD, card_data=content.card_data.to_yaml(), **content.context))
    validate_model_card(text, content.eval_results)
    return text


def _eval_key(result) -> tuple:
    return (result.task_type, str(result.task_name), result.dataset_type, result.dataset_name,
            str(result.dataset_config), result.metric_type, str(result.metric_name))


def validate_model_card(text: str, expected_eval_results: list[Any] | None = None):
    """Parse a card with huggingface_hub's ``ModelCard`` and check that its model-index round-trips.

    Args:
        text: the card.
        expected_eval_results: the ``EvalResult`` entries the model-index must give back.
    Returns:
        The parsed ``ModelCard``.
    Raises:
        RuntimeError: the card lacks required metadata or loses results (a prunekit bug).
        ValueError: huggingface_hub cannot parse the front matter.
    """
    from huggingface_hub import ModelCard
    from huggingface_hub.repocard_data import model_index_to_eval_results

    card = ModelCard(text, ignore_metadata_errors=False)
    data = card.data.to_dict()
    for key in ("library_name", "pipeline_tag", "tags"):
        if not data.get(key):
            raise RuntimeError(f"model card lacks '{key}' (a prunekit bug)")
    if expected_eval_results:
        if not data.get("model-index"):
            raise RuntimeError("model card lost its model-index (a prunekit bug)")
        _, parsed = model_index_to_eval_results(data["model-index"])
        if sorted(parsed, key=_eval_key) != sorted(expected_eval_results, key=_eval_key):
            raise RuntimeError("the model card's model-index does not round-trip its results (a prunekit bug)")
    return card


def _run_row(entry: dict[str, Any]) -> dict[str, Any]:
    """One run of a collection: its name, recipe and headline numbers (the dense baseline has no record)."""
    record, results, repo_id = entry.get("record"), entry.get("results") or {}, entry.get("repo_id")
    if record is None:
        model = results.get("model") or {}
        name = entry.get("name") or f"{Path(str(model.get('spec', 'dense'))).name} (dense)"
        row = {"name": name, "repo_id": repo_id, "base": model.get("spec", ""), "method": "dense", "pattern": "-",
               "calibration": "-", "seed": "-", "sparsity": 0.0}
    else:
        recipe, calib = record.get("recipe") or {}, record.get("calibration") or {}
        pattern = recipe.get("pattern") or {}
        row = {
            "name": entry.get("name") or (repo_id.split("/")[-1] if repo_id else record.get("run_id", "run")),
            "repo_id": repo_id, "base": base_model_name(record), "method": recipe.get("method", ""),
            "pattern": (f"{pattern.get('n')}:{pattern.get('m')}" if pattern.get("m") else
                        f"unstructured {float(pattern.get('sparsity', 0)):.0%}" if pattern else recipe_slug(record)),
            "calibration": "+".join(calib.get("languages") or []) or "none", "seed": calib.get("seed", "-"),
            "sparsity": (record.get("sparsity") or {}).get("overall"),
        }
    row["ppl"] = {lang: r.get("ppl") for lang, r in (results.get("perplexity") or {}).items()}
    row["snr"] = {lang: r.get("snr_db") for lang, r in (results.get("hidden_states") or {}).items()}
    row["tasks"] = {f"{task}/{metric}": value if r.get("status", "ok") == "ok" else None
                    for task, r in (results.get("tasks") or {}).items() for metric, value in (r.get("metrics") or {}).items()}
    return row


def render_collection_readme(runs: Iterable[dict[str, Any]], title: str = "prunekit sweep",
                             description: str = "Pruned models from one prunekit sweep, with every run's measured results.",
                             tags: Iterable[str] = ()) -> str:
    """The README.md of a sweep's collection / report repo: every run's recipe and results, one table per kind.

    Args:
        runs: one dict per run with ``record`` (its ``prunekit.json``; None for the dense baseline), ``results``
            (its ``results.json`` or None) and optionally ``repo_id`` and ``name``.
        title, description: the README's heading and first paragraph.
        tags: tags added to 'prunekit' and 'pruning'.
    Returns:
        The README, parsed once by huggingface_hub's ``RepoCard``.
    """
    from huggingface_hub import CardData, RepoCard

    from prunekit.hub_cards import COLLECTION_README

    runs = list(runs)
    rows = [_run_row(entry) for entry in runs]
    keys = list(dict.fromkeys(key for row in rows for key in row["tasks"]))
    languages = list(dict.fromkeys(code for entry in runs
                                   for code in ((entry.get("record") or {}).get("calibration") or {}).get("languages") or []))

    def seen(field: str) -> list[str]:
        return list(dict.fromkeys(row[field] for row in rows if row[field] and row[field] != "-")) or ["-"]

    text = _render(
        COLLECTION_README, card_data=CardData(tags=["prunekit", "pruning", *tags], language=languages or None).to_yaml(),
        title=title, description=description, runs=rows,
        ppl_languages=list(dict.fromkeys(lang for row in rows for lang in row["ppl"])),
        snr_languages=list(dict.fromkeys(lang for row in rows for lang in row["snr"])),
        task_columns=[{"key": key, "task": key.rsplit("/", 1)[0], "metric": key.rsplit("/", 1)[1]} for key in keys],
        bases=seen("base"), methods=seen("method"), calibrations=seen("calibration"),
    )
    RepoCard(text, ignore_metadata_errors=False)  # parses, or raises: a prunekit bug
    return text
