"""Download SVDQuant Model: fetch a published SVDQuant checkpoint from Hugging Face into diffusion_models
and load it, so a user never has to leave ComfyUI.

The file is fetched with huggingface_hub's own metadata call and HTTP download (so ``HF_ENDPOINT`` mirrors,
``HF_TOKEN`` / ``hf auth login`` tokens, proxies and retries work as everywhere else), straight into the
diffusion_models folder: first into a hidden ``.<name>.<etag>.partial`` file there, renamed into place only
once complete and checked against the Hub's size and SHA-256. An interrupted download (cancelled prompt,
lost connection, ComfyUI closed) leaves the partial file, and the next run resumes it with a range request.
A file already in the folder is used as it is, without asking the Hub (so the workflow also runs offline).
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path, PurePosixPath
from typing import BinaryIO
from urllib.parse import urlsplit

import comfy.model_management
import comfy.utils
from comfy_api.latest import io

from ..svdquant.errors import SVDQuantError
from .files import save_folder, unlisted_choice
from .loader import backend_input, dtype_input, load_model

REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")
SHA256 = re.compile(r"^[0-9a-f]{64}$")
SPACE_MARGIN = 64 * 2**20  # keep this much free beyond the file itself


class DownloadError(SVDQuantError):
    """A checkpoint could not be fetched (offline, gated, not found, no space, interrupted)."""


def _offline() -> bool:
    import huggingface_hub.constants

    flag = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")
    return flag or bool(huggingface_hub.constants.HF_HUB_OFFLINE)


def _gb(size: int) -> str:
    return f"{size / 1e9:.2f} GB"


class _ProgressFile:
    """The download's file, reporting each write (progress, interruption) and passing everything else on."""

    def __init__(self, file: BinaryIO, on_write: Callable[[int], None]):
        self._file, self._on_write = file, on_write

    def write(self, data: bytes) -> int:
        written = self._file.write(data)
        self._on_write(self._file.tell())
        return written

    def __getattr__(self, name: str):  # tell, seek, truncate, flush: the file's own
        return getattr(self._file, name)


