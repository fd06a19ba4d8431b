"""The Hub connection that model resolution (models) and publishing (hub) share: the endpoint, the token,
one error message per failure, retries, and the one download path (:func:`download_snapshot`).

huggingface_hub retries its own listings, pre-upload checks and file transfers (``http_backoff``). The calls
it makes once (repo info, create_repo, create_branch, the commit) are retried here, on the status codes and
network errors that ``http_backoff`` retries by default, except an endpoint that cannot be reached at all
(connection refused, no route, a name that does not resolve), which fails at once naming it: ``PRUNEKIT_HUB_RETRIES`` attempts (default 5), the
first delay ``PRUNEKIT_HUB_BACKOFF`` seconds (default 1), doubling. The token is never printed or written.
"""

from __future__ import annotations

import inspect
import logging
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, TypeVar

from prunekit.artifacts import CHECKPOINT_PATTERNS
from prunekit.errors import ConfigError, HubError, ModelError, PrunekitError

log = logging.getLogger("prunekit.remote")
T = TypeVar("T")
LOGIN_HINT = ("log in with `hf auth login` or set HF_TOKEN (tokens: https://huggingface.co/settings/tokens; "
              "pushing needs write access)")
OFFLINE_HINT = "unset HF_HUB_OFFLINE to reach it, or give commands the copy you already have (a local directory)"


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how patiently a Hub call that failed transiently is tried again."""

    attempts: int = 5
    backoff_s: float = 1.0
    max_backoff_s: float = 30.0

    @classmethod
    def from_env(cls) -> "RetryPolicy":
        """The policy of ``PRUNEKIT_HUB_RETRIES`` (attempts) and ``PRUNEKIT_HUB_BACKOFF`` (first delay, seconds).

        Raises:
            ConfigError: a value is not a number.
        """
        try:
            return cls(int(os.environ.get("PRUNEKIT_HUB_RETRIES", 5)), float(os.environ.get("PRUNEKIT_HUB_BACKOFF", 1.0)))
        except ValueError as err:
            raise ConfigError(f"PRUNEKIT_HUB_RETRIES / PRUNEKIT_HUB_BACKOFF must be numbers ({err})") from None

    def delay(self, attempt: int) -> float:
        return min(self.backoff_s * 2 ** (attempt - 1), self.max_backoff_s)


def resolve_endpoint(endpoint: str | None = None) -> str:
    """The Hub URL to talk to.

    Args:
        endpoint: a URL; None reads ``$HF_ENDPOINT`` now (huggingface_hub reads it only at import), else the public Hub.
    Returns:
        The URL without a trailing slash.
    Raises:
        ConfigError: it is not an http(s) URL.
    """
    value = endpoint or os.environ.get("HF_ENDPOINT") or "https://huggingface.co"
    if not re.match(r"^https?://[^\s/]+", value):
        raise ConfigError(f"invalid Hub endpoint '{value}' (--endpoint or HF_ENDPOINT): give a URL such as https://huggingface.co")
    return value.rstrip("/")


def get_token(token: str | None = None) -> str | None:
    """The Hub token to use; never printed or written.

    Args:
        token: a token given explicitly.
    Returns:
        ``token``, else huggingface_hub's own (``$HF_TOKEN``, or what ``hf auth login`` saved), else None.
    """
    from huggingface_hub import get_token as saved_token

    return token or saved_token()


def is_offline() -> bool:
    """Returns:
        Whether huggingface_hub's offline mode (``HF_HUB_OFFLINE=1``) is on.
    """
    from huggingface_hub import constants

    return constants.is_offline_mode() if hasattr(constants, "is_offline_mode") else bool(constants.HF_HUB_OFFLINE)


def offline_error(what: str, endpoint: str, hint: str = OFFLINE_HINT) -> HubError:
    """The error for a request that offline mode forbids (nothing to retry).

    Args:
        what: the action ("pushing org/x"); endpoint: the Hub URL; hint: what to do instead.
    Returns:
        The error, to raise.
    """
    return HubError(f"offline mode (HF_HUB_OFFLINE=1) is on, so {what} cannot reach the Hub at {endpoint}; {hint}")


def hub_api(what: str, endpoint: str, token: str | None = None, *, offline_hint: str = OFFLINE_HINT,
            requires_token: str | None = None):
    """(``HfApi`` for ``endpoint`` identifying prunekit, the token it uses), for a command about to call the Hub.

    Args:
        what: the action ("pushing org/x"), for the offline error; ``offline_hint``: what to do instead.
        requires_token: when the action needs a token, the end of "no Hub token found, so ..." (None: any).
    Raises:
        HubError: offline mode, or no token where one is required.
    """
    from huggingface_hub import HfApi

    from prunekit.version import __version__

    if is_offline():
        raise offline_error(what, endpoint, offline_hint)
    token = get_token(token)
    if requires_token is not None and not token:
        raise HubError(f"no Hub token found, so {requires_token}; {LOGIN_HINT}")
    return HfApi(endpoint=endpoint, token=token, library_name="prunekit", library_version=__version__), token


def check_reachable(endpoint: str, what: str, timeout_s: float = 3.0) -> None:
    """Fail fast when the Hub's host does not answer (connection refused, unknown host, no answer in ``timeout_s``):
    huggingface_hub's listings retry network errors on their own for about 20 s. Skipped behind a proxy.

    Raises:
        HubError: the host cannot be reached; says what to do.
    """
    import socket
    from urllib.parse import urlsplit

    if any(os.environ.get(k) for k in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY")):
        return
    parts = urlsplit(endpoint)
    try:
        socket.create_connection((parts.hostname, parts.port or (443 if parts.scheme == "https" else 80)), timeout_s).close()
    except OSError as err:  # the same error as hub_call's for an endpoint that cannot be reached
        reason = unreachable_reason(err) or (f"no answer in {timeout_s:g} s" if isinstance(err, TimeoutError)
                                             else err.strerror or type(err).__name__)
        raise unreachable_error(what, endpoint, reason) from None


def _chain(err: BaseException | None) -> Iterator[BaseException]:
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        yield err
        err = err.__cause__ or err.__context__


def _status(err: BaseException) -> int | None:
    statuses = (getattr(getattr(e, "response", None), "status_code", None) for e in _chain(err))
    return next((s for s in statuses if isinstance(s, int)), None)


UNREACHABLE_HINT = "check the network (a compute node may have none), or the endpoint: --endpoint or HF_ENDPOINT"


def unreachable_reason(err: BaseException) -> str | None:
    """Why the endpoint cannot be reached at all, when a retry cannot change it: the connection was refused,
    there is no route to it, or its name does not resolve (DNS). None for anything else (a timeout, a reset,
    an HTTP status), which may be transient."""
    import errno
    import socket

    for e in _chain(err):
        if isinstance(e, socket.gaierror):
            return f"its host name could not be resolved: {e.strerror or e}"
        if isinstance(e, ConnectionRefusedError) or (isinstance(e, OSError) and e.errno in (
                errno.ECONNREFUSED, errno.ENETUNREACH, errno.EHOSTUNREACH)):
            return {errno.ECONNREFUSED: "connection refused", errno.ENETUNREACH: "network unreachable",
                    errno.EHOSTUNREACH: "no route to host"}.get(e.errno, e.strerror or str(e))
    return None


def unreachable_error(what: str, endpoint: str, reason: str, cached: bool = False) -> HubError:
    """The error for a Hub that cannot be reached at all (not retried)."""
    nothing_cached = " and no copy is in the cache" if cached else ""
    return HubError(f"cannot reach the Hub at {endpoint} while {what} ({reason}){nothing_cached}; {UNREACHABLE_HINT}")


API_HINTS = re.compile(r"\s*Use `\w+` argument if needed\.?")


def strip_api_hints(text: str) -> str:
    """A huggingface_hub message without the hints meant for its Python API users ("Use `repo_type` argument")."""
    return API_HINTS.sub("", text)


def _transient(err: BaseException) -> bool:
    """What huggingface_hub's ``http_backoff`` retries by default: its status codes and network errors."""
    from huggingface_hub.utils import http_backoff

    defaults = inspect.signature(http_backoff).parameters
    codes, kinds = defaults["retry_on_status_codes"].default, defaults["retry_on_exceptions"].default
    status = _status(err)
    if status is not None:
        return status in ((codes,) if isinstance(codes, int) else codes)
    return any(isinstance(e, kinds) for e in _chain(err))


