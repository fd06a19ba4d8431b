"""Publish pruned checkpoints to the Hugging Face Hub and fetch them back, on huggingface_hub's own primitives:
:mod:`~prunekit.hub.names` (repo ids), :mod:`~prunekit.hub.card` (model cards, from ``hub_cards/*.j2``),
:mod:`~prunekit.hub.transfer` (:func:`push` to a :class:`PushTarget` with :class:`CardInputs`: one ``create_commit``; :func:`pull`: the download path every Hub id
takes, :func:`prunekit.remote.download_snapshot`), :mod:`~prunekit.hub.find` (:func:`find_checkpoints`,
:func:`pull_best`: published checkpoints ranked for a language), :mod:`~prunekit.hub.collection` (a sweep's
collection, linked from its cards) and :mod:`~prunekit.hub.space` (the leaderboard as a static Space). The endpoint is ``endpoint=`` / ``--endpoint``, else
``$HF_ENDPOINT`` read at call time, else the public Hub."""

from prunekit.hub.card import (CardContent, base_model_metadata, build_card_content,
                               render_model_card, validate_model_card)
from prunekit.hub.collection import CollectionResult, publish_sweep_collection
from prunekit.hub.find import BestPull, FindResult, FoundCheckpoint, find_checkpoints, pull_best
from prunekit.hub.names import base_model_name, default_repo_id, validate_namespace, validate_repo_id
from prunekit.hub.transfer import (LINK_MIN_BYTES, CardInputs, FileStatus, PullResult, PushPlan, PushResult, PushTarget,
                                   file_status, prepare_push, pull, push, stage_folder)
from prunekit.hub.space import SpaceResult, push_report_space
from prunekit.remote import RetryPolicy, hub_call, resolve_endpoint

__all__ = ["BestPull", "CardContent", "CardInputs", "PushTarget", "CollectionResult", "FileStatus", "FindResult", "FoundCheckpoint",
           "SpaceResult", "find_checkpoints", "publish_sweep_collection", "pull_best", "push_report_space", "LINK_MIN_BYTES", "PullResult", "PushPlan", "PushResult", "RetryPolicy",
           "base_model_metadata", "base_model_name", "build_card_content", "default_repo_id", "file_status", "hub_call",
           "prepare_push", "pull", "push", "render_model_card", "resolve_endpoint",
           "stage_folder", "validate_model_card", "validate_namespace", "validate_repo_id"]