def _describe(exc: Exception, repo_id: str, filename: str, revision: str, endpoint: str) -> str:
    """What went wrong, in words a user can act on."""
    from huggingface_hub.utils import (
        EntryNotFoundError,
        GatedRepoError,
        HfHubHTTPError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    where = f"'{filename}' from {repo_id} ({endpoint})"
    token = "set" if os.environ.get("HF_TOKEN") else "not set"
    if isinstance(exc, GatedRepoError):
        return (f"{repo_id} is a gated repository: accept its conditions on its Hugging Face page with your account, "
                f"then give ComfyUI a read token (environment variable HF_TOKEN, now {token}, or `hf auth login`)")
    if isinstance(exc, RepositoryNotFoundError):
        return (f"repository {repo_id} does not exist, or is private and needs a token with access "
                f"(HF_TOKEN is {token}); check the repo id")
    if isinstance(exc, RevisionNotFoundError):
        return f"{repo_id} has no revision '{revision}' (a branch, tag or commit); 'main' is the usual one"
    if isinstance(exc, EntryNotFoundError):
        return (f"{repo_id} (revision {revision}) has no file '{filename}'; check the name on the repository's "
                "Files page")
    if isinstance(exc, OfflineModeIsEnabled):
        return f"cannot download {where}: Hugging Face offline mode is on (HF_HUB_OFFLINE)"
    if isinstance(exc, HfHubHTTPError):
        return f"the Hub refused {where}: {str(exc).splitlines()[0]}"
    return (f"cannot reach {endpoint} to download {where} ({type(exc).__name__}: {exc}); check the network "
            "connection (and HF_ENDPOINT if you use a mirror), or put the file into the diffusion_models folder "
            "yourself")


def fetch(repo_id: str, filename: str, folder: str | os.PathLike, revision: str = "main",
          progress: Callable[[int, int], None] | None = None) -> Path:
    """``filename`` of the Hugging Face repository ``repo_id`` as a file in ``folder`` (downloaded, or resumed,
    unless it is there already). ``progress(bytes done, bytes total)`` follows the download."""
    from huggingface_hub import get_hf_file_metadata, hf_hub_url
    from huggingface_hub.file_download import http_get
    from huggingface_hub.utils import build_hf_headers

    folder = Path(folder)
    target = folder / PurePosixPath(filename).name
    if target.is_file():
        return target
    endpoint = (os.environ.get("HF_ENDPOINT") or "https://huggingface.co").rstrip("/")
    if _offline():
        raise DownloadError(f"'{target.name}' is not in {folder}, and Hugging Face offline mode is on "
                            "(HF_HUB_OFFLINE): download it elsewhere and put it there, or unset HF_HUB_OFFLINE")
    url = hf_hub_url(repo_id, filename, revision=revision, endpoint=endpoint)
    try:
        meta = get_hf_file_metadata(url, endpoint=endpoint)
    except Exception as exc:  # every library and network error, turned into a sentence
        raise DownloadError(_describe(exc, repo_id, filename, revision, endpoint)) from exc
    if not meta.etag or meta.size is None:
        raise DownloadError(f"{endpoint} gave no size or version (ETag) for '{filename}' of {repo_id}: it does not "
                            "answer like the Hugging Face Hub (check HF_ENDPOINT)")
    etag = meta.etag.strip('"').removeprefix("W/").strip('"')
    partial = folder / f".{target.name}.{re.sub(r'[^0-9A-Za-z]', '', etag)[:16]}.partial"
    folder.mkdir(parents=True, exist_ok=True)
    done = partial.stat().st_size if partial.exists() else 0
    if done > meta.size:  # not a prefix of this version: start over
        partial.unlink()
        done = 0
    free = shutil.disk_usage(folder).free
    if free < meta.size - done + SPACE_MARGIN:
        raise DownloadError(f"not enough free space in {folder} for '{target.name}': it needs {_gb(meta.size - done)} "
                            f"more, {_gb(free)} is free")
    headers = build_hf_headers()  # the token from HF_TOKEN or `hf auth login`, if any
    if urlsplit(meta.location)[:2] != urlsplit(url)[:2]:
        headers.pop("authorization", None)  # the file itself comes from a CDN: the token stays with the Hub

    def written(position: int) -> None:
        if progress:
            progress(position, meta.size)
        comfy.model_management.throw_exception_if_processing_interrupted()

    try:
        if done < meta.size:  # else only the rename was missing (ComfyUI stopped right after the download)
            with open(partial, "ab") as file:
                http_get(meta.location, _ProgressFile(file, written), resume_size=done, headers=headers,
                         expected_size=meta.size, displayed_filename=target.name)
    except comfy.model_management.InterruptProcessingException:
        raise
    except Exception as exc:
        got = partial.stat().st_size if partial.exists() else 0
        raise DownloadError(f"downloading '{filename}' from {repo_id} stopped at {_gb(got)} of {_gb(meta.size)} "
                            f"({type(exc).__name__}: {exc}); run the prompt again to resume") from exc
    _check(partial, meta.size, etag, f"'{filename}' from {repo_id}")
    os.replace(partial, target)
    return target


def _check(path: Path, size: int, etag: str, what: str) -> None:
    """The Hub's ETag of a large (LFS) file is its SHA-256: a resumed download must hash to it."""
    got = path.stat().st_size
    problem = f"has {got} bytes, the Hub says {size}" if got != size else None
    if problem is None and SHA256.match(etag):
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            while chunk := f.read(2**24):
                digest.update(chunk)
        if digest.hexdigest() != etag:
            problem = f"has SHA-256 {digest.hexdigest()[:12]}…, the Hub says {etag[:12]}…"
    if problem:
        path.unlink()
        raise DownloadError(f"the download of {what} is corrupt ({problem}); it was deleted, run the prompt again")


class SVDQuantDownloadModel(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="SVDQuantDownloadModel",
            display_name="Download SVDQuant Model",
            category="loaders/SVDQuant",
            description="Downloads an SVDQuant checkpoint from Hugging Face into models/diffusion_models (unless it "
                        "is there already) and loads it like Load SVDQuant Model. Resumes an interrupted download. "
                        "Gated or private repositories need a token: set HF_TOKEN before starting ComfyUI, or run "
                        "`hf auth login`. HF_ENDPOINT selects a mirror.",
            inputs=[
                io.String.Input("repo_id", default="nunchaku-tech/nunchaku-flux.1-dev",
                                tooltip="The Hugging Face repository, owner/name (e.g. "
                                        "nunchaku-tech/nunchaku-flux.1-dev, nunchaku-tech/nunchaku-flux.1-schnell, "
                                        "nunchaku-tech/nunchaku-sdxl)."),
                io.String.Input("filename", default="svdq-int4_r32-flux.1-dev.safetensors",
                                tooltip="The .safetensors file in that repository: svdq-int4_r32-* for NVIDIA GPUs "
                                        "before Blackwell, svdq-fp4_r32-* for Blackwell (RTX 50xx, B200)."),
                io.String.Input("revision", default="main", tooltip="Branch, tag or commit of the repository."),
                dtype_input(),
                backend_input(),
            ],
            outputs=[io.Model.Output(),
                     io.String.Output(display_name="model_name",
                                      tooltip="The file's name in diffusion_models, for Load SVDQuant Model.")],
        )

    @classmethod
    def validate_inputs(cls, repo_id: str, filename: str, revision: str, compute_dtype: str = "auto",
                        kernel_backend: str = "auto") -> bool | str:
        if repo_id is not None and not REPO_ID.match(repo_id.strip()):
            return f"repo_id '{repo_id}' is not a Hugging Face repository id (owner/name)"
        if filename is not None:
            name = PurePosixPath(filename.strip())
            if not name.name.endswith(".safetensors") or name.is_absolute() or ".." in name.parts:
                return (f"filename '{filename}': give the path of a .safetensors file inside the repository "
                        "(SVDQuant loads only .safetensors files)")
        if revision is not None and not revision.strip():
            return "revision is empty: use main, a tag or a commit"
        return unlisted_choice(cls, compute_dtype=compute_dtype, kernel_backend=kernel_backend) or True

    @classmethod
    def execute(cls, repo_id: str, filename: str, revision: str = "main", compute_dtype: str = "auto",
                kernel_backend: str = "auto") -> io.NodeOutput:
        folder = save_folder()
        bar = comfy.utils.ProgressBar(100)
        path = fetch(repo_id.strip(), filename.strip(), folder, revision.strip() or "main",
                     progress=lambda done, total: bar.update_absolute(done, total))
        return io.NodeOutput(load_model(str(path), compute_dtype, kernel_backend), path.name)
