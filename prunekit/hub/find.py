"""``prunekit find`` and ``prunekit pull --best-for``: the checkpoints prunekit published for a base model, read
from the Hub's listing (huggingface_hub's ``list_models``, filtered by the tags prunekit writes and by
``base_model``, with each card's metadata expanded), ranked for a target language by the perplexity in their
model-index. What the cards carry and what is read here is documented in ``hub_cards/README.md``."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from prunekit.errors import ConfigError
from prunekit.hub.card import METHOD_NAMES
from prunekit.languages import get_language
from prunekit.hub.names import validate_repo_id
from prunekit.remote import RetryPolicy, check_reachable, hub_api, hub_call, resolve_endpoint

PRUNEKIT_TAG = "prunekit"  # every card prunekit writes carries it (prunekit.hub.card._card_data)
EXPAND = ["author", "cardData", "downloads", "lastModified", "sha", "tags", "private"]
HIDDEN_METRICS = {"perplexity", "snr", "pruning_error"}
LIST_LIMIT = 1000


@dataclass
class FoundCheckpoint:
    """One published checkpoint as ``find`` shows it (``--json`` gives these fields)."""

    repo_id: str
    revision: str | None  # the commit the listing saw: what pull --best-for downloads
    url: str
    method: str | None
    kind: str | None  # prune | quantize
    recipe: str | None  # '50% unstructured', '2:4', '4-bit g128'
    calibration: str | None  # 'sw', 'de+en', 'none'
    perplexity: float | None  # in the target language (or the geometric mean over the card's languages)
    dense_perplexity: float | None
    ratio_to_dense: float | None
    tasks: dict[str, float] = field(default_factory=dict)  # 'belebele_swh_Latn acc' -> points (x 100)
    downloads: int | None = None
    last_modified: str | None = None
    rank: int | None = None  # 1 = best; None: not ranked (see reason)
    reason: str | None = None  # why it is not ranked

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class FindResult:
    base: str
    lang: str | None
    endpoint: str
    rows: list[FoundCheckpoint]

    @property
    def ranked(self) -> list[FoundCheckpoint]:
        return [row for row in self.rows if row.rank is not None]

    @property
    def ranked_by(self) -> str:
        return f"{self.lang} perplexity" if self.lang else "geometric mean perplexity over each card's languages"

    def to_json(self) -> dict[str, Any]:
        return {"base": self.base, "lang": self.lang, "endpoint": self.endpoint, "ranked_by": self.ranked_by,
                "checkpoints": [row.to_json() for row in self.rows]}


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _recipe_text(block: dict[str, Any], tags: list[str]) -> str | None:
    if block.get("kind") == "quantize" or "quantized" in tags:
        bits = block.get("bits") or next((t.split("-")[0] for t in tags if t.endswith("-bit")), "?")
        group = block.get("group_size")
        return f"{bits}-bit" + (f" g{group}" if group and group > 0 else "")
    pattern = block.get("pattern") or next((t[: -len("-sparsity")].replace("of", ":") for t in tags
                                            if t.endswith("-sparsity") and t != "unstructured-sparsity"), None)
    sparsity = block.get("sparsity")
    share = f"{100 * sparsity:.0f}%" if _finite(sparsity) else None
    if pattern and pattern != "unstructured":
        return pattern + (f" ({share})" if share else "")
    return f"{share} unstructured" if share else ("unstructured" if "unstructured-sparsity" in tags else None)


def _calibration_text(block: dict[str, Any], tags: list[str]) -> str | None:
    calib = block.get("calibration") if "calibration" in block else None
    if calib is not None and not calib:
        return "none"
    langs = (calib or {}).get("languages") or [t[len("calibration-"):] for t in tags if t.startswith("calibration-")]
    return "+".join(langs) if langs else ("none" if block else None)


def _score(name: str, value: float) -> float:
    base = name.split(",")[0]
    return value if ("perplexity" in base or "bits_per_byte" in base) else 100.0 * value


def checkpoint_row(info: Any, lang: str | None, base: str, endpoint: str) -> FoundCheckpoint:
    """One listing entry (a huggingface_hub ``ModelInfo`` with card data) as a row.

    Args:
        info: the ``ModelInfo``.
        lang: the target language, or None (rank by the geometric mean of the card's perplexities).
        base: the base model searched for.
        endpoint: the Hub URL, for the repo's link.
    Returns:
        The row, unranked (``reason`` says why when it cannot be ranked).
    """
    card = info.card_data
    block = (card.get("prunekit") if card is not None else None) or {}
    block = block if isinstance(block, dict) else {}
    tags = list(info.tags or [])
    results = list((card.eval_results if card is not None else None) or [])
    ppl = {str(r.dataset_config): float(r.metric_value) for r in results
           if r.metric_type == "perplexity" and _finite(r.metric_value)}
    dense = {k: float(v) for k, v in (block.get("dense_perplexity") or {}).items() if _finite(v)}
    tasks = {f"{r.dataset_name} {r.metric_type}": round(_score(str(r.metric_type), float(r.metric_value)), 2)
             for r in results if r.metric_type not in HIDDEN_METRICS and _finite(r.metric_value)
             and (lang is None or str(r.dataset_config) == lang)}
    reason, value, dense_value = None, None, None
    if card is None:
        reason = "the card has no metadata"
    elif not results:
        reason = "the card has no model-index metrics (pushed without results.json)"
    elif lang is not None:
        value, dense_value = ppl.get(lang), dense.get(lang)
        if value is None:
            reason = f"no {lang} perplexity in the card's model-index (measured: {', '.join(sorted(ppl)) or 'none'})"
    elif ppl:
        value = math.exp(sum(math.log(v) for v in ppl.values()) / len(ppl))
        shared = [k for k in ppl if k in dense]
        dense_value = math.exp(sum(math.log(dense[k]) for k in shared) / len(shared)) if len(shared) == len(ppl) else None
    else:
        reason = "no perplexity in the card's model-index"
    last = getattr(info, "last_modified", None)
    return FoundCheckpoint(
        repo_id=info.id, revision=info.sha, url=f"{endpoint}/{info.id}",
        method=block.get("method") or next((t for t in tags if t in METHOD_NAMES), None),
        kind=block.get("kind"), recipe=_recipe_text(block, tags), calibration=_calibration_text(block, tags),
        perplexity=value, dense_perplexity=dense_value,
        ratio_to_dense=value / dense_value if value is not None and dense_value else None, tasks=tasks,
        downloads=info.downloads, last_modified=last.isoformat() if last else None, reason=reason)


def _check_lang(lang: str | None) -> str | None:
    if lang is None:
        return None
    try:  # the language registry's codes (the study's seven and mC4's), with its "did you mean"
        return get_language(lang.strip().lower()).code
    except ConfigError as err:
        raise ConfigError(f"invalid --lang '{lang}': {err}") from None


def find_checkpoints(base: str, lang: str | None = None, method: str | None = None, author: str | None = None,
                     endpoint: str | None = None, token: str | None = None, retry: RetryPolicy | None = None,
                     limit: int = LIST_LIMIT) -> FindResult:
    """The checkpoints prunekit published for ``base``, best first for ``lang``.

    Args:
        base: the base model's Hub id (what the cards name as ``base_model``).
        lang: rank by the perplexity in this language; None: by the geometric mean of each card's perplexities.
        method: only this method (wanda, sparsegpt, magnitude, gptq).
        author: only repos of this user or organization.
        endpoint: the Hub URL (default ``$HF_ENDPOINT``, else the public Hub).
        token: the token (default huggingface_hub's own; private repos of yours are listed with it).
        retry: the retry policy for transient failures.
        limit: the most repos read from the listing.
    Returns:
        Ranked rows first (rank 1 = lowest perplexity), then the cards that cannot be ranked, each with its reason.
    Raises:
        ConfigError: an invalid base id or language code, or no prunekit checkpoint of ``base`` matches.
        ModelError: ``base`` is not on the Hub.
        HubError: offline mode, an unreachable Hub or one that kept failing.
    """
    base, lang = validate_repo_id(base), _check_lang(lang)
    endpoint = resolve_endpoint(endpoint)
    what = f"listing the prunekit checkpoints of {base}"
    api, token = hub_api(what, endpoint, token, offline_hint="unset HF_HUB_OFFLINE to search the Hub")
    check_reachable(endpoint, what)
    filters = [PRUNEKIT_TAG, f"base_model:{base}", *([method.strip().lower()] if method else [])]
    infos = hub_call(what, lambda: list(api.list_models(filter=filters, author=author or None, expand=EXPAND,
                                                         limit=limit)),
                     repo_id=base, endpoint=endpoint, token=token, retry=retry)
    infos = [info for info in infos if info.card_data is None or _names_base(info.card_data.get("base_model"), base)]
    if not infos:
        hub_call(f"reading {base}", lambda: api.model_info(base), repo_id=base, endpoint=endpoint, token=token,
                 retry=retry)  # an unknown base: ModelError
        narrowed = ", ".join(f"{k} {v}" for k, v in (("method", method), ("author", author)) if v)
        raise ConfigError(f"no prunekit checkpoints of {base} were found at {endpoint}"
                          + (f" ({narrowed})" if narrowed else "") + "; try without --method / --author, or publish "
                          "some with `prunekit push` or a sweep's push: section")
    rows = [checkpoint_row(info, lang, base, endpoint) for info in infos]
    ranked = sorted((r for r in rows if r.perplexity is not None), key=lambda r: (r.perplexity, r.repo_id))
    for rank, row in enumerate(ranked, 1):
        row.rank = rank
    rest = sorted((r for r in rows if r.perplexity is None), key=lambda r: (-(r.downloads or 0), r.repo_id))
    return FindResult(base, lang, endpoint, ranked + rest)


def _names_base(value: Any, base: str) -> bool:
    values = value if isinstance(value, list) else [value]
    return any(str(v).lower() == base.lower() for v in values if v)


@dataclass
class BestPull:
    chosen: FoundCheckpoint
    why: str
    considered: int
    path: Path
    revision: str
    files: list[str]


def pull_best(lang: str, base: str, out: str | Path | None = None, method: str | None = None,
              author: str | None = None, endpoint: str | None = None, token: str | None = None,
              retry: RetryPolicy | None = None) -> BestPull:
    """Download the top-ranked checkpoint of ``base`` for ``lang``, pinned to the commit the listing saw.

    Args:
        lang: the target language.
        base, method, author, endpoint, token, retry: as for :func:`find_checkpoints`.
        out: download into this directory (default: the Hub cache).
    Returns:
        What was chosen, why, and where it went.
    Raises:
        ConfigError: no checkpoint reports ``lang`` perplexity; and as :func:`find_checkpoints`.
    """
    from prunekit.hub.transfer import pull

    found = find_checkpoints(base, lang, method=method, author=author, endpoint=endpoint, token=token, retry=retry)
    if not found.ranked:
        raise ConfigError(f"none of the {len(found.rows)} prunekit checkpoints of {base} reports {found.lang} "
                          f"perplexity, so none can be chosen for it; run `prunekit find --base {base}` to see them")
    best = found.ranked[0]
    ratio = f", {best.ratio_to_dense:.2f}x dense" if best.ratio_to_dense else ""
    runner = found.ranked[1] if len(found.ranked) > 1 else None
    why = (f"lowest {found.lang} perplexity ({best.perplexity:.2f}{ratio}) of {len(found.ranked)} ranked "
           f"checkpoints of {base}" + (f"; next: {runner.repo_id} ({runner.perplexity:.2f})" if runner else "")
           + f"; {best.method or '?'} {best.recipe or ''}, calibrated on {best.calibration or '?'}")
    pulled = pull(best.repo_id, revision=best.revision, out=out, endpoint=found.endpoint, token=token, retry=retry)
    return BestPull(best, why, len(found.rows), pulled.path, pulled.revision, pulled.files)
