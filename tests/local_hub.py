"""A local Hugging Face Hub: two HTTP servers on 127.0.0.1 that answer the requests huggingface_hub makes,
as huggingface.co does (HF_ENDPOINT points at them). The Hub answers HEAD/GET /{repo}/resolve/{revision}/{file}
with a redirect to a CDN on another origin and the X-Repo-Commit, X-Linked-Etag (the SHA-256) and
X-Linked-Size headers, or with the Hub's error codes (401/403 GatedRepo, 401 RepoNotFound, 404
RevisionNotFound / EntryNotFound); the CDN serves the bytes, with byte ranges."""

from __future__ import annotations

import hashlib
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import workflow_format as wf

CHUNK = 10 * 2**20  # huggingface_hub writes the body in chunks of this size
COMMIT = "0123456789abcdef0123456789abcdef01234567"
GRANTED, DENIED = "hf_granted_token", "hf_denied_token"


class LocalHub:
    """The Hub and its CDN. ``repos``: repo id → {path: bytes} at ``commit`` (main); ``gated``: repo ids
    needing GRANTED; ``claimed``: (repo, path) → (size, sha256) the Hub states instead of the real ones. ``drop_after``:
    the next CDN body stops after that many bytes. Every request is logged as (server, method, path, headers
    with lower-case names).
    Both servers stop when the test ends, or by themselves after ``lifetime`` seconds."""

    def __init__(self, lifetime: float = 300.0):
        self.commit = COMMIT  # what main resolves to
        self.repos: dict[str, dict[str, bytes]] = {}
        self.gated: set[str] = set()
        self.claimed: dict[tuple[str, str], tuple[int, str]] = {}
        self.drop_after: int | None = None
        self.log: list[tuple[str, str, str, dict]] = []
        self.blobs: dict[str, bytes] = {}
        self.hub = ThreadingHTTPServer(("127.0.0.1", 0), self._handler("hub"))
        self.cdn = ThreadingHTTPServer(("127.0.0.1", 0), self._handler("cdn"))
        self.endpoint = f"http://127.0.0.1:{self.hub.server_address[1]}"
        self.cdn_url = f"http://127.0.0.1:{self.cdn.server_address[1]}"
        self._threads = [threading.Thread(target=s.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
                         for s in (self.hub, self.cdn)]
        self._timer = threading.Timer(lifetime, self.stop)
        self._timer.daemon = True

    def add(self, repo: str, path: str, data: bytes) -> str:
        sha = hashlib.sha256(data).hexdigest()
        self.repos.setdefault(repo, {})[path] = data
        self.blobs[sha] = data
        return sha

    def start(self) -> LocalHub:
        for thread in self._threads:
            thread.start()
        self._timer.start()
        return self

    def stop(self) -> None:
        self._timer.cancel()
        for server in (self.hub, self.cdn):
            server.shutdown()
            server.server_close()

    def requests(self, server: str, method: str = "GET") -> list[tuple[str, dict]]:
        return [(path, headers) for s, m, path, headers in self.log if s == server and m == method]

    def _handler(self, server: str):
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:  # quiet
                pass

            def do_HEAD(self) -> None:
                self._answer(body=False)

            def do_GET(self) -> None:
                self._answer(body=True)

            def _answer(self, body: bool) -> None:
                hub.log.append((server, self.command, self.path, {k.lower(): v for k, v in self.headers.items()}))
                if server == "hub":
                    self._resolve()
                else:
                    self._blob(body)

            def _error(self, status: int, code: str, message: str) -> None:
                self.send_response(status)
                self.send_header("X-Error-Code", code)
                self.send_header("X-Error-Message", message)
                self.send_header("X-Repo-Commit", hub.commit)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def _resolve(self) -> None:
                parts = self.path.split("?")[0].lstrip("/").split("/", 4)
                if len(parts) < 5 or parts[2] != "resolve":
                    return self._error(404, "RepoNotFound", "Not found")
                repo, revision, path = f"{parts[0]}/{parts[1]}", parts[3], parts[4]
                if repo not in hub.repos:
                    return self._error(401, "RepoNotFound", "Repository not found")
                token = self.headers.get("Authorization", "").removeprefix("Bearer ")
                if repo in hub.gated and token != GRANTED:
                    if not token:
                        return self._error(401, "GatedRepo", f"Access to model {repo} is restricted. You must have "
                                           "access to it and be authenticated to access it. Please log in.")
                    return self._error(403, "GatedRepo", f"Access to model {repo} is restricted and you are not in "
                                       "the authorized list.")
                if revision not in ("main", hub.commit):
                    return self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
                if path not in hub.repos[repo]:
                    return self._error(404, "EntryNotFound", f"{path} does not exist on \"{revision}\"")
                data = hub.repos[repo][path]
                size, sha = hub.claimed.get((repo, path), (len(data), hashlib.sha256(data).hexdigest()))
                self.send_response(302)
                self.send_header("Location", f"{hub.cdn_url}/blobs/{hashlib.sha256(data).hexdigest()}")
                self.send_header("X-Repo-Commit", hub.commit)
                self.send_header("X-Linked-Etag", f'"{sha}"')
                self.send_header("X-Linked-Size", str(size))
                self.send_header("ETag", '"a1b2c3d4e5f6a1b2c3d4e5f6a1b2c3d4e5f6a1b2"')
                self.send_header("Content-Length", "0")
                self.end_headers()

            def _blob(self, body: bool) -> None:
                data = hub.blobs.get(self.path.split("?")[0].removeprefix("/blobs/"))
                if data is None:
                    self.send_response(404)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                start = 0
                ranged = self.headers.get("Range", "")
                if ranged.startswith("bytes="):
                    start = int(ranged[6:].split("-")[0])
                part = data[start:]
                self.send_response(206 if ranged else 200)
                if ranged:
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                self.send_header("Content-Length", str(len(part)))
                self.send_header("Accept-Ranges", "bytes")
                self.send_header("ETag", f'"{hashlib.sha256(data).hexdigest()}"')
                self.end_headers()
                if not body:
                    return
                drop, hub.drop_after = hub.drop_after, None
                self.wfile.write(part if drop is None else part[:drop])
                self.wfile.flush()
                if drop is not None:
                    self.close_connection = True  # the connection breaks before the body is complete

        return Handler


def hub_for_workflows(models: Path) -> LocalHub:
    """A running Hub publishing, for every Download SVDQuant Model node of the example workflows, the stand-in
    checkpoint of that name in ``models``/diffusion_models (tiny_pipeline.populate) under its repository."""
    hub = LocalHub(lifetime=3600.0)
    for path in sorted(wf.WORKFLOWS.glob("*.json")):
        for node in wf.load(path).get("nodes", []):
            if node.get("type") == "SVDQuantDownloadModel":
                repo_id, filename = node["widgets_values"][:2]
                hub.add(repo_id, filename, (models / "diffusion_models" / filename).read_bytes())
    return hub.start()


def server_environment(hub: LocalHub, base: Path) -> dict[str, str | None]:
    """What a ComfyUI server process needs to download from ``hub`` only: its endpoint, no proxy for it, and
    no token or cache of this machine's (HF_HOME under ``base``)."""
    return {"HF_ENDPOINT": hub.endpoint, "NO_PROXY": "127.0.0.1", "HF_HOME": str(base / "hf-home"),
            "HF_TOKEN": None, "HF_HUB_OFFLINE": None}
