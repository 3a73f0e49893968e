"""Download SVDQuant Model against a local Hugging Face Hub (local_hub.LocalHub: the Hub and its CDN on
127.0.0.1, answering as huggingface.co does). Nothing of huggingface_hub is replaced: the real client
(hf_hub_download) talks HTTP to these servers; the fixture only points the library's settings, read once at
its import, at them (endpoint, offline flag, cache)."""

from __future__ import annotations

import hashlib
import json
import threading
from http.server import ThreadingHTTPServer

import pytest
from local_hub import CHUNK, COMMIT, DENIED, GRANTED, LocalHub

from conftest import validation_errors


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


def test_a_download_replaced_by_hand_afterwards_is_no_longer_taken_for_it(hub, tmp_path, monkeypatch):
    from comfyui_svdquant.nodes.download import DownloadError, fetch

    hub.add("svdq/public", "model.safetensors", payload(5000))
    path = fetch("svdq/public", "model.safetensors", tmp_path)
    path.write_bytes(b"re-quantized by hand")  # the record describes the file as it was downloaded
    go_offline(monkeypatch)
    with pytest.raises(DownloadError, match="is not recorded as this download"):
        fetch("svdq/public", "model.safetensors", tmp_path)
    go_offline(monkeypatch, False)
    with pytest.raises(DownloadError, match="a different 'model.safetensors' .* not downloaded by this node"):
        fetch("svdq/public", "model.safetensors", tmp_path)
    assert path.read_bytes() == b"re-quantized by hand"


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


def test_a_xet_download_reports_the_bytes_written_not_those_received(comfy):
    """Files on Xet storage come through hf_xet, whose progress huggingface_hub's reporter turns into two bars
    (written, received); this drives that reporter as hf_xet does, with the node's bar class."""
    import logging
    from types import SimpleNamespace

    from comfyui_svdquant.nodes.download import _progress_bars

    needs_progress_reports()
    reporter = pytest.importorskip("huggingface_hub.utils._xet_progress_reporting").XetDownloadProgressReporter
    seen = []
    bars = _progress_bars(lambda done, total: seen.append((done, total)))["tqdm_class"]
    with reporter(reconstruction_desc="model: reconstructing file", transfer_desc="model: downloading bytes",
                  total=1000, log_level=logging.INFO, name="huggingface_hub.xet_get", tqdm_class=bars) as progress:
        for written, received in ((300, 100), (1000, 350)):
            progress.update_progress(SimpleNamespace(
                total_bytes_completed=written, total_transfer_bytes_completed=received, total_bytes=1000,
                total_bytes_completion_rate=None, total_transfer_bytes_completion_rate=None))
    assert seen == [(300, 1000), (1000, 1000)]


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
