"""A stand-in for the few Hugging Face Hub endpoints an upload of a small folder uses, on 127.0.0.1 only.

It lets the real ``huggingface_hub`` client run end to end over HTTP without the network. Endpoints (those
``HfApi.create_repo``, ``repo_info``, ``create_branch`` and ``upload_folder`` call, huggingface_hub 1.x/2.x):

    POST /api/repos/create                          {"name", "organization", "visibility"?, "type"?} -> {"url"}
                                                    (409 with {"error", "url"} when it exists)
    GET  /api/models/{ns}/{name}[/revision/{rev}]   -> {"id", "private", "sha"}
    POST /api/models/{ns}/{name}/branch/{branch}    -> {} (409 when it exists)
    POST /api/validate-yaml                         {"content", "repoType"} -> {"errors": [], "warnings": []}
    POST /api/models/{ns}/{name}/preupload/{rev}    {"files": [{"path", "sample", "size"}]}
                                                    -> {"files": [{"path", "uploadMode": "regular", "shouldIgnore"}]}
    POST /api/models/{ns}/{name}/commit/{rev}       ndjson: {"key": "header"|"file"|"deletedFile"|..., "value"}
                                                    -> {"commitUrl", "commitOid", "pullRequestUrl"?}
    GET  /api/agent-harnesses                       public registry the client fetches for its user agent
                                                    -> {"standardEnvVars": [], "harnesses": {}}

Every file is declared "regular", so the client sends its content base64-encoded inside the commit call: no LFS,
no Xet transfer (which need storage endpoints this server does not have). Real Hub servers ask for LFS/Xet for
large or binary files; that path is huggingface_hub's own business and is not exercised here.

Bounded: at most ``max_requests`` requests and ``max_body`` bytes per request are served, each connection has a
socket timeout, and the server shuts itself down after ``lifetime`` seconds even if the test forgets to stop it.
"""

from __future__ import annotations

import base64
import hashlib
import json
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Optional
from urllib.parse import parse_qs, unquote, urlsplit


@dataclass
class Request:
    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]  # names in lower case
    body: bytes


@dataclass
class Repo:
    repo_id: str
    private: bool
    branches: dict[str, dict[str, bytes]] = field(default_factory=lambda: {"main": {}})
    commits: list[dict[str, Any]] = field(default_factory=list)

    @property
    def files(self) -> dict[str, bytes]:
        return self.branches["main"]


class StandInHub:
    """Start with ``start()`` (or as a context manager); ``url`` is the endpoint to give huggingface_hub.

    ``token``: when set, every request must carry ``Authorization: Bearer <token>`` (else 401).
    ``fail``: ``{"commit": 500}`` makes that kind of call (create, info, branch, validate, preupload, commit) answer
    with the given status.
    """

    def __init__(self, *, token: Optional[str] = None, fail: Optional[dict[str, int]] = None,
                 max_requests: int = 200, max_body: int = 32 * 1024 * 1024, lifetime: float = 120.0):
        self.token = token
        self.fail = dict(fail or {})
        self.max_requests = max_requests
        self.max_body = max_body
        self.lifetime = lifetime
        self.requests: list[Request] = []
        self.repos: dict[str, Repo] = {}
        self.errors: list[str] = []  # requests the server did not understand
        self._lock = threading.Lock()
        self._server: Optional[ThreadingHTTPServer] = None
        self._thread: Optional[threading.Thread] = None
        self._timer: Optional[threading.Timer] = None

    # ------------------------------------------------------------------ lifecycle
    @property
    def url(self) -> str:
        assert self._server is not None, "server not started"
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> "StandInHub":
        hub = self

        class Handler(_Handler):
            stand_in = hub

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="stand-in-hub", daemon=True)
        self._thread.start()
        self._timer = threading.Timer(self.lifetime, self.stop)
        self._timer.daemon = True
        self._timer.start()
        return self

    def stop(self) -> None:
        server, self._server = self._server, None
        if self._timer is not None and threading.current_thread() is not self._timer:
            self._timer.cancel()
        if server is not None:
            server.shutdown()
            server.server_close()
        if self._thread is not None and threading.current_thread() is not self._thread:
            self._thread.join(timeout=5)

    def __enter__(self) -> "StandInHub":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    # ------------------------------------------------------------------ inspection
    def paths(self) -> list[str]:
        return [f"{r.method} {r.path}" for r in self.requests]

    def api_requests(self) -> list[Request]:
        """The requests of the upload itself (without the client's public registry look-up)."""
        return [r for r in self.requests if r.path != "/api/agent-harnesses"]

    def token_leaks(self, token: str) -> list[str]:
        """Places other than the Authorization header where the token was sent or stored."""
        leaks = []
        needle = token.encode()
        for r in self.requests:
            where = f"{r.method} {r.path}"
            if token in r.path or any(token in v for vs in r.query.values() for v in vs):
                leaks.append(f"{where}: URL")
            for name, value in r.headers.items():
                if name.lower() != "authorization" and token in value:
                    leaks.append(f"{where}: header {name}")
            if needle in r.body:
                leaks.append(f"{where}: body")
        for repo in self.repos.values():
            for branch, files in repo.branches.items():
                for path, content in files.items():
                    if needle in content:
                        leaks.append(f"{repo.repo_id}@{branch}:{path}")
            for commit in repo.commits:
                if token in json.dumps(commit["header"]):
                    leaks.append(f"{repo.repo_id}: commit message")
        return leaks