def _describe(err: BaseException, token: str | None) -> str:
    status, server = _status(err), getattr(err, "server_message", None)
    text = str(err).strip()
    text = f"{status} {server}".strip() if status and server else (text.splitlines()[0] if text else type(err).__name__)
    text = strip_api_hints(text)
    return text.replace(token, "hf_***") if token else text


def hub_call(what: str, call: Callable[[], T], *, repo_id: str, endpoint: str, token: str | None = None,
             retry: RetryPolicy | None = None, revision: str | None = None) -> T:
    """Run one huggingface_hub call, retrying transient failures; turn every failure into a message that says what to do.

    Args:
        what: the action, for messages ("creating org/x").
        call: the call, without arguments.
        repo_id, endpoint, revision: named in the messages.
        token: the token in use, redacted from messages.
        retry: the retry policy (default: :meth:`RetryPolicy.from_env`).
    Returns:
        What ``call`` returns.
    Raises:
        ModelError: the repo or revision does not exist (or is private), or it could not be downloaded.
        HubError: offline mode, no or a rejected token, no permission, a Hub that kept failing or refused.
    """
    from huggingface_hub.errors import (HfHubHTTPError, LocalEntryNotFoundError, LocalTokenNotFoundError,
                                        OfflineModeIsEnabled, RepositoryNotFoundError, RevisionNotFoundError)

    retry = retry or RetryPolicy.from_env()
    attempt = 0
    while True:
        attempt += 1
        try:
            return call()
        except PrunekitError:
            raise
        except OfflineModeIsEnabled:  # a ConnectionError, but nothing a retry can fix
            raise offline_error(what, endpoint) from None
        except LocalTokenNotFoundError:
            raise HubError(f"not logged in to the Hub at {endpoint} while {what}; {LOGIN_HINT}") from None
        except RepositoryNotFoundError:
            raise ModelError(f"Hub repository '{repo_id}' was not found at {endpoint} (or it is private: {LOGIN_HINT})") from None
        except RevisionNotFoundError:
            raise ModelError(f"revision '{revision}' of '{repo_id}' was not found at {endpoint}") from None
        except Exception as err:  # noqa: BLE001 - classified below; anything unexpected is re-raised
            status = _status(err)
            if status == 401:
                raise HubError(f"the Hub at {endpoint} rejected the token while {what} (401 Unauthorized); {LOGIN_HINT}") from None
            if status == 403:
                raise HubError(
                    f"the token may not do this at {endpoint} while {what} (403 Forbidden): use a token with write access "
                    "to that namespace (https://huggingface.co/settings/tokens), or choose a --namespace you own"
                ) from None
            reason = unreachable_reason(err)
            if reason is not None:  # refused, no route, no DNS: the same on every retry
                if is_offline():
                    raise offline_error(what, endpoint) from None
                raise unreachable_error(what, endpoint, reason, cached=isinstance(err, LocalEntryNotFoundError)) from None
            if not _transient(err):
                if isinstance(err, LocalEntryNotFoundError):  # snapshot_download found neither the Hub nor a cached copy
                    if is_offline():
                        raise offline_error(what, endpoint) from None
                    raise ModelError(f"could not download '{repo_id}' from the Hub at {endpoint} ({_describe(err, token)}); "
                                     "check the id and your network, or pass a local model directory") from None
                if any(isinstance(e, HfHubHTTPError) for e in _chain(err)):
                    raise HubError(f"the Hub at {endpoint} refused {what}: {_describe(err, token)}") from None
                raise
            if attempt >= retry.attempts:
                raise HubError(f"the Hub at {endpoint} kept failing while {what} ({_describe(err, token)}; "
                               f"{attempt} attempts); try again later") from None
            log.warning("transient Hub error while %s (%s); retrying in %.2g s (attempt %d of %d)",
                        what, _describe(err, token), retry.delay(attempt), attempt + 1, retry.attempts)
            time.sleep(retry.delay(attempt))


