"""A small Hugging Face Hub on 127.0.0.1 for tests: the routes huggingface_hub's client calls.

It is a real HTTP server (stdlib ``ThreadingHTTPServer`` in a thread), so the client under test
runs its own code end to end: httpx, headers, NDJSON commits, the download cache. It stores
regular (non-LFS) files only: preupload always answers ``"regular"`` and returns the git-blob oid
of the file already stored at that path, so an unchanged file is recognised as such.

Test controls: ``hub.valid_tokens`` (writes need one of them), ``hub.fail(route, status, times)``
(answer the next ``times`` requests of a route with ``status``; ``status=0`` drops the connection),
``hub.requests`` (method, route, path, authorization header) and ``hub.commit_log``.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

import yaml


def git_blob_oid(data: bytes) -> str:
    """The git object id of a blob: sha1 over ``blob <size>\\0`` + content."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class Commit:
    oid: str
    parent: str | None
    summary: str
    files: dict[str, bytes]


@dataclass
class Repo:
    repo_id: str
    private: bool
    commits: dict[str, Commit] = field(default_factory=dict)
    refs: dict[str, str] = field(default_factory=dict)

    def resolve(self, revision: str) -> Commit | None:
        if revision in self.refs:
            return self.commits[self.refs[revision]]
        return self.commits.get(revision)


def _commit_oid(parent: str | None, summary: str, files: dict[str, bytes]) -> str:
    tree = json.dumps({path: git_blob_oid(data) for path, data in sorted(files.items())})
    return hashlib.sha1(f"{parent}\n{summary}\n{tree}".encode()).hexdigest()


ROUTES = [  # (route name, HTTP methods, regex over the raw path)
    ("whoami", {"GET"}, re.compile(r"^/api/whoami-v2$")),
    ("create", {"POST"}, re.compile(r"^/api/repos/create$")),
    ("validate-yaml", {"POST"}, re.compile(r"^/api/validate-yaml$")),
    ("preupload", {"POST"}, re.compile(r"^/api/models/([^/]+)/([^/]+)/preupload/([^/]+)$")),
    ("commit", {"POST"}, re.compile(r"^/api/models/([^/]+)/([^/]+)/commit/([^/]+)$")),
    ("branch", {"POST"}, re.compile(r"^/api/models/([^/]+)/([^/]+)/branch/([^/]+)$")),
    ("paths-info", {"POST"}, re.compile(r"^/api/models/([^/]+)/([^/]+)/paths-info/([^/]+)$")),
    ("tree", {"GET"}, re.compile(r"^/api/models/([^/]+)/([^/]+)/tree/([^/]+)(?:/(.*))?$")),
    ("info", {"GET"}, re.compile(r"^/api/models/([^/]+)/([^/]+)(?:/revision/([^/]+))?$")),
    ("resolve", {"GET", "HEAD"}, re.compile(r"^/([^/]+)/([^/]+)/resolve/([^/]+)/(.+)$")),
]


