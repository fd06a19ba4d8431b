"""A sweep's checkpoints as one Hub collection, on huggingface_hub's collection API: created (or found) by title,
one item per pushed repo with a note (calibration set and headline perplexity), and each repo's card given a
'Related checkpoints' section (``hub_cards/related.md.j2``) linking the collection, the leaderboard Space when
known, and its siblings (same base model and recipe, other calibration languages). Everything is read back from
the Hub (the cards' ``prunekit:`` metadata and model-index), so a rerun changes nothing that is already right."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prunekit.errors import ConfigError, HubError, ModelError
from prunekit.hub.card import validate_model_card, with_related_section
from prunekit.hub.names import validate_namespace, validate_repo_id
from prunekit.remote import RetryPolicy, hub_api, hub_call, resolve_endpoint

TITLE_MAX = 60  # the Hub's limit on a collection title
NOTE_MAX = 500  # and on an item's note
CARD_FILE = "README.md"


@dataclass
class Published:
    """One pushed checkpoint as its card describes it."""

    repo_id: str
    sha: str | None
    base: str | None
    method: str | None
    recipe: str | None
    calibration: list[str]
    headline_lang: str | None
    headline: float | None
    dense: float | None

    @property
    def calibration_text(self) -> str:
        return "+".join(self.calibration) or "no calibration"

    def note(self) -> str:
        text = f"{self.method or 'prunekit'} {self.recipe or ''}".strip() + f", calibrated on {self.calibration_text}"
        if self.headline is not None:
            text += f"; {self.headline_lang} perplexity {self.headline:.2f}"
            text += f" ({self.headline / self.dense:.2f}x dense)" if self.dense else ""
        return text[:NOTE_MAX]


@dataclass
class CollectionResult:
    slug: str
    url: str
    title: str
    items: list[str]  # repo ids, in the collection
    added: list[str] = field(default_factory=list)
    notes_updated: list[str] = field(default_factory=list)
    cards_updated: list[str] = field(default_factory=list)


def default_title(sweep_name: str) -> str:
    """The collection's title for a sweep: its name, within the Hub's 60 characters."""
    title = f"{sweep_name} (prunekit sweep)"
    return title if len(title) <= TITLE_MAX else sweep_name[:TITLE_MAX]


def _geomean(values: list[float]) -> float | None:
    return math.exp(sum(math.log(v) for v in values) / len(values)) if values and all(v > 0 for v in values) else None


def published_from_info(info: Any) -> Published:
    """Read one listing entry (``ModelInfo`` with card data): recipe and headline perplexity (the calibration
    language's; the geometric mean over several; else over every language measured)."""
    card = info.card_data
    block = (card.get("prunekit") if card is not None else None) or {}
    calib = list(((block.get("calibration") or {}).get("languages")) or [])
    ppl = {str(r.dataset_config): float(r.metric_value) for r in ((card.eval_results if card else None) or [])
           if r.metric_type == "perplexity" and isinstance(r.metric_value, (int, float))}
    dense = block.get("dense_perplexity") or {}
    langs = [lang for lang in calib if lang in ppl] or sorted(ppl)
    label = langs[0] if len(langs) == 1 else ("mean" if langs else None)
    headline = _geomean([ppl[lang] for lang in langs])
    dense_value = _geomean([float(dense[lang]) for lang in langs]) if langs and all(lang in dense for lang in langs) else None
    base = card.get("base_model") if card is not None else None
    return Published(info.id, info.sha, base if isinstance(base, str) else None, block.get("method"),
                     block.get("recipe"), calib, label, headline, dense_value)


def _siblings(me: Published, everyone: list[Published], endpoint: str) -> list[dict[str, Any]]:
    return [{"repo_id": o.repo_id, "url": f"{endpoint}/{o.repo_id}", "calibration": o.calibration_text,
             "headline": f"{o.headline:.2f} ({o.headline_lang})" if o.headline is not None else "n/a"}
            for o in everyone if o.repo_id != me.repo_id and (o.base, o.method, o.recipe) == (me.base, me.method, me.recipe)
            and o.calibration != me.calibration]


def publish_sweep_collection(sweep_name: str, repo_ids: list[str], namespace: str, private: bool = True,
                             endpoint: str | None = None, title: str | None = None, leaderboard: str | None = None,
                             token: str | None = None, retry: RetryPolicy | None = None) -> CollectionResult:
    """Create or update the sweep's collection and link it from each card; what a sweep with ``push:`` does last.

    Args:
        sweep_name: the sweep's name (the title is made from it unless ``title`` is given).
        repo_ids: the repos the sweep pushed.
        namespace: the user or organization that owns the collection.
        private: create the collection private (an existing one keeps its visibility).
        endpoint: the Hub URL (default ``$HF_ENDPOINT``, else the public Hub).
        title: the collection's title (at most 60 characters); without one, the collection that already holds the
            first repo is updated, else one titled after the sweep is created.
        leaderboard: the Space id the sweep's report is published to (``prunekit report --push``): cards link it.
        token, retry: the token and the retry policy.
    Returns:
        The collection and what changed: items added, notes updated, cards updated (one commit each).
    Raises:
        ConfigError: an invalid namespace, title or repo id.
        HubError: offline mode, no token, or a Hub that refused or kept failing.
    """
    from huggingface_hub import CommitOperationAdd

    explicit_title = bool(title)
    title = (title or default_title(sweep_name)).strip()
    if not title or len(title) > TITLE_MAX:
        raise ConfigError(f"the collection title '{title}' must have 1 to {TITLE_MAX} characters; shorten push.collection")
    namespace, endpoint = validate_namespace(namespace), resolve_endpoint(endpoint)
    repo_ids = [validate_repo_id(r) for r in dict.fromkeys(repo_ids)]
    leaderboard = validate_repo_id(leaderboard) if leaderboard else None
    api, token = hub_api(f"publishing the collection '{title}'", endpoint, token, offline_hint="unset HF_HUB_OFFLINE to publish")

    def call(what: str, fn, repo_id: str = namespace):
        return hub_call(what, fn, repo_id=repo_id, endpoint=endpoint, token=token, retry=retry)

    # each repo read directly (the Hub's search listing can lag behind a push made a moment ago)
    published = [published_from_info(call(f"reading {repo_id}", lambda repo_id=repo_id: api.model_info(
        repo_id, expand=["cardData", "sha"]), repo_id)) for repo_id in repo_ids]
    holding = None if explicit_title else next(iter(call(
        f"looking for the collection of {repo_ids[0]}", lambda: list(api.list_collections(
            owner=namespace, item=f"models/{repo_ids[0]}", limit=1)))), None) if repo_ids else None
    if holding is not None:  # the sweep's collection already exists (under whatever title it was given)
        collection = call(f"reading the collection {holding.slug}", lambda: api.get_collection(holding.slug))
        title = collection.title
    else:
        collection = call(f"creating the collection '{title}'", lambda: api.create_collection(
            title, namespace=namespace, private=private, exists_ok=True,
            description=f"Checkpoints of the prunekit sweep '{sweep_name}': one per method, pattern and calibration set."))
    result = CollectionResult(collection.slug, collection.url, title, [])
    present = {item.item_id: item for item in collection.items if item.item_type == "model"}
    for item in published:
        note, existing = item.note(), present.get(item.repo_id)
        if existing is None:
            call(f"adding {item.repo_id} to {collection.slug}", lambda: api.add_collection_item(
                collection.slug, item.repo_id, "model", note=note, exists_ok=True))
            result.added.append(item.repo_id)
        elif existing.note != note:
            call(f"updating the note of {item.repo_id}", lambda: api.update_collection_item(
                collection.slug, existing.item_object_id, note=note))
            result.notes_updated.append(item.repo_id)
        result.items.append(item.repo_id)
    space = {"id": leaderboard, "url": f"{endpoint}/spaces/{leaderboard}"} if leaderboard else None
    if leaderboard and not any(i.item_type == "space" and i.item_id == leaderboard for i in collection.items):
        try:  # the Space exists once `prunekit report --push` has run; until then the cards link it only
            call(f"adding the Space {leaderboard} to {collection.slug}", lambda: api.add_collection_item(
                collection.slug, leaderboard, "space", note="The sweep's leaderboard", exists_ok=True), leaderboard)
            result.added.append(leaderboard)
        except (ModelError, HubError):
            pass
    for item in published:
        path = call(f"reading {item.repo_id}'s card", lambda: api.hf_hub_download(
            item.repo_id, CARD_FILE, revision=item.sha), item.repo_id)
        card = Path(path).read_text(encoding="utf-8")
        siblings = _siblings(item, published, endpoint)
        updated = with_related_section(card, title=title, count=len(published), collection_url=collection.url,
                                       leaderboard=space, recipe=f"{item.method} {item.recipe}", siblings=siblings)
        if updated == card:
            continue
        validate_model_card(updated)
        call(f"linking the collection from {item.repo_id}'s card", lambda: api.create_commit(
            item.repo_id, [CommitOperationAdd(CARD_FILE, updated.encode())],
            commit_message="prunekit: link the sweep's collection and sibling checkpoints"), item.repo_id)
        result.cards_updated.append(item.repo_id)
    return result