def download_snapshot(repo_id: str, revision: str | None = None, *, local_dir: str | Path | None = None,
                      cache_dir: str | Path | None = None, endpoint: str | None = None, token: str | None = None,
                      retry: RetryPolicy | None = None) -> tuple[Path, str]:
    """Download a checkpoint repo's files (:data:`prunekit.artifacts.CHECKPOINT_PATTERNS`): the one download path
    of ``prunekit pull`` and of every command given a Hub id.

    Into the Hub cache, a copy already cached is used when the Hub cannot be reached or offline mode is on.

    Args:
        repo_id: ``namespace/name``.
        revision: a branch, tag or commit (default main).
        local_dir: download into this directory instead of the cache.
        cache_dir: the Hub cache to use (default huggingface_hub's).
        endpoint: the Hub URL (default ``$HF_ENDPOINT``, else the public Hub).
        token: the token (default huggingface_hub's own).
        retry: the retry policy (default :meth:`RetryPolicy.from_env`).
    Returns:
        (the local directory, the commit sha downloaded).
    Raises:
        ModelError: the repo or revision does not exist, or is private; or the Hub is unreachable and nothing is cached.
        HubError: offline mode with ``local_dir``, a rejected token, or a Hub that kept failing.
    """
    from huggingface_hub import HfApi, snapshot_download

    endpoint = resolve_endpoint(endpoint)
    token = get_token(token)
    context = dict(repo_id=repo_id, endpoint=endpoint, token=token, retry=retry, revision=revision)
    if local_dir is not None:  # a copy to keep: name the commit first, so that its files and the sha reported agree
        api = HfApi(endpoint=endpoint, token=token)
        revision = hub_call(f"reading {repo_id}", lambda: api.repo_info(repo_id, revision=revision).sha, **context)
    check_download_space(repo_id, revision, local_dir=local_dir, cache_dir=cache_dir, endpoint=endpoint, token=token)
    path = Path(hub_call(f"downloading {repo_id}", lambda: snapshot_download(
        repo_id, revision=revision, allow_patterns=list(CHECKPOINT_PATTERNS), local_dir=local_dir, cache_dir=cache_dir,
        endpoint=endpoint, token=token), **context))
    return path, str(revision) if local_dir is not None else path.name  # cache snapshots are named by commit


