"""A small Hugging Face Hub on 127.0.0.1 for tests: the routes huggingface_hub's client calls.

It is a real HTTP server (stdlib ``ThreadingHTTPServer`` in a thread), so the client under test
runs its own code end to end: httpx, headers, NDJSON commits, the download cache. It stores
regular (non-LFS) files only: preupload always answers ``"regular"`` and returns the git-blob oid
of the file already stored at that path, so an unchanged file is recognised as such.

Besides repos, files and commits it serves what ``prunekit find`` and a sweep's publishing use: the model
listing (``list_models``: ``filter`` tags, ``author``, ``search``, ``limit``, and ``expand`` / ``full`` /
``cardData`` answered from each repo's README front matter), collections (create, get, add and update items)
and Space repositories (``repo_type="space"``: created, committed to, stored in ``hub.spaces``). Each GET of a
repo's ``config.json`` counts as one download, as on the Hub.

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
import time
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
    kind: str = "model"  # "model" or "space"
    downloads: int = 0
    last_modified: str = ""

    def resolve(self, revision: str) -> Commit | None:
        if revision in self.refs:
            return self.commits[self.refs[revision]]
        return self.commits.get(revision)


def _commit_oid(parent: str | None, summary: str, files: dict[str, bytes]) -> str:
    tree = json.dumps({path: git_blob_oid(data) for path, data in sorted(files.items())})
    return hashlib.sha1(f"{parent}\n{summary}\n{tree}".encode()).hexdigest()


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime())


def front_matter(readme: bytes | None) -> dict:
    """A README's YAML front matter (what the Hub serves as ``cardData``); {} without one."""
    match = re.match(r"^---\s*\n(.*?)\n---\s*(\n|$)", (readme or b"").decode("utf-8", "replace"), re.DOTALL)
    try:
        meta = yaml.safe_load(match.group(1)) if match else None
    except yaml.YAMLError:
        return {}
    return meta if isinstance(meta, dict) else {}


@dataclass
class Collection:
    slug: str
    title: str
    namespace: str
    private: bool
    description: str | None = None
    items: list[dict] = field(default_factory=list)  # {"_id", "id", "type", "position", "note"}
    last_updated: str = ""

    def to_json(self) -> dict:
        return {"slug": self.slug, "title": self.title, "owner": {"name": self.namespace, "type": "user"},
                "items": [dict(item) for item in self.items], "lastUpdated": self.last_updated or _now(),
                "position": 0, "private": self.private, "theme": "blue", "upvotes": 0,
                "description": self.description}


