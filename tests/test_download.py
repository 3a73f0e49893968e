"""Download SVDQuant Model against a local Hugging Face Hub: two HTTP servers on 127.0.0.1 that answer the
requests huggingface_hub makes, as huggingface.co does (HF_ENDPOINT points at them). The Hub answers
HEAD/GET /{repo}/resolve/{revision}/{file} with a redirect to a CDN on another origin and the X-Repo-Commit,
X-Linked-Etag (the SHA-256) and X-Linked-Size headers, or with the Hub's error codes (401/403 GatedRepo,
401 RepoNotFound, 404 RevisionNotFound / EntryNotFound); the CDN serves the bytes, with byte ranges.
Nothing of huggingface_hub is replaced: the real client (hf_hub_download) talks HTTP to these servers; the
fixture only points the library's settings, read once at its import, at them (endpoint, offline flag, cache)."""

from __future__ import annotations

import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from conftest import validation_errors

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


def point_at(monkeypatch, endpoint: str) -> None:
    """HF_ENDPOINT, in the environment and as huggingface_hub took it from there when it was imported."""
    import huggingface_hub.constants
    import huggingface_hub.file_download

    monkeypatch.setenv("HF_ENDPOINT", endpoint)
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", endpoint)
    template = endpoint + "/{repo_id}/resolve/{revision}/{filename}"
    monkeypatch.setattr(huggingface_hub.constants, "HUGGINGFACE_CO_URL_TEMPLATE", template)
    # huggingface_hub before 1.0 also kept its own copy of the template
    monkeypatch.setattr(huggingface_hub.file_download, "HUGGINGFACE_CO_URL_TEMPLATE", template, raising=False)


def go_offline(monkeypatch, offline: bool = True) -> None:
    """HF_HUB_OFFLINE, likewise."""
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1" if offline else "0")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", offline)


@pytest.fixture
def hub(comfy, monkeypatch, tmp_path_factory):
    import huggingface_hub.constants

    running = LocalHub().start()
    point_at(monkeypatch, running.endpoint)
    go_offline(monkeypatch, False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    monkeypatch.delenv("HF_TOKEN", raising=False)
    # no token from `hf auth login` and no file from this machine's Hugging Face cache
    monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(tmp_path_factory.mktemp("hf") / "no-token"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path_factory.mktemp("hf-cache")))
    yield running
    running.stop()


@pytest.fixture
def interrupts(comfy):
    """ComfyUI's cancel flag, cleared again after the test."""
    import comfy.model_management

    yield comfy.model_management
    comfy.model_management.interrupt_current_processing(False)


def progress_reported() -> bool:
    """Whether this huggingface_hub reports a download's progress (it takes a tqdm_class from 1.1 on)."""
    from comfyui_svdquant.nodes.download import _progress_bars

    return bool(_progress_bars(print))


def needs_progress_reports() -> None:
    if not progress_reported():
        pytest.skip("huggingface_hub before 1.1 takes no tqdm_class: no progress or Cancel inside a download")


def payload(size: int = 2 * CHUNK + 12345, seed: int = 0) -> bytes:
    import random

    return random.Random(seed).randbytes(size)


def visible(folder) -> list[str]:
    """The files a user sees in the folder (not the bookkeeping under .cache)."""
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*")
                  if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts))


def record(folder, filename: str) -> dict:
    return json.loads((folder / ".cache" / "svdquant" / "download" / f"{filename}.json").read_text())


def test_downloads_into_the_folder_with_progress(hub, tmp_path):
    from comfyui_svdquant.nodes.download import fetch

    needs_progress_reports()
    data = payload()
    hub.add("svdq/public", "svdq-int4_r32-model.safetensors", data)
    seen = []
    path = fetch("svdq/public", "svdq-int4_r32-model.safetensors", tmp_path, progress=lambda d, t: seen.append((d, t)))
    assert path == tmp_path / "svdq-int4_r32-model.safetensors" and path.read_bytes() == data
    assert seen[-1] == (len(data), len(data)) and len(seen) >= 3  # progress after every chunk
    assert visible(tmp_path) == [path.name]  # no partial file left
    assert {p for p, _ in hub.requests("hub", "HEAD")} == {"/svdq/public/resolve/main/svdq-int4_r32-model.safetensors"}
    assert all("authorization" not in headers for _, headers in hub.requests("hub", "HEAD"))
    assert record(tmp_path, path.name) == {
        "repo_id": "svdq/public", "filename": path.name, "revision": "main", "commit": COMMIT,
        "etag": hashlib.sha256(data).hexdigest(), "size": len(data), "mtime_ns": path.stat().st_mtime_ns}


