"""Where a downloaded checkpoint came from, recorded beside it, so that Download SVDQuant Model reuses a file
only when it is the one asked for.

huggingface_hub keeps its own notes on a file downloaded into a folder (``.cache/huggingface/download/``):
the commit and ETag, but neither the repository nor the revision that was asked for, and offline it hands
back whatever file has the name. So the node writes a small JSON record of its own next to those,
``.cache/svdquant/download/<filename>.json`` in the same folder, with the repository, revision, commit and
ETag, and the file's size and modification time (a file replaced by hand afterwards no longer matches).
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path

log = logging.getLogger(__name__)

RECORD_DIR = (".cache", "svdquant", "download")


@dataclass(frozen=True)
class Source:
    repo_id: str
    filename: str
    revision: str  # as asked for: a branch, tag or commit
    commit: str  # the commit the file was downloaded from
    etag: str  # the Hub's ETag: the SHA-256 of a large (LFS) file
    size: int
    mtime_ns: int

    def is_of(self, repo_id: str, filename: str, revision: str) -> bool:
        """Whether this is the download of ``filename`` from ``repo_id`` at ``revision`` (the branch or tag
        asked for then, or the commit it resolved to)."""
        return (self.repo_id, self.filename) == (repo_id, filename) and revision in (self.revision, self.commit)

    def describes(self, path: Path) -> bool:
        """Whether ``path`` is still the file that was downloaded (not removed or replaced since)."""
        try:
            stat = path.stat()
        except OSError:
            return False
        return path.is_file() and (stat.st_size, stat.st_mtime_ns) == (self.size, self.mtime_ns)


def record_path(folder: Path, filename: str) -> Path:
    *subfolders, name = filename.split("/")
    return folder.joinpath(*RECORD_DIR, *subfolders, name + ".json")


def read_source(folder: Path, filename: str) -> Source | None:
    """The record of ``filename`` in ``folder``, if it is there and still describes the file."""
    path = record_path(folder, filename)
    try:
        source = Source(**json.loads(path.read_text(encoding="utf-8")))
    except FileNotFoundError:
        return None
    except (OSError, ValueError, TypeError) as exc:  # unreadable or from another version: as if there were none
        log.warning("SVDQuant: ignoring the download record %s (%s)", path, exc)
        return None
    return source if source.describes(folder.joinpath(*filename.split("/"))) else None


def write_source(folder: Path, repo_id: str, filename: str, revision: str, commit: str, etag: str) -> Source:
    """Record that ``filename`` in ``folder`` is now the download of ``repo_id`` at ``revision``."""
    stat = folder.joinpath(*filename.split("/")).stat()
    source = Source(repo_id, filename, revision, commit, etag, stat.st_size, stat.st_mtime_ns)
    path = record_path(folder, filename)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".tmp")
    partial.write_text(json.dumps(asdict(source), indent=1), encoding="utf-8")
    os.replace(partial, path)  # a record is either the old one or the new one, never half written
    return source
