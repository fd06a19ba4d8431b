"""Jinja2 templates for prunekit's Hub cards (package data; rendered by :mod:`prunekit.hub`).

- ``model_card.md.j2``: the README.md of one pruned checkpoint's repo.
- ``serving.md.j2``: how a checkpoint is stored and served (included by the model card).
- ``related.md.j2``: the section a sweep adds to each of its cards once they are all pushed: the sweep's
  collection, its leaderboard Space when known, and the sibling checkpoints.

``README.md`` here documents the tags and metadata prunekit writes into a card and what ``prunekit find`` reads.
"""

from importlib import resources

MODEL_CARD = "model_card.md.j2"
RELATED = "related.md.j2"


def template_text(name: str) -> str:
    """The source of one template shipped in this package."""
    return resources.files(__name__).joinpath(name).read_text(encoding="utf-8")