def test_a_file_in_a_repository_folder_keeps_its_folder(hub, tmp_path):
    from comfyui_svdquant.nodes.download import fetch

    hub.add("svdq/public", "int4/model.safetensors", payload(3000))
    hub.add("svdq/public", "fp4/model.safetensors", payload(4000))
    for name in ("int4/model.safetensors", "fp4/model.safetensors"):
        assert fetch("svdq/public", name, tmp_path) == tmp_path / name
    assert visible(tmp_path) == ["fp4/model.safetensors", "int4/model.safetensors"]
    assert (tmp_path / "int4/model.safetensors").read_bytes() == payload(3000)


def test_a_download_is_reused_only_for_the_same_repository_file_and_revision(hub, tmp_path, monkeypatch):
    from comfyui_svdquant.nodes.download import DownloadError, fetch

    ours, theirs = payload(5000, seed=1), payload(6000, seed=2)
    hub.add("svdq/ours", "model.safetensors", ours)
    hub.add("svdq/theirs", "model.safetensors", theirs)
    fetch("svdq/ours", "model.safetensors", tmp_path)

    go_offline(monkeypatch)
    hub.log.clear()
    assert fetch("svdq/ours", "model.safetensors", tmp_path).read_bytes() == ours
    assert fetch("svdq/ours", "model.safetensors", tmp_path, revision=COMMIT).read_bytes() == ours
    for repo, revision in (("svdq/theirs", "main"), ("svdq/ours", "v2")):
        with pytest.raises(DownloadError, match=r"'model.safetensors' in .* is not recorded as this download, so it is "
                           rf"not used; cannot download 'model.safetensors' from {repo} \(revision {revision},"):
            fetch(repo, "model.safetensors", tmp_path, revision=revision)
    assert hub.log == []
    go_offline(monkeypatch, False)

    point_at(monkeypatch, "http://127.0.0.1:9")  # the Hub cannot be asked for a newer commit: the recorded one
    assert fetch("svdq/ours", "model.safetensors", tmp_path).read_bytes() == ours
    point_at(monkeypatch, hub.endpoint)
    assert fetch("svdq/theirs", "model.safetensors", tmp_path).read_bytes() == theirs  # replaced by the one asked for
    assert record(tmp_path, "model.safetensors")["repo_id"] == "svdq/theirs"
    assert visible(tmp_path) == ["model.safetensors"]


def test_a_newer_commit_of_the_branch_replaces_the_download(hub, tmp_path):
    from comfyui_svdquant.nodes.download import fetch

    hub.add("svdq/public", "model.safetensors", payload(5000, seed=1))
    fetch("svdq/public", "model.safetensors", tmp_path)
    hub.add("svdq/public", "model.safetensors", payload(5000, seed=2))
    hub.commit = "f" * 40
    assert fetch("svdq/public", "model.safetensors", tmp_path).read_bytes() == payload(5000, seed=2)
    assert record(tmp_path, "model.safetensors")["commit"] == "f" * 40


def test_a_file_put_there_by_hand_is_neither_taken_for_the_download_nor_overwritten(hub, tmp_path):
    from comfyui_svdquant.nodes.download import DownloadError, fetch

    hub.add("svdq/public", "model.safetensors", payload(5000))
    (tmp_path / "model.safetensors").write_bytes(b"my own model")
    with pytest.raises(DownloadError, match=r"a different 'model.safetensors' \(0.00 GB\) is already in .*, not "
                       r"downloaded by this node; 'model.safetensors' from svdq/public is 0.00 GB. Move or rename"):
        fetch("svdq/public", "model.safetensors", tmp_path)
    assert (tmp_path / "model.safetensors").read_bytes() == b"my own model" and hub.requests("cdn") == []


def test_a_file_of_the_hubs_size_put_there_earlier_is_kept_only_if_its_sha256_matches(hub, tmp_path):
    from comfyui_svdquant.nodes.download import fetch

    data = payload(5000)
    hub.add("svdq/public", "same.safetensors", data)
    hub.add("svdq/public", "damaged.safetensors", data)
    (tmp_path / "same.safetensors").write_bytes(data)  # e.g. from an earlier version of the node
    (tmp_path / "damaged.safetensors").write_bytes(data[:-1] + b"\0")
    assert fetch("svdq/public", "same.safetensors", tmp_path).read_bytes() == data
    assert hub.requests("cdn") == [] and record(tmp_path, "same.safetensors")["repo_id"] == "svdq/public"
    assert fetch("svdq/public", "damaged.safetensors", tmp_path).read_bytes() == data
    assert len(hub.requests("cdn")) == 1


