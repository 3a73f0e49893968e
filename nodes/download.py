"""Download SVDQuant Model: fetch a published SVDQuant checkpoint from Hugging Face into diffusion_models
and load it, so a user never has to leave ComfyUI.

The file is downloaded by huggingface_hub's ``hf_hub_download`` into the diffusion_models folder (its
``local_dir`` mode: the repository's path below that folder, the library's notes in ``.cache/huggingface``
there), so the library's endpoint (``HF_ENDPOINT``), token (``HF_TOKEN``, ``hf auth login``), offline mode
(``HF_HUB_OFFLINE``), proxies, retries, resumption of a dropped connection and size check apply as everywhere
else. The node adds what the library does not know: which repository and revision a file in the folder came
from (:mod:`.download_record`), so a file is reused only when it is the one asked for, and a file of the
same name put there by hand is neither taken for it nor overwritten; and it checks a new download against
the Hub's SHA-256, which the library does not do for an HTTP download.
"""

from __future__ import annotations

import errno
import inspect
import logging
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import comfy.model_management
import comfy.utils
from comfy_api.latest import io

from ..svdquant.errors import SVDQuantError
from .download_record import Source, read_source, write_source
from .files import save_folder, unlisted_choice
from .loader import backend_input, dtype_input, load_model

log = logging.getLogger(__name__)

REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")
SHA256 = re.compile(r"^[0-9a-f]{64}$")
SPACE_MARGIN = 64 * 2**20  # keep this much free beyond the file itself


class DownloadError(SVDQuantError):
    """A checkpoint could not be fetched (offline, gated, not found, no space, interrupted)."""


def repo_path_problem(filename: str) -> str | None:
    """Why ``filename`` is not a plain path inside a repository on every OS, or None. A path that is absolute
    or leaves the folder (POSIX ``/x``, ``../x``; Windows ``C:\\x``, ``C:x``, ``\\\\server\\x``,
    ``..\\x``) would put the download outside diffusion_models."""
    parts = filename.split("/")
    if not filename:
        return "is empty"
    if "\\" in filename:
        return "contains a backslash (Windows reads it as a folder separator); the Hub separates folders with /"
    if ":" in filename:
        return "contains ':' (a Windows drive letter or file stream)"
    if filename.startswith("/"):
        return "is an absolute path"
    if ".." in parts:
        return "has a '..' part, which leaves the folder"
    if "" in parts or any(ord(c) < 32 for c in filename):
        return "is not a file path (an empty folder name, a trailing / or a control character)"
    return None


def _gb(size: int) -> str:
    return f"{size / 1e9:.2f} GB"


