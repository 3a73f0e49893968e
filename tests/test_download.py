"""Download SVDQuant Model against a local Hugging Face Hub: two HTTP servers on 127.0.0.1 that answer the
requests huggingface_hub makes, as huggingface.co does (HF_ENDPOINT points at them). The Hub answers
HEAD/GET /{repo}/resolve/{revision}/{file} with a redirect to a CDN on another origin and the X-Repo-Commit,
X-Linked-Etag (the SHA-256) and X-Linked-Size headers, or with the Hub's error codes (401/403 GatedRepo,
401 RepoNotFound, 404 RevisionNotFound / EntryNotFound); the CDN serves the bytes, with byte ranges.
Nothing of huggingface_hub is replaced: the real client talks HTTP to these servers."""

from __future__ import annotations

import hashlib
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from conftest import validation_errors

CHUNK = 10 * 2**20  # huggingface_hub writes the body in chunks of this size
COMMIT = "0123456789abcdef0123456789abcdef01234567"
GRANTED, DENIED = "hf_granted_token", "hf_denied_token"


class LocalHub:
    """The Hub and its CDN. ``repos``: repo id → {path: bytes}; ``gated``: repo ids needing GRANTED;
    ``claimed``: (repo, path) → (size, sha256) the Hub states instead of the real ones. ``drop_after``:
    the next CDN body stops after that many bytes. Every request is logged as (server, method, path, headers
    with lower-case names).
    Both servers stop when the test ends, or by themselves after ``lifetime`` seconds."""

    def __init__(self, lifetime: float = 300.0):
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
                self.send_header("X-Repo-Commit", COMMIT)
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
                if revision not in ("main", COMMIT):
                    return self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
                if path not in hub.repos[repo]:
                    return self._error(404, "EntryNotFound", f"{path} does not exist on \"{revision}\"")
                data = hub.repos[repo][path]
                size, sha = hub.claimed.get((repo, path), (len(data), hashlib.sha256(data).hexdigest()))
                self.send_response(302)
                self.send_header("Location", f"{hub.cdn_url}/blobs/{hashlib.sha256(data).hexdigest()}")
                self.send_header("X-Repo-Commit", COMMIT)
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


@pytest.fixture
def hub(comfy, monkeypatch, tmp_path):
    running = LocalHub().start()
    monkeypatch.setenv("HF_ENDPOINT", running.endpoint)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    import huggingface_hub.constants

    # and no token from `hf auth login` on this machine (the path is read once, at import)
    monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    yield running
    running.stop()


@pytest.fixture
def interrupts(comfy):
    """ComfyUI's cancel flag, cleared again after the test."""
    import comfy.model_management

    yield comfy.model_management
    comfy.model_management.interrupt_current_processing(False)


def payload(size: int = 2 * CHUNK + 12345, seed: int = 0) -> bytes:
    import random

    return random.Random(seed).randbytes(size)


def test_downloads_into_the_folder_with_progress(hub, tmp_path):
    from comfyui_svdquant.nodes.download import fetch

    data = payload()
    hub.add("svdq/public", "svdq-int4_r32-model.safetensors", data)
    seen = []
    path = fetch("svdq/public", "svdq-int4_r32-model.safetensors", tmp_path, progress=lambda d, t: seen.append((d, t)))
    assert path == tmp_path / "svdq-int4_r32-model.safetensors" and path.read_bytes() == data
    assert seen[-1] == (len(data), len(data)) and len(seen) >= 3  # progress after every chunk
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]  # no partial file left
    (head_path, head_headers), = hub.requests("hub", "HEAD")
    assert head_path == "/svdq/public/resolve/main/svdq-int4_r32-model.safetensors"
    assert "authorization" not in head_headers


def test_a_file_already_in_the_folder_is_used_without_the_network(hub, tmp_path, monkeypatch):
    from comfyui_svdquant.nodes.download import fetch

    (tmp_path / "model.safetensors").write_bytes(b"already here")
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens there
    assert fetch("svdq/public", "sub/model.safetensors", tmp_path).read_bytes() == b"already here"
    assert hub.log == []