def test_a_cancelled_download_stops_and_the_next_run_completes_it(hub, tmp_path, interrupts):
    from comfyui_svdquant.nodes.download import fetch

    needs_progress_reports()
    data = payload()
    hub.add("svdq/public", "model.safetensors", data)

    def cancel_after_first_chunk(done: int, total: int) -> None:
        if done >= CHUNK:
            interrupts.interrupt_current_processing(True)  # what the Cancel button does

    with pytest.raises(interrupts.InterruptProcessingException):
        fetch("svdq/public", "model.safetensors", tmp_path, progress=cancel_after_first_chunk)
    assert visible(tmp_path) == []
    assert not (tmp_path / ".cache" / "svdquant").exists()  # nothing recorded

    interrupts.interrupt_current_processing(False)
    assert fetch("svdq/public", "model.safetensors", tmp_path).read_bytes() == data


def test_a_broken_connection_is_resumed_by_range_request(hub, tmp_path):
    from comfyui_svdquant.nodes.download import DownloadError, fetch

    data = payload()
    hub.add("svdq/public", "model.safetensors", data)
    hub.drop_after = CHUNK + 1000
    try:
        fetch("svdq/public", "model.safetensors", tmp_path)
    except DownloadError:  # huggingface_hub before 1.0 resumes in the next run, not in the same one
        fetch("svdq/public", "model.safetensors", tmp_path)
    assert (tmp_path / "model.safetensors").read_bytes() == data
    ranges = [headers.get("range") for _, headers in hub.requests("cdn")]
    assert ranges[0] is None and ranges[1] in (f"bytes={CHUNK}-", f"bytes={CHUNK + 1000}-")  # only the rest


def test_gated_repository_needs_the_token_from_the_environment(hub, tmp_path, monkeypatch):
    from comfyui_svdquant.nodes.download import DownloadError, fetch

    data = payload(4096)
    hub.add("svdq/gated", "model.safetensors", data)
    hub.gated.add("svdq/gated")
    for token in (None, DENIED):
        if token:
            monkeypatch.setenv("HF_TOKEN", token)
        with pytest.raises(DownloadError, match=r"cannot download 'model.safetensors' from svdq/gated .*svdq/gated is "
                           "a gated repository.*HF_TOKEN"):
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
    with pytest.raises(DownloadError, match=rf"cannot download '{filename}' from {repo} \(revision {revision}, "
                       rf"{hub.endpoint}\): .*{message}"):
        fetch(repo, filename, tmp_path, revision=revision)
    assert visible(tmp_path) == []


def test_offline_or_unreachable_says_so(hub, tmp_path, monkeypatch):
    from comfyui_svdquant.nodes.download import DownloadError, fetch

    go_offline(monkeypatch)
    with pytest.raises(DownloadError, match=r"cannot download 'model.safetensors' from svdq/public .*offline mode is "
                       "on"):
        fetch("svdq/public", "model.safetensors", tmp_path)
    go_offline(monkeypatch, False)
    point_at(monkeypatch, "http://127.0.0.1:9")  # nothing listens there
    with pytest.raises(DownloadError, match=r"cannot download 'model.safetensors' from svdq/public \(revision main, "
                       r"http://127.0.0.1:9\): the Hub did not answer"):
        fetch("svdq/public", "model.safetensors", tmp_path)
    assert hub.log == [] and visible(tmp_path) == []


def test_an_endpoint_that_is_not_a_hub_says_so(hub, tmp_path, monkeypatch):
    import functools
    from http.server import SimpleHTTPRequestHandler

    from comfyui_svdquant.nodes.download import DownloadError, fetch

    site = tmp_path / "site"  # a plain web server (no ETag, no commit), as a mistyped HF_ENDPOINT may give
    (site / "svdq/public/resolve/main").mkdir(parents=True)
    (site / "svdq/public/resolve/main/model.safetensors").write_bytes(payload(100))
    quiet = type("Quiet", (SimpleHTTPRequestHandler,), {"log_message": lambda *args: None})
    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(quiet, directory=str(site)))
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    try:
        point_at(monkeypatch, f"http://127.0.0.1:{server.server_address[1]}")
        with pytest.raises(DownloadError, match=r"gave no size, ETag or commit for 'model.safetensors' from "
                           r"svdq/public: it does not answer like the Hugging Face Hub \(check HF_ENDPOINT\)"):
            fetch("svdq/public", "model.safetensors", tmp_path / "models")
    finally:
        server.shutdown()
        server.server_close()
    assert not (tmp_path / "models").exists()