def _describe(exc: BaseException, repo_id: str, filename: str, revision: str) -> str:
    """What went wrong, in words a user can act on, naming the repository and the file."""
    from huggingface_hub import constants, get_token
    from huggingface_hub.utils import (
        EntryNotFoundError,
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    where = f"'{filename}' from {repo_id} (revision {revision}, {constants.ENDPOINT})"
    token = "a token is set" if get_token() else "no token is set"
    if isinstance(exc, GatedRepoError):
        return (f"cannot download {where}: {repo_id} is a gated repository: accept its conditions on its Hugging "
                f"Face page with your account, then give ComfyUI a read token (environment variable HF_TOKEN, or "
                f"`hf auth login`; now {token})")
    if isinstance(exc, RepositoryNotFoundError):
        return (f"cannot download {where}: repository {repo_id} does not exist, or is private and needs a token "
                f"with access ({token}); check the repo id")
    if isinstance(exc, RevisionNotFoundError):
        return f"cannot download {where}: {repo_id} has no revision '{revision}' (a branch, tag or commit)"
    if isinstance(exc, EntryNotFoundError) and not isinstance(exc, LocalEntryNotFoundError):
        return (f"cannot download {where}: {repo_id} has no file '{filename}' at revision {revision}; check the "
                "name on the repository's Files page")
    if isinstance(exc, OfflineModeIsEnabled) or (isinstance(exc, LocalEntryNotFoundError) and constants.HF_HUB_OFFLINE):
        return (f"cannot download {where}: Hugging Face offline mode is on (HF_HUB_OFFLINE); unset it, or download "
                "the file once while online")
    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
        return f"cannot download {where}: the disk is full ({exc})"
    if isinstance(exc, HfHubHTTPError):
        return f"the Hub refused {where}: {str(exc).splitlines()[0]}"
    return (f"cannot download {where}: the Hub did not answer ({type(exc).__name__}: {exc}); check the network "
            "connection (and HF_ENDPOINT if you use a mirror)")


def _progress_bars(report: Callable[[int, int], None]) -> dict:
    """``tqdm_class`` for hf_hub_download: its console bar, also calling ``report(bytes done, bytes total)``.
    Empty for a huggingface_hub before 1.1, which has no such argument (the console bar only)."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.utils import tqdm

    if "tqdm_class" not in inspect.signature(hf_hub_download).parameters:
        return {}

    class Reporting(tqdm):
        def __init__(self, *args, **kwargs):
            # a Xet download also shows the bytes received ("<name>.transfer", compressed and deduplicated): the
            # bytes written are the ones that add up to the file
            self.reports = not str(kwargs.get("name") or "").endswith(".transfer")
            super().__init__(*args, **kwargs)
            # counted here: a bar the library disables (no terminal, HF_HUB_DISABLE_PROGRESS_BARS) counts nothing
            self.done, self.size = kwargs.get("initial") or 0, kwargs.get("total") or 0

        def update(self, n: float | None = 1) -> bool | None:
            shown = super().update(n)
            self.done += n or 0
            if self.reports:
                report(int(self.done), self.size)
            return shown

    return {"tqdm_class": Reporting}


def fetch(repo_id: str, filename: str, folder: str | os.PathLike, revision: str = "main",
          progress: Callable[[int, int], None] | None = None) -> Path:
    """``filename`` of the Hugging Face repository ``repo_id`` at ``revision``, as a file below ``folder``
    (the repository's path inside it): downloaded, unless the file there is recorded as that very download.
    ``progress(bytes done, bytes total)`` follows the download; ComfyUI's Cancel stops it."""
    from huggingface_hub import constants, get_hf_file_metadata, hf_hub_download, hf_hub_url
    from huggingface_hub.utils import OfflineModeIsEnabled

    if problem := repo_path_problem(filename):
        raise DownloadError(f"filename '{filename}' {problem}")
    folder = Path(folder)
    target = folder.joinpath(*filename.split("/"))
    source = read_source(folder, filename)
    asked = source is not None and source.is_of(repo_id, filename, revision)
    if asked and (revision == source.commit or constants.HF_HUB_OFFLINE):
        return target  # a commit never changes; offline, the recorded download is the one asked for
    try:  # what the Hub has now (and whether it answers at all), before anything on disk is touched
        if constants.HF_HUB_OFFLINE:  # (huggingface_hub before 1.0 reads the flag once per session)
            raise OfflineModeIsEnabled("HF_HUB_OFFLINE is set")
        meta = get_hf_file_metadata(hf_hub_url(repo_id, filename, revision=revision))
    except Exception as exc:
        if asked:
            log.warning("SVDQuant: using %s as downloaded from %s at %s (commit %s); could not ask the Hub for a "
                        "newer one: %s", target, repo_id, revision, source.commit[:12], exc)
            return target
        raise DownloadError(_unrecorded(target, folder) + _describe(exc, repo_id, filename, revision)) from exc
    if meta.size is None or not meta.etag or not meta.commit_hash:
        raise DownloadError(f"{constants.ENDPOINT} gave no size, ETag or commit for '{filename}' from {repo_id}: it "
                            "does not answer like the Hugging Face Hub (check HF_ENDPOINT)")
    _check_room(target, folder, source, meta.size, f"'{filename}' from {repo_id}")

    def written(done: int, total: int) -> None:
        if progress:
            progress(done, total)
        comfy.model_management.throw_exception_if_processing_interrupted()

    before = _identity(target)
    try:
        hf_hub_download(repo_id, filename, revision=revision, local_dir=folder, **_progress_bars(written))
    except comfy.model_management.InterruptProcessingException:
        raise
    except Exception as exc:  # every library and network error, turned into a sentence
        raise DownloadError(_describe(exc, repo_id, filename, revision)) from exc
    if _identity(target) != before:
        _verify(target, meta.etag, f"'{filename}' from {repo_id} (revision {revision})")
    write_source(folder, repo_id, filename, revision, meta.commit_hash, meta.etag)
    return target


def _identity(path: Path) -> tuple[int, int] | None:
    try:
        stat = path.stat()
    except FileNotFoundError:
        return None
    return stat.st_size, stat.st_mtime_ns


def _verify(path: Path, etag: str, what: str) -> None:
    """huggingface_hub checks a file it downloads over HTTP for its size only; the ETag of a large (LFS) file
    is its SHA-256, so a new download is checked against it too (a corrupt file would otherwise be reused)."""
    from huggingface_hub.utils.sha import sha_fileobj

    if not SHA256.match(etag):
        return
    with open(path, "rb") as file:
        digest = sha_fileobj(file).hex()
    if digest != etag:
        path.unlink()  # and without the file, the library's own note on it is void
        raise DownloadError(f"the download of {what} is corrupt (SHA-256 {digest[:12]}…, the Hub says "
                            f"{etag[:12]}…); it was deleted, run the prompt again")


def _unrecorded(target: Path, folder: Path) -> str:
    """For an error: a file of the name that is there, but not as the download asked for."""
    if not target.is_file():
        return ""
    return (f"'{target.relative_to(folder).as_posix()}' in {folder} is not recorded as this download, so it is "
            "not used; ")


def _check_room(target: Path, folder: Path, source: Source | None, size: int, what: str) -> None:
    """Refuse, before downloading, a download that cannot fit, or one that would overwrite a file it does
    not know. huggingface_hub replaces a file whose contents differ from the Hub's: fine for this node's
    earlier download (another repository or revision), not for a file put there by hand, unless it has the
    Hub's size: the library then compares its SHA-256, keeps it if it matches and replaces a damaged copy."""
    have = target.stat().st_size if target.is_file() else 0
    if target.is_file() and source is None and have != size:
        raise DownloadError(f"a different '{target.name}' ({_gb(have)}) is already in {target.parent}, not "
                            f"downloaded by this node; {what} is {_gb(size)}. Move or rename that file (or load it "
                            "with Load SVDQuant Model)")
    folder.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(folder).free
    if free < size - have + SPACE_MARGIN:  # the library removes the outdated file before downloading
        raise DownloadError(f"not enough free space in {folder} for {what}: it needs {_gb(size - have)} "
                            f"more, {_gb(free)} is free")


class SVDQuantDownloadModel(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="SVDQuantDownloadModel",
            display_name="Download SVDQuant Model",
            category="loaders/SVDQuant",
            description="Downloads an SVDQuant checkpoint from Hugging Face into models/diffusion_models (unless "
                        "this node downloaded that file from the same repository and revision before) and loads it "
                        "like Load SVDQuant Model. A dropped connection is resumed where it stopped. Gated or "
                        "private repositories need a token: set HF_TOKEN before starting ComfyUI, or run "
                        "`hf auth login`. HF_ENDPOINT selects a mirror; with HF_HUB_OFFLINE=1 only an earlier "
                        "download is used.",
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
            if problem := repo_path_problem(filename.strip()):
                return (f"filename '{filename}' {problem}: give the path of a .safetensors file inside the "
                        "repository, folders separated by /")
            if not filename.strip().endswith(".safetensors"):
                return f"filename '{filename}': SVDQuant loads only .safetensors files"
        if revision is not None and not revision.strip():
            return "revision is empty: use main, a tag or a commit"
        return unlisted_choice(cls, compute_dtype=compute_dtype, kernel_backend=kernel_backend) or True

    @classmethod
    def execute(cls, repo_id: str, filename: str, revision: str = "main", compute_dtype: str = "auto",
                kernel_backend: str = "auto") -> io.NodeOutput:
        folder = save_folder()
        bar = comfy.utils.ProgressBar(100)
        filename = filename.strip()
        path = fetch(repo_id.strip(), filename, folder, revision.strip() or "main",
                     progress=lambda done, total: bar.update_absolute(done, total))
        # the name as the loader lists it: the repository's path inside diffusion_models, in the OS's form
        return io.NodeOutput(load_model(str(path), compute_dtype, kernel_backend), os.path.join(*filename.split("/")))