def test_a_cancelled_download_resumes_where_it_stopped(hub, tmp_path, interrupts):
    from comfyui_svdquant.nodes.download import fetch

    data = payload()
    hub.add("svdq/public", "model.safetensors", data)

    def cancel_after_first_chunk(done: int, total: int) -> None:
        if done >= CHUNK:
            interrupts.interrupt_current_processing(True)  # what the Cancel button does

    with pytest.raises(interrupts.InterruptProcessingException):
        fetch("svdq/public", "model.safetensors", tmp_path, progress=cancel_after_first_chunk)
    (partial,) = tmp_path.glob(".model.safetensors.*.partial")
    kept = partial.stat().st_size
    assert CHUNK <= kept < len(data) and not (tmp_path / "model.safetensors").exists()

    interrupts.interrupt_current_processing(False)
    path = fetch("svdq/public", "model.safetensors", tmp_path)
    assert path.read_bytes() == data and not partial.exists()
    last_path, last_headers = hub.requests("cdn")[-1]
    assert last_headers.get("range") == f"bytes={kept}-"  # only the rest was asked for


def test_a_broken_connection_is_resumed_by_range_request(hub, tmp_path):
    from comfyui_svdquant.nodes.download import fetch

    data = payload()
    hub.add("svdq/public", "model.safetensors", data)
    hub.drop_after = CHUNK + 1000
    assert fetch("svdq/public", "model.safetensors", tmp_path).read_bytes() == data
    ranges = [headers.get("range") for _, headers in hub.requests("cdn")]
    assert ranges[0] is None and ranges[1] == f"bytes={CHUNK}-"


def test_gated_repository_needs_the_token_from_the_environment(hub, tmp_path, monkeypatch):
    from comfyui_svdquant.nodes.download import DownloadError, fetch

    data = payload(4096)
    hub.add("svdq/gated", "model.safetensors", data)
    hub.gated.add("svdq/gated")
    for token in (None, DENIED):
        if token:
            monkeypatch.setenv("HF_TOKEN", token)
        with pytest.raises(DownloadError, match="svdq/gated is a gated repository.*HF_TOKEN"):
            fetch("svdq/gated", "model.safetensors", tmp_path)
    assert [h.get("authorization") for _, h in hub.requests("hub", "HEAD")] == [None, f"Bearer {DENIED}"]

    monkeypatch.setenv("HF_TOKEN", GRANTED)
    assert fetch("svdq/gated", "model.safetensors", tmp_path).read_bytes() == data
    assert hub.requests("hub", "HEAD")[-1][1]["authorization"] == f"Bearer {GRANTED}"
    assert all("authorization" not in headers for _, headers in hub.requests("cdn"))  # the token stays on the Hub


@pytest.mark.parametrize("repo, filename, revision, message", [
    ("svdq/nothing-here", "model.safetensors", "main", "repository svdq/nothing-here does not exist"),
    ("svdq/public", "svdq-fp4_r32-model.safetensors", "main", "has no file 'svdq-fp4_r32-model.safetensors'"),
    ("svdq/public", "model.safetensors", "v9", "has no revision 'v9'"),
])
def test_not_found_says_what_is_missing(hub, tmp_path, repo, filename, revision, message):
    from comfyui_svdquant.nodes.download import DownloadError, fetch

    hub.add("svdq/public", "model.safetensors", payload(100))
    with pytest.raises(DownloadError, match=message):
        fetch(repo, filename, tmp_path, revision=revision)
    assert list(tmp_path.iterdir()) == []