def free_bytes(path: Path) -> int:
    """Free bytes on the disk that holds ``path`` (or its nearest existing parent)."""
    import shutil

    path = Path(path).expanduser().absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return shutil.disk_usage(path).free


def check_download_space(repo_id: str, revision: str | None = None, *, local_dir: str | Path | None = None,
                         cache_dir: str | Path | None = None, endpoint: str | None = None,
                         token: str | None = None) -> None:
    """Before a download: does the disk it goes to have room for the checkpoint files not there yet (their sizes
    from the repository's file metadata)? Skipped when the Hub cannot say (the download then reports why, or
    uses a cached copy).

    Raises:
        ConfigError: the disk has less free space than the files still to download.
    """
    import fnmatch

    from huggingface_hub import constants, try_to_load_from_cache

    info = _files_info(repo_id, revision, endpoint, token)
    if info is None:
        return
    missing = 0
    for sibling in info.siblings or []:
        name, size = sibling.rfilename, sibling.size or 0
        if not any(fnmatch.fnmatch(name, pattern) for pattern in CHECKPOINT_PATTERNS):
            continue
        if local_dir is not None:
            there = Path(local_dir) / name
            missing += 0 if there.is_file() and there.stat().st_size == size else size
        else:
            cached = try_to_load_from_cache(repo_id, name, cache_dir=cache_dir, revision=info.sha)
            missing += 0 if isinstance(cached, str) else size
    target = Path(local_dir) if local_dir is not None else Path(cache_dir or constants.HF_HUB_CACHE)
    free = free_bytes(target)
    if missing > free:
        from prunekit.io import format_size

        where = "--out" if local_dir is not None else "the Hub cache (HF_HUB_CACHE or HF_HOME)"
        raise ConfigError(f"downloading '{repo_id}' needs about {format_size(missing)} more on the disk of '{target}', "
                          f"which has {format_size(free)} free; free some space or point {where} at a larger disk")


def repository_size(repo_id: str, itemsize: int | None = None, revision: str | None = None, *,
                    endpoint: str | None = None, token: str | None = None) -> int:
    """About how many bytes a checkpoint made from the Hub repo ``repo_id`` takes on disk, from the repository's
    file sizes (``model_info(files_metadata=True)``): its safetensors weights (or, with ``itemsize``, its
    safetensors parameter count × ``itemsize``: the weights saved in another dtype) plus its small files.
    0 when the Hub cannot say (offline, unreachable, not found, no safetensors metadata): the download that
    follows reports those."""
    import fnmatch

    info = _files_info(repo_id, revision, endpoint, token)
    if info is None:
        return 0
    files = [(s.rfilename, s.size or 0) for s in (info.siblings or [])
             if any(fnmatch.fnmatch(s.rfilename, pattern) for pattern in CHECKPOINT_PATTERNS)]
    weights = sum(size for name, size in files if name.endswith(".safetensors"))
    others = sum(size for name, size in files if not name.endswith((".safetensors", ".bin")))
    parameters = getattr(getattr(info, "safetensors", None), "total", None)
    if itemsize is not None and parameters:
        weights = int(parameters) * itemsize
    return weights + others


def _files_info(repo_id: str, revision: str | None, endpoint: str | None, token: str | None):
    """The repo's ``model_info`` with its files' sizes, in one try; None offline or when the Hub cannot say
    (an estimate: the download that follows names the problem)."""
    from huggingface_hub import HfApi

    if is_offline():
        return None
    try:
        endpoint = resolve_endpoint(endpoint)
        token = get_token(token)
        api = HfApi(endpoint=endpoint, token=token)
        return hub_call(f"reading {repo_id}", lambda: api.model_info(repo_id, revision=revision, files_metadata=True),
                        repo_id=repo_id, endpoint=endpoint, token=token, retry=RetryPolicy(attempts=1), revision=revision)
    except Exception:  # noqa: BLE001
        return None