class _Handler(BaseHTTPRequestHandler):
    stand_in: StandInHub
    protocol_version = "HTTP/1.0"  # one request per connection: no idle keep-alive threads outlive a test
    timeout = 10  # seconds a connection may stay silent

    def log_message(self, format: str, *args: Any) -> None:  # keep pytest output clean
        pass

    # ------------------------------------------------------------------ plumbing
    def do_GET(self) -> None:
        self._handle("GET")

    def do_POST(self) -> None:
        self._handle("POST")

    def do_PUT(self) -> None:
        self._handle("PUT")

    def do_HEAD(self) -> None:
        self._handle("HEAD")

    def _reply(self, status: int, payload: Any = None, headers: Optional[dict[str, str]] = None) -> None:
        body = b"" if payload is None else json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _handle(self, method: str) -> None:
        hub = self.stand_in
        length = int(self.headers.get("Content-Length") or 0)
        if length > hub.max_body:
            self.close_connection = True
            self._reply(413, {"error": "request body too large for the stand-in server"})
            return
        body = self.rfile.read(length) if length else b""
        split = urlsplit(self.path)
        request = Request(method, unquote(split.path), parse_qs(split.query),
                          {k.lower(): v for k, v in self.headers.items()}, body)
        with hub._lock:
            hub.requests.append(request)
            over = len(hub.requests) > hub.max_requests
        if over:
            self.close_connection = True
            self._reply(503, {"error": "stand-in server request budget exhausted"})
            return
        if method == "GET" and request.path == "/api/agent-harnesses":
            # huggingface_hub >= 2.x fetches this public registry (best-effort, unauthenticated) to tag its
            # user agent; an empty registry means "no agent detected".
            self._reply(200, {"standardEnvVars": [], "harnesses": {}})
            return
        if hub.token is not None and self.headers.get("Authorization") != f"Bearer {hub.token}":
            self._reply(401, {"error": "Invalid credentials in Authorization header"})
            return
        try:
            self._route(request)
        except Exception as err:  # a bug here must show up in the test, not hang the client
            hub.errors.append(f"{method} {request.path}: {type(err).__name__}: {err}")
            self._reply(500, {"error": f"stand-in server error: {err}"})

    # ------------------------------------------------------------------ routes
    def _route(self, r: Request) -> None:
        parts = [p for p in r.path.split("/") if p]
        if r.method == "POST" and parts == ["api", "repos", "create"]:
            return self._create_repo(r)
        if r.method == "POST" and parts == ["api", "validate-yaml"]:
            return self._failing("validate") or self._reply(200, {"errors": [], "warnings": []})
        if len(parts) >= 4 and parts[:2] == ["api", "models"]:
            repo_id, rest = f"{parts[2]}/{parts[3]}", parts[4:]
            if r.method == "GET" and (not rest or rest[0] == "revision"):
                return self._repo_info(repo_id)
            if r.method == "POST" and len(rest) >= 2 and rest[0] == "branch":
                return self._create_branch(repo_id, "/".join(rest[1:]))
            if r.method == "POST" and len(rest) >= 2 and rest[0] == "preupload":
                return self._preupload(r, repo_id)
            if r.method == "POST" and len(rest) >= 2 and rest[0] == "commit":
                return self._commit(r, repo_id, "/".join(rest[1:]))
        self.stand_in.errors.append(f"unexpected request {r.method} {r.path}")
        self._reply(404, {"error": f"not implemented by the stand-in server: {r.method} {r.path}"})

    def _failing(self, kind: str) -> bool:
        status = self.stand_in.fail.get(kind)
        if status is None:
            return False
        self._reply(status, {"error": f"stand-in server: {kind} fails with {status} on purpose"})
        return True

    def _repo(self, repo_id: str) -> Optional[Repo]:
        repo = self.stand_in.repos.get(repo_id)
        if repo is None:
            self._reply(404, {"error": "Repository not found"}, {"X-Error-Code": "RepoNotFound"})
        return repo

    def _create_repo(self, r: Request) -> None:
        if self._failing("create"):
            return
        payload = json.loads(r.body)
        if payload.get("type", "model") != "model":
            return self._reply(400, {"error": "the stand-in server only knows model repos"})
        repo_id = f"{payload['organization']}/{payload['name']}" if payload.get("organization") else payload["name"]
        url = f"{self.stand_in.url}/{repo_id}"
        with self.stand_in._lock:
            if repo_id in self.stand_in.repos:
                return self._reply(409, {"error": "You already created this model repo", "url": url})
            self.stand_in.repos[repo_id] = Repo(repo_id, private=payload.get("visibility") == "private")
        self._reply(200, {"url": url, "name": repo_id})

    def _repo_info(self, repo_id: str) -> None:
        if self._failing("info"):
            return
        repo = self._repo(repo_id)
        if repo is not None:
            sha = repo.commits[-1]["oid"] if repo.commits else "0" * 40
            self._reply(200, {"id": repo_id, "private": repo.private, "sha": sha, "siblings": [
                {"rfilename": p} for p in sorted(repo.files)]})

    def _create_branch(self, repo_id: str, branch: str) -> None:
        if self._failing("branch"):
            return
        repo = self._repo(repo_id)
        if repo is None:
            return
        if branch in repo.branches:
            return self._reply(409, {"error": f"Reference already exists: {branch}"})
        repo.branches[branch] = dict(repo.files)
        self._reply(200, {})

    def _preupload(self, r: Request, repo_id: str) -> None:
        if self._failing("preupload") or self._repo(repo_id) is None:
            return
        files = json.loads(r.body)["files"]
        self._reply(200, {"files": [
            {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False, "oid": None} for f in files
        ]})

    def _commit(self, r: Request, repo_id: str, revision: str) -> None:
        if self._failing("commit"):
            return
        repo = self._repo(repo_id)
        if repo is None:
            return
        create_pr = r.query.get("create_pr") == ["1"]
        lines = [json.loads(line) for line in r.body.splitlines() if line.strip()]
        if not lines or lines[0].get("key") != "header":
            return self._reply(400, {"error": "the commit payload must start with a header line"})
        if not create_pr and revision not in repo.branches:
            return self._reply(404, {"error": f"Invalid rev id: {revision}"}, {"X-Error-Code": "RevisionNotFound"})
        target = dict(repo.branches.get(revision, repo.files))
        for line in lines[1:]:
            key, value = line.get("key"), line.get("value", {})
            if key == "file" and value.get("encoding") == "base64":
                target[value["path"]] = base64.b64decode(value["content"])
            elif key == "deletedFile":
                target.pop(value["path"], None)
            elif key == "deletedFolder":
                prefix = value["path"].rstrip("/") + "/"
                for path in [p for p in target if p.startswith(prefix)]:
                    del target[path]
            else:  # lfsFile / copies: never asked for by this server
                return self._reply(400, {"error": f"the stand-in server does not accept {key!r} operations"})
        oid = hashlib.sha1(r.body + str(time.time_ns()).encode()).hexdigest()
        pr_number = None
        if create_pr:
            pr_number = 1 + sum(1 for b in repo.branches if b.startswith("refs/pr/"))
            repo.branches[f"refs/pr/{pr_number}"] = target
        else:
            repo.branches[revision] = target
        repo.commits.append({"oid": oid, "revision": revision, "header": lines[0]["value"],
                             "paths": [line["value"].get("path") for line in lines[1:]], "pr": pr_number})
        answer = {"commitUrl": f"{self.stand_in.url}/{repo_id}/commit/{oid}", "commitOid": oid}
        if create_pr:
            answer["pullRequestUrl"] = f"{self.stand_in.url}/{repo_id}/discussions/{pr_number}"
        self._reply(200, answer)