def test_offline_or_unreachable_says_so(hub, tmp_path, monkeypatch):
    from comfyui_svdquant.nodes.download import DownloadError, fetch

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DownloadError, match="offline mode is on"):
        fetch("svdq/public", "model.safetensors", tmp_path)
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    with pytest.raises(DownloadError, match="cannot reach http://127.0.0.1:9"):
        fetch("svdq/public", "model.safetensors", tmp_path)
    assert hub.log == [] and list(tmp_path.iterdir()) == []


def test_not_enough_disk_space_is_refused_before_downloading(hub, tmp_path):
    from comfyui_svdquant.nodes.download import DownloadError, fetch

    data = payload(100)
    hub.add("svdq/public", "huge.safetensors", data)
    hub.claimed[("svdq/public", "huge.safetensors")] = (10**18, hashlib.sha256(data).hexdigest())  # an exabyte
    with pytest.raises(DownloadError, match="not enough free space .* it needs 1000000000.00 GB more"):
        fetch("svdq/public", "huge.safetensors", tmp_path)
    assert hub.requests("cdn") == [] and list(tmp_path.iterdir()) == []


def test_a_download_that_does_not_match_the_hubs_hash_is_deleted(hub, tmp_path):
    from comfyui_svdquant.nodes.download import DownloadError, fetch

    data = payload(5000)
    hub.add("svdq/public", "model.safetensors", data)
    hub.claimed[("svdq/public", "model.safetensors")] = (len(data), hashlib.sha256(b"other").hexdigest())
    with pytest.raises(DownloadError, match="is corrupt .*SHA-256"):
        fetch("svdq/public", "model.safetensors", tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_node_downloads_and_loads_a_checkpoint(hub, model_folders):
    import torch

    from comfyui_svdquant.nodes.download import SVDQuantDownloadModel
    from comfyui_svdquant.nodes.loader import SVDQuantModelLoader
    from nunchaku_fixture import flux_checkpoint
    from tiny_models import flux_inputs, tiny_flux

    source = model_folders["diffusion_models"].parent / "published.safetensors"
    flux_checkpoint(tiny_flux(seed=3), source, rank=16)
    hub.add("nunchaku-tech/nunchaku-tiny", "svdq-int4_r16-tiny.safetensors", source.read_bytes())

    assert SVDQuantDownloadModel.validate_inputs("nunchaku-tech/nunchaku-tiny", "svdq-int4_r16-tiny.safetensors",
                                                 "main") is True
    model, name = SVDQuantDownloadModel.execute("nunchaku-tech/nunchaku-tiny", "svdq-int4_r16-tiny.safetensors",
                                                "main", "bfloat16", "torch").args
    assert name == "svdq-int4_r16-tiny.safetensors"
    assert (model_folders["diffusion_models"] / name).read_bytes() == source.read_bytes()
    assert not validation_errors("SVDQuantModelLoader", model_name=name, compute_dtype="auto",
                                 kernel_backend="auto")  # listed by the loader from now on
    (loaded,) = SVDQuantModelLoader.execute(name, "bfloat16", "torch").args
    with torch.no_grad():
        inputs = flux_inputs(0)
        assert torch.equal(model.model.diffusion_model(**inputs), loaded.model.diffusion_model(**inputs))


@pytest.mark.parametrize("repo, filename, revision, dtype, message", [
    ("not a repo", "m.safetensors", "main", "auto", "not a Hugging Face repository id"),
    ("a/b", "../m.safetensors", "main", "auto", "inside the repository"),
    ("a/b", "model.ckpt", "main", "auto", "only .safetensors"),
    ("a/b", "m.safetensors", " ", "auto", "revision is empty"),
    ("a/b", "m.safetensors", "main", "float8", "compute_dtype: 'float8'"),
])
def test_node_rejects_bad_settings_when_the_prompt_is_validated(comfy, repo, filename, revision, dtype, message):
    from comfyui_svdquant.nodes.download import SVDQuantDownloadModel

    result = SVDQuantDownloadModel.validate_inputs(repo, filename, revision, dtype, "auto")
    assert isinstance(result, str) and message in result