def test_not_enough_disk_space_is_refused_before_downloading(hub, tmp_path):
    from comfyui_svdquant.nodes.download import DownloadError, fetch

    data = payload(100)
    hub.add("svdq/public", "huge.safetensors", data)
    hub.claimed[("svdq/public", "huge.safetensors")] = (10**18, hashlib.sha256(data).hexdigest())  # an exabyte
    with pytest.raises(DownloadError, match="not enough free space .* for 'huge.safetensors' from svdq/public: it "
                       "needs 1000000000.00 GB more"):
        fetch("svdq/public", "huge.safetensors", tmp_path)
    assert hub.requests("cdn") == [] and visible(tmp_path) == []


def test_a_full_disk_during_the_download_names_the_repository_and_file(comfy):
    import errno

    from comfyui_svdquant.nodes.download import _describe

    full = OSError(errno.ENOSPC, "No space left on device")
    assert _describe(full, "svdq/public", "model.safetensors", "main").startswith(
        "cannot download 'model.safetensors' from svdq/public (revision main, ") and "the disk is full" in \
        _describe(full, "svdq/public", "model.safetensors", "main")


def test_a_download_that_does_not_match_the_hubs_hash_is_deleted(hub, tmp_path):
    from comfyui_svdquant.nodes.download import DownloadError, fetch

    data = payload(5000)
    hub.add("svdq/public", "model.safetensors", data)
    hub.claimed[("svdq/public", "model.safetensors")] = (len(data), hashlib.sha256(b"other").hexdigest())
    with pytest.raises(DownloadError, match=r"the download of 'model.safetensors' from svdq/public \(revision main\) "
                       "is corrupt .*SHA-256"):
        fetch("svdq/public", "model.safetensors", tmp_path)
    assert visible(tmp_path) == []
    del hub.claimed[("svdq/public", "model.safetensors")]
    assert fetch("svdq/public", "model.safetensors", tmp_path).read_bytes() == data  # downloaded again, not trusted


WINDOWS_AND_POSIX_ESCAPES = [
    "C:\\models\\m.safetensors", "C:m.safetensors", "c:/models/m.safetensors", "\\\\server\\share\\m.safetensors",
    "//server/share/m.safetensors", "\\m.safetensors", "..\\..\\m.safetensors", "sub\\..\\..\\m.safetensors",
    "/etc/m.safetensors", "../m.safetensors", "sub/../../m.safetensors", "sub//m.safetensors",
]


@pytest.mark.parametrize("filename", WINDOWS_AND_POSIX_ESCAPES)
def test_paths_that_leave_the_folder_are_refused_for_every_os(hub, tmp_path, filename):
    from comfyui_svdquant.nodes.download import DownloadError, SVDQuantDownloadModel, fetch

    result = SVDQuantDownloadModel.validate_inputs("svdq/public", filename, "main")
    assert isinstance(result, str) and result.startswith(f"filename '{filename}' ")
    with pytest.raises(DownloadError) as refused:
        fetch("svdq/public", filename, tmp_path / "models")
    assert str(refused.value).startswith(f"filename '{filename}' ")
    assert hub.log == [] and list(tmp_path.iterdir()) == []


def test_node_downloads_and_loads_a_checkpoint_with_progress(hub, model_folders):
    import comfy.utils
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
    shown = []  # what ComfyUI's progress bar sends to the browser
    comfy.utils.set_progress_bar_global_hook(lambda value, total, preview=None, *args, **kwargs:
                                             shown.append((value, total)))
    try:
        model, name = SVDQuantDownloadModel.execute("nunchaku-tech/nunchaku-tiny", "svdq-int4_r16-tiny.safetensors",
                                                    "main", "bfloat16", "torch").args
    finally:
        comfy.utils.set_progress_bar_global_hook(None)
    assert name == "svdq-int4_r16-tiny.safetensors"
    if progress_reported():
        assert (source.stat().st_size, source.stat().st_size) in shown  # then the loader's own bar
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