class FakeHub:
    """State and behaviour of the loopback Hub; ``start()`` serves it on an ephemeral port."""

    def __init__(self, user: str = "prunekit-tester", valid_tokens: set[str] | None = None):
        self.user = user
        self.valid_tokens = set(valid_tokens or ())
        self.repos: dict[str, Repo] = {}
        self.requests: list[tuple[str, str, str, str | None]] = []
        self.commit_log: list[tuple[str, str, list[str]]] = []  # (repo_id, commit oid, paths added/deleted)
        self._failures: dict[str, list[int]] = {}
        self.lock = threading.RLock()
        self.server: ThreadingHTTPServer | None = None
        self.thread: threading.Thread | None = None

    # ---- control -------------------------------------------------------------------------------
    @property
    def url(self) -> str:
        assert self.server is not None
        host, port = self.server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> "FakeHub":
        hub = self

        class Handler(_Handler):
            fake = hub

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05},
                                       name="fake-hub", daemon=True)
        self.thread.start()
        return self

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None

    def fail(self, route: str, status: int, times: int) -> None:
        """Answer the next ``times`` requests of ``route`` with ``status`` (0: drop the connection)."""
        with self.lock:
            self._failures.setdefault(route, []).extend([status] * times)

    def count(self, route: str) -> int:
        return sum(1 for r in self.requests if r[1] == route)

    def head(self, repo_id: str, revision: str = "main") -> str:
        return self.repos[repo_id].refs[revision]

    def files(self, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        repo = self.repos[repo_id]
        commit = repo.resolve(revision)
        assert commit is not None, revision
        return dict(commit.files)

    # ---- request helpers ------------------------------------------------------------------------
    def authorized(self, auth: str | None) -> bool:
        return auth is not None and auth.startswith("Bearer ") and auth[len("Bearer "):] in self.valid_tokens

    def take_failure(self, route: str) -> int | None:
        with self.lock:
            queue = self._failures.get(route)
            return queue.pop(0) if queue else None


class _Handler(BaseHTTPRequestHandler):
    fake: FakeHub
    protocol_version = "HTTP/1.0"  # one request per connection: no stale keep-alive between tests

    def log_message(self, format, *args):  # noqa: A002 - silence the default stderr log
        pass

    # ---- plumbing -----------------------------------------------------------------------------
    def _body(self) -> bytes:
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _send(self, status: int, payload=None, headers: dict[str, str] | None = None, raw: bytes | None = None,
              head: bool = False) -> None:
        data = raw if raw is not None else json.dumps(payload if payload is not None else {}).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/octet-stream" if raw is not None else "application/json")
        self.send_header("Content-Length", str(len(data)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        if not head:
            self.wfile.write(data)

    def _error(self, status: int, message: str, code: str | None = None, head: bool = False) -> None:
        self._send(status, {"error": message}, {"X-Error-Code": code, "X-Error-Message": message} if code else None,
                   head=head)

    def _dispatch(self, method: str) -> None:
        raw_path = urlsplit(self.path).path
        for name, methods, regex in ROUTES:
            match = regex.match(raw_path)
            if match and method in methods:
                break
        else:
            self._body()
            self._error(404, f"no route for {method} {raw_path}")
            return
        auth = self.headers.get("Authorization")
        hub = self.fake
        with hub.lock:
            hub.requests.append((method, name, self.path, auth))
        failure = hub.take_failure(name)
        if failure is not None:
            self._body()
            if failure == 0:
                self.close_connection = True
                self.connection.close()
                return
            self._send(failure, {"error": f"injected {failure}"}, {"Retry-After": "0"}, head=method == "HEAD")
            return
        if auth is not None and not hub.authorized(auth):
            self._body()
            self._error(401, "Invalid credentials in Authorization header", head=method == "HEAD")
            return
        groups = [unquote(g) if g is not None else None for g in match.groups()]
        getattr(self, "route_" + name.replace("-", "_"))(groups, method)

    def do_GET(self):  # noqa: N802
        self._dispatch("GET")

    def do_HEAD(self):  # noqa: N802
        self._dispatch("HEAD")

    def do_POST(self):  # noqa: N802
        self._dispatch("POST")

    def _repo(self, ns: str, name: str, write: bool, head: bool = False) -> Repo | None:
        hub = self.fake
        if write and not hub.authorized(self.headers.get("Authorization")):
            self._error(401, "You must be authenticated to write", head=head)
            return None
        repo = hub.repos.get(f"{ns}/{name}")
        if repo is None or (repo.private and not hub.authorized(self.headers.get("Authorization"))):
            self._error(404, "Repository not found", "RepoNotFound", head=head)
            return None
        return repo

    def _commit_at(self, repo: Repo, revision: str, head: bool = False) -> Commit | None:
        commit = repo.resolve(revision)
        if commit is None:
            self._error(404, f"Invalid rev id: {revision}", "RevisionNotFound", head=head)
        return commit

    # ---- routes -------------------------------------------------------------------------------
    def route_whoami(self, groups, method):
        if not self.fake.authorized(self.headers.get("Authorization")):
            self._error(401, "Invalid user token.")
            return
        self._send(200, {"type": "user", "name": self.fake.user, "orgs": [],
                         "auth": {"type": "access_token", "accessToken": {"displayName": "test", "role": "write"}}})

    def route_create(self, groups, method):
        body = json.loads(self._body() or b"{}")
        hub = self.fake
        if not hub.authorized(self.headers.get("Authorization")):
            self._error(401, "You must be authenticated to create a repository")
            return
        namespace = body.get("organization") or hub.user
        repo_id = f"{namespace}/{body['name']}"
        url = f"{hub.url}/{repo_id}"
        with hub.lock:
            if repo_id in hub.repos:
                self._send(409, {"error": "You already created this model repo", "url": url})
                return
            private = bool(body.get("private")) or body.get("visibility") == "private"
            repo = Repo(repo_id, private)
            initial = {".gitattributes": b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"}
            oid = _commit_oid(None, "initial commit", initial)
            repo.commits[oid] = Commit(oid, None, "initial commit", initial)
            repo.refs["main"] = oid
            hub.repos[repo_id] = repo
        self._send(200, {"url": url, "name": repo_id})

    def route_validate_yaml(self, groups, method):
        body = json.loads(self._body() or b"{}")
        front = re.match(r"^---\s*\n(.*?)\n---\s*(\n|$)", body.get("content", ""), re.DOTALL)
        try:
            meta = yaml.safe_load(front.group(1)) if front else None
        except yaml.YAMLError as err:
            self._send(400, {"errors": [{"message": f"invalid YAML: {err}"}], "warnings": []})
            return
        if meta is not None and not isinstance(meta, dict):
            self._send(400, {"errors": [{"message": "metadata must be a mapping"}], "warnings": []})
            return
        self._send(200, {"errors": [], "warnings": []})

    def route_preupload(self, groups, method):
        ns, name, revision = groups
        body = json.loads(self._body() or b"{}")
        repo = self._repo(ns, name, write=True)
        if repo is None:
            return
        commit = repo.resolve(revision)
        stored = commit.files if commit is not None else {}
        files = []
        for item in body.get("files", []):
            path = item["path"]
            oid = git_blob_oid(stored[path]) if path in stored else None
            files.append({"path": path, "uploadMode": "regular", "shouldIgnore": False, "oid": oid})
        self._send(200, {"files": files})

    def route_commit(self, groups, method):
        ns, name, revision = groups
        body = self._body()
        repo = self._repo(ns, name, write=True)
        if repo is None:
            return
        lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
        header = next((line["value"] for line in lines if line["key"] == "header"), {})
        hub = self.fake
        with hub.lock:
            parent = repo.resolve(revision)
            if parent is None:
                self._error(404, f"Invalid rev id: {revision}", "RevisionNotFound")
                return
            files = dict(parent.files)
            touched = []
            for line in lines:
                key, value = line["key"], line["value"]
                if key == "file":
                    if value.get("encoding") != "base64":
                        self._error(400, "only base64 file content is supported")
                        return
                    files[value["path"]] = base64.b64decode(value["content"])
                    touched.append(value["path"])
                elif key == "deletedFile":
                    files.pop(value["path"], None)
                    touched.append(value["path"])
                elif key in ("lfsFile", "deletedFolder", "copyFile"):
                    self._error(400, f"this test hub does not support '{key}' operations")
                    return
            if files == parent.files:  # nothing changed: answer the current head, make no commit
                oid = parent.oid
            else:
                oid = _commit_oid(parent.oid, header.get("summary", ""), files)
                repo.commits[oid] = Commit(oid, parent.oid, header.get("summary", ""), files)
                repo.refs[revision] = oid
                hub.commit_log.append((repo.repo_id, oid, touched))
        self._send(200, {"commitOid": oid, "commitUrl": f"{hub.url}/{repo.repo_id}/commit/{oid}",
                         "pullRequestUrl": None})

    def route_branch(self, groups, method):
        ns, name, branch = groups
        body = json.loads(self._body() or b"{}")
        repo = self._repo(ns, name, write=True)
        if repo is None:
            return
        with self.fake.lock:
            if branch in repo.refs:
                self._error(409, "Reference already exists")
                return
            start = repo.resolve(body.get("startingPoint") or "main")
            if start is None:
                self._error(404, "starting point not found", "RevisionNotFound")
                return
            repo.refs[branch] = start.oid
        self._send(200, {})

    def _entries(self, commit: Commit, paths: list[str] | None = None) -> list[dict]:
        return [
            {"type": "file", "path": path, "size": len(data), "oid": git_blob_oid(data)}
            for path, data in sorted(commit.files.items())
            if paths is None or path in paths
        ]

    def route_paths_info(self, groups, method):
        ns, name, revision = groups
        form = parse_qs(self._body().decode())
        repo = self._repo(ns, name, write=False)
        if repo is None:
            return
        commit = self._commit_at(repo, revision)
        if commit is not None:
            self._send(200, self._entries(commit, form.get("paths", [])))

    def route_tree(self, groups, method):
        ns, name, revision, prefix = groups
        repo = self._repo(ns, name, write=False)
        if repo is None:
            return
        commit = self._commit_at(repo, revision)
        if commit is None:
            return
        query = parse_qs(urlsplit(self.path).query)
        recursive = query.get("recursive", ["false"])[0].lower() == "true"
        prefix = (prefix or "").strip("/")
        entries, folders = [], set()
        for entry in self._entries(commit):
            path = entry["path"]
            if prefix and not path.startswith(prefix + "/"):
                continue
            rest = path[len(prefix) + 1:] if prefix else path
            if "/" in rest and not recursive:
                folder = (prefix + "/" if prefix else "") + rest.split("/", 1)[0]
                if folder not in folders:
                    folders.add(folder)
                    entries.append({"type": "directory", "path": folder, "oid": hashlib.sha1(folder.encode()).hexdigest()})
                continue
            entries.append(entry)
        if prefix and not entries:
            self._error(404, f"{prefix} does not exist", "EntryNotFound")
            return
        self._send(200, entries)

    def route_info(self, groups, method):
        ns, name, revision = groups
        repo = self._repo(ns, name, write=False)
        if repo is None:
            return
        commit = self._commit_at(repo, revision or "main")
        if commit is None:
            return
        self._send(200, {
            "_id": repo.repo_id, "id": repo.repo_id, "modelId": repo.repo_id, "author": ns,
            "sha": commit.oid, "private": repo.private, "disabled": False, "gated": False,
            "tags": [], "siblings": [{"rfilename": path} for path in sorted(commit.files)],
        })

    def route_resolve(self, groups, method):
        ns, name, revision, path = groups
        head = method == "HEAD"
        repo = self._repo(ns, name, write=False, head=head)
        if repo is None:
            return
        commit = self._commit_at(repo, revision, head=head)
        if commit is None:
            return
        if path not in commit.files:
            self._error(404, f"Entry not found: {path}", "EntryNotFound", head=head)
            return
        data = commit.files[path]
        self._send(200, raw=data, head=head,
                   headers={"X-Repo-Commit": commit.oid, "ETag": f'"{git_blob_oid(data)}"'})


# ---- shared by the hub tests: a results.json written by hand (the evaluation schema) --------------------

def example_results(record: dict | None, *, dense: bool = False, model_path: str = "ckpt") -> dict:
    """A ``prunekit-results`` artefact with every section filled, numbers chosen to be easy to find in a card.

    ``dense=True`` gives the dense base model's results (no record, no hidden states: those are relative).
    """
    import math

    shift = 0.0 if dense else 1.0
    ppl = {"de": 41.2375 + 17.3 * shift, "en": 63.5819 + 9.1 * shift}
    results = {
        "kind": "prunekit-results",
        "schema_version": "1.0",
        "prunekit_version": "0.1.0",
        "model": {"spec": model_path, "path": model_path, "revision": None, "kind": "local",
                  "record": None if dense else record},
        "dense": None if dense else {"spec": "dense-base", "revision": None},
        "languages": ["de", "en"],
        "perplexity": {
            lang: {"ppl": value, "nll": math.log(value), "tokens": 4096 + i, "windows": 16, "seqlen": 256,
                   "source": "embedded", "location": f"prunekit/embedded/texts/{lang}.txt"}
            for i, (lang, value) in enumerate(ppl.items())
        },
        "hidden_states": {} if dense else {
            "de": {"snr_db": 14.8126, "pruning_error": 0.033047, "tokens": 4096, "exclude_bos": True,
                   "per_layer": {"snr_db": [31.4159, 22.7182, 14.8126], "pruning_error": [0.000722, 0.005347, 0.033047]}},
            "en": {"snr_db": 11.2468, "pruning_error": 0.075079, "tokens": 4097, "exclude_bos": True,
                   "per_layer": {"snr_db": [29.9792, 18.3571, 11.2468], "pruning_error": [0.001005, 0.014602, 0.075079]}},
        },
        "tasks": {
            "belebele_deu_Latn": {
                "group": "belebele", "language": "de", "status": "ok", "note": "",
                "metrics": {"acc": 0.3122 + 0.05 * (1 - shift), "acc_norm": 0.3345 + 0.04 * (1 - shift)},
                "stderr": {"acc": 0.015443, "acc_norm": 0.015734}, "samples": 900,
            },
            "arc_de": {
                "group": "arc", "language": "de", "status": "ok", "note": "",
                "metrics": {"acc": 0.2478 + 0.03 * (1 - shift)}, "stderr": {"acc": 0.012619}, "samples": 1171,
            },
            "arc_sw": {"group": "arc", "language": "sw", "status": "n/a",
                       "note": "Okapi ARC has no Swahili", "metrics": {}, "stderr": {}, "samples": 0},
        },
        "settings": {"seqlen": 256, "batch_size": 8, "num_fewshot": 0, "limit": 250},
        "versions": {"prunekit": "0.1.0", "lm_eval": "0.4.13"},
        "created": "2026-01-02T03:04:05+00:00",
    }
    return results