ROUTES = [  # (route name, HTTP methods, regex over the raw path)
    ("whoami", {"GET"}, re.compile(r"^/api/whoami-v2$")),
    ("create", {"POST"}, re.compile(r"^/api/repos/create$")),
    ("validate-yaml", {"POST"}, re.compile(r"^/api/validate-yaml$")),
    ("list-models", {"GET"}, re.compile(r"^/api/models$")),
    ("collections", {"POST"}, re.compile(r"^/api/collections$")),
    ("list-collections", {"GET"}, re.compile(r"^/api/collections$")),
    ("collection", {"GET"}, re.compile(r"^/api/collections/([^/]+/[^/]+)$")),
    ("collection-items", {"POST"}, re.compile(r"^/api/collections/([^/]+/[^/]+)/items$")),
    ("collection-item", {"PATCH"}, re.compile(r"^/api/collections/([^/]+/[^/]+)/items/([^/]+)$")),
    ("preupload", {"POST"}, re.compile(r"^/api/(?:models|spaces)/([^/]+)/([^/]+)/preupload/([^/]+)$")),
    ("commit", {"POST"}, re.compile(r"^/api/(?:models|spaces)/([^/]+)/([^/]+)/commit/([^/]+)$")),
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
        self.spaces: dict[str, Repo] = {}
        self.collections: dict[str, Collection] = {}
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

    def do_PATCH(self):  # noqa: N802
        self._dispatch("PATCH")

    def _repo(self, ns: str, name: str, write: bool, head: bool = False) -> Repo | None:
        hub = self.fake
        if write and not hub.authorized(self.headers.get("Authorization")):
            self._error(401, "You must be authenticated to write", head=head)
            return None
        store = hub.spaces if urlsplit(self.path).path.startswith(("/api/spaces/", "/spaces/")) else hub.repos
        repo = store.get(f"{ns}/{name}")
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
        kind = body.get("type") or "model"
        if kind not in ("model", "space"):
            self._error(400, f"this test hub does not support {kind} repositories")
            return
        if kind == "space" and body.get("sdk") not in ("static", "gradio", "docker", "streamlit"):
            self._error(400, "a Space needs an sdk: static, gradio, docker or streamlit")
            return
        store = hub.spaces if kind == "space" else hub.repos
        url = f"{hub.url}/{'spaces/' if kind == 'space' else ''}{repo_id}"
        with hub.lock:
            if repo_id in store:
                self._send(409, {"error": f"You already created this {kind} repo", "url": url})
                return
            private = bool(body.get("private")) or body.get("visibility") == "private"
            repo = Repo(repo_id, private, kind=kind, last_modified=_now())
            initial = {".gitattributes": b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"}
            oid = _commit_oid(None, "initial commit", initial)
            repo.commits[oid] = Commit(oid, None, "initial commit", initial)
            repo.refs["main"] = oid
            store[repo_id] = repo
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
                repo.last_modified = _now()
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
        expand = parse_qs(urlsplit(self.path).query).get("expand")
        if expand:  # only what was asked for, as the Hub answers
            self._send(200, self._model_json(repo, commit, expand, True))
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
        if path == "config.json" and not head:  # the Hub counts a model's downloads by its config.json
            with self.fake.lock:
                repo.downloads += 1
        self._send(200, raw=data, head=head,
                   headers={"X-Repo-Commit": commit.oid, "ETag": f'"{git_blob_oid(data)}"'})

    # ---- model listing ---------------------------------------------------------------------------
    def _model_json(self, repo: Repo, commit: Commit, expand: list[str] | None, card: bool) -> dict:
        meta = front_matter(commit.files.get("README.md"))
        tags = [str(t) for t in meta.get("tags") or []]
        tags += [meta["library_name"]] if meta.get("library_name") else []
        languages = meta.get("language") or []
        tags += [str(c) for c in (languages if isinstance(languages, list) else [languages])]
        bases = meta.get("base_model") or []
        for base in bases if isinstance(bases, list) else [bases]:  # the Hub derives these from base_model
            tags += [f"base_model:{base}", f"base_model:finetune:{base}"]
        tags += [f"license:{meta['license']}"] if meta.get("license") else []
        every = {
            "author": repo.repo_id.split("/")[0], "sha": commit.oid, "lastModified": repo.last_modified or _now(),
            "downloads": repo.downloads, "likes": 0, "private": repo.private, "tags": list(dict.fromkeys(tags)),
            "pipeline_tag": meta.get("pipeline_tag"), "library_name": meta.get("library_name"),
            "cardData": meta, "model-index": meta.get("model-index"), "createdAt": repo.last_modified or _now(),
        }
        base = {"_id": repo.repo_id, "id": repo.repo_id, "modelId": repo.repo_id}
        if expand:
            return base | {key: every[key] for key in expand if key in every}
        keys = ["likes", "downloads", "tags", "pipeline_tag", "library_name", "createdAt", "private"]
        keys += ["cardData", "sha", "lastModified", "author"] if card else []
        return base | {key: every[key] for key in keys}

    def route_list_models(self, groups, method):
        query = parse_qs(urlsplit(self.path).query)
        filters, author = query.get("filter", []), (query.get("author") or [None])[0]
        search = (query.get("search") or [""])[0].lower()
        limit = int((query.get("limit") or ["0"])[0]) or None
        expand = query.get("expand") or query.get("expand[]")
        card = any((query.get(key) or [""])[0].lower() == "true" for key in ("full", "cardData"))
        authorized = self.fake.authorized(self.headers.get("Authorization"))
        rows = []
        with self.fake.lock:
            for repo in self.fake.repos.values():
                if repo.private and not authorized:
                    continue
                row = self._model_json(repo, repo.resolve("main"), None, True)
                if author and row["author"] != author or search and search not in repo.repo_id.lower():
                    continue
                if any(f not in row["tags"] for f in filters):
                    continue
                rows.append(self._model_json(repo, repo.resolve("main"), expand, card))
        self._send(200, rows[:limit] if limit else rows)

    # ---- collections -----------------------------------------------------------------------------
    def _collection(self, slug: str) -> Collection | None:
        collection = self.fake.collections.get(slug)
        if collection is None or (collection.private and not self.fake.authorized(self.headers.get("Authorization"))):
            self._error(404, f"Collection {slug} not found", "RepoNotFound")
            return None
        return collection

    def route_collections(self, groups, method):
        body = json.loads(self._body() or b"{}")
        hub = self.fake
        if not hub.authorized(self.headers.get("Authorization")):
            self._error(401, "You must be authenticated to create a collection")
            return
        namespace = body.get("namespace") or hub.user
        with hub.lock:
            same = next((c for c in hub.collections.values() if c.namespace == namespace and c.title == body["title"]), None)
            if same is not None:
                self._send(409, {"error": "A collection with this title already exists", "slug": same.slug})
                return
            title_slug = re.sub(r"[^a-z0-9]+", "-", body["title"].lower()).strip("-") or "collection"
            digest = hashlib.sha1(f"{namespace}/{body['title']}".encode()).hexdigest()[:24]
            slug = f"{namespace}/{title_slug}-{digest}"
            hub.collections[slug] = Collection(slug, body["title"], namespace, bool(body.get("private")),
                                               body.get("description"), last_updated=_now())
        self._send(200, hub.collections[slug].to_json())

    def route_list_collections(self, groups, method):
        query = parse_qs(urlsplit(self.path).query)
        owners, items = query.get("owner", []), query.get("item", [])  # item: "models/ORG/NAME"
        authorized = self.fake.authorized(self.headers.get("Authorization"))
        with self.fake.lock:
            rows = [c.to_json() for c in self.fake.collections.values()
                    if (authorized or not c.private) and (not owners or c.namespace in owners)
                    and all(any(f"{i['type']}s/{i['id']}" == want for i in c.items) for want in items)]
        for row in rows:
            row["items"] = row["items"][:4]  # the Hub truncates the items of a listing to 4
            row.pop("position")  # and gives the position by the order of the list
        self._send(200, rows)

    def route_collection(self, groups, method):
        collection = self._collection(groups[0])
        if collection is not None:
            self._send(200, collection.to_json())

    def route_collection_items(self, groups, method):
        body = json.loads(self._body() or b"{}")
        if not self.fake.authorized(self.headers.get("Authorization")):
            self._error(401, "You must be authenticated to edit a collection")
            return
        collection = self._collection(groups[0])
        if collection is None:
            return
        item = body.get("item") or {}
        store = {"model": self.fake.repos, "space": self.fake.spaces}.get(item.get("type"))
        if store is None or item.get("id") not in store:
            self._error(404, f"{item.get('type')} {item.get('id')} not found", "RepoNotFound")
            return
        with self.fake.lock:
            if any(i["id"] == item["id"] and i["type"] == item["type"] for i in collection.items):
                self._send(409, {"error": "Item already in the collection"})
                return
            note = body.get("note")
            collection.items.append({"_id": hashlib.sha1(f"{collection.slug}/{item['id']}".encode()).hexdigest()[:24],
                                     "id": item["id"], "type": item["type"], "position": len(collection.items),
                                     "note": {"text": note, "html": note} if note else None})
            collection.last_updated = _now()
        self._send(200, collection.to_json())

    def route_collection_item(self, groups, method):
        body = json.loads(self._body() or b"{}")
        if not self.fake.authorized(self.headers.get("Authorization")):
            self._error(401, "You must be authenticated to edit a collection")
            return
        collection = self._collection(groups[0])
        if collection is None:
            return
        with self.fake.lock:
            item = next((i for i in collection.items if i["_id"] == groups[1]), None)
            if item is None:
                self._error(404, "Item not found")
                return
            if "note" in body:
                item["note"] = {"text": body["note"], "html": body["note"]}
            if "position" in body:
                item["position"] = body["position"]
        self._send(200, item)


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
