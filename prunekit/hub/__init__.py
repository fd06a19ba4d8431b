"""Publish pruned checkpoints to the Hugging Face Hub and fetch them back, on huggingface_hub's own primitives.

- :mod:`~prunekit.hub.names`: a run's default repo id (:func:`default_repo_id`) and the Hub's naming rules.
- :mod:`~prunekit.hub.card`: what the model card says, from ``prunekit.json`` and ``results.json``, row by row.
- :mod:`~prunekit.hub.render`: the card and a sweep's collection README as text (``hub_cards/*.j2``), validated
  with huggingface_hub's card classes.
- :mod:`~prunekit.hub.transfer`: :func:`push` (one ``create_commit``) and :func:`pull`
  (:func:`prunekit.remote.download_snapshot`, the download path every Hub id takes).

The endpoint is ``endpoint=`` / ``--endpoint``, else ``$HF_ENDPOINT`` read at call time, else the public Hub.
"""

from prunekit.hub.card import CardContent, base_model_metadata, build_card_content
from prunekit.hub.names import base_model_name, default_repo_id, validate_namespace, validate_repo_id
from prunekit.hub.render import render_collection_readme, render_model_card, validate_model_card
from prunekit.hub.transfer import (LINK_MIN_BYTES, FileStatus, PullResult, PushPlan, PushResult, checkpoint_files,
                                   file_status, prepare_push, pull, push, stage_folder)
from prunekit.remote import RetryPolicy, hub_call, resolve_endpoint

__all__ = [
    "CardContent", "FileStatus", "LINK_MIN_BYTES", "PullResult", "PushPlan", "PushResult", "RetryPolicy",
    "base_model_metadata", "base_model_name", "build_card_content", "checkpoint_files", "default_repo_id",
    "file_status", "hub_call", "prepare_push", "pull", "push", "render_collection_readme", "render_model_card",
    "resolve_endpoint", "stage_folder", "validate_model_card", "validate_namespace", "validate_repo_id",
]
