"""Which files the loader offers: everything in ComfyUI's ``diffusion_models`` folders, with a folder
checkpoint (``transformer_blocks.safetensors`` + ``unquantized_layers.safetensors``) offered as its
folder. Bad files stay listed so that picking one gives a message that says what is wrong with it.

Also the check every V3 node of the pack needs for its dropdowns: ComfyUI (v0.3.x) checks a V1 combo
value against its option list but not a V3 ``io.Combo`` value, and it skips its own checks for every
input a node's ``validate_inputs`` takes; so the node checks them itself, with :func:`unlisted_choice`.
"""

from __future__ import annotations

import functools
import os

import folder_paths
from comfy_api.latest import io
from safetensors import safe_open

from ..svdquant.checkpoint import holds_svdquant
from ..svdquant.errors import CheckpointError

FOLDER = "diffusion_models"
_FOLDER_MARK = "transformer_blocks.safetensors"


def checkpoint_names() -> list[str]:
    """SVDQuant checkpoints first (so a new loader node starts on one), then the folder's other files."""
    names = set()
    for name in folder_paths.get_filename_list(FOLDER):
        if os.path.basename(name) == _FOLDER_MARK:
            names.add(os.path.dirname(name) + "/")
        elif os.path.basename(name) != "unquantized_layers.safetensors":
            names.add(name)
    return sorted(names, key=lambda name: (not is_svdquant(name), name))


def is_svdquant(name: str) -> bool:
    """Whether a listed file holds SVDQuant layers, from its header only (cached per file size and time)."""
    if name.endswith("/"):
        return True
    try:
        path = folder_paths.get_full_path_or_raise(FOLDER, name)
        stat = os.stat(path)
    except (FileNotFoundError, OSError):
        return False
    return _has_svdquant_layers(path, stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=1024)
def _has_svdquant_layers(path: str, size: int, mtime: int) -> bool:
    try:
        with safe_open(path, "pt") as f:
            return holds_svdquant(f.metadata() or {}, f.keys())
    except Exception:  # not a safetensors file, or a broken one: listed after, and loading it says what is wrong
        return False


def checkpoint_path(name: str) -> str:
    """Full path of a listed name; a :class:`CheckpointError` naming it if it is not (or no longer) there."""
    try:
        if name.endswith("/"):
            return os.path.dirname(folder_paths.get_full_path_or_raise(FOLDER, name + _FOLDER_MARK))
        return folder_paths.get_full_path_or_raise(FOLDER, name)
    except FileNotFoundError:
        raise CheckpointError(name, f"not found in the {FOLDER} folder(s): "
                              f"{', '.join(folder_paths.get_folder_paths(FOLDER))}") from None


def save_folder() -> str:
    """Where new checkpoints go: the diffusion_models folder itself (ComfyUI lists the legacy models/unet
    first, and extra_model_paths.yaml may add more)."""
    paths = folder_paths.get_folder_paths(FOLDER)
    return next((p for p in paths if os.path.basename(os.path.normpath(p)) == FOLDER), paths[0])


def fingerprint(name: str) -> tuple:
    """Changes when the named checkpoint is replaced on disk (re-downloaded, re-quantized), so ComfyUI
    reloads it instead of reusing the model it cached for the same name."""
    try:
        path = checkpoint_path(name)
    except CheckpointError:
        return (name, None)
    files = [os.path.join(path, f) for f in sorted(os.listdir(path))] if os.path.isdir(path) else [path]
    return (name,) + tuple((os.path.basename(f), os.stat(f).st_size, os.stat(f).st_mtime_ns)
                           for f in files if os.path.isfile(f))


def unlisted_choice(node: type[io.ComfyNode], **values: object) -> str | None:
    """A message naming every value that is not among its dropdown's options, else None. Values that come
    through a link are None while the prompt is validated and are skipped. (ComfyUI shows the message on each
    input the node's validate_inputs names, so it names them all: the second missing LoRA is not hidden.)"""
    # FINALIZE_SCHEMA, not GET_SCHEMA: ComfyUI validates on a locked copy of the class, and GET_SCHEMA sets SCHEMA.
    problems = []
    for item in node.FINALIZE_SCHEMA().inputs or []:
        if not isinstance(item, io.Combo.Input) or values.get(item.id) is None:
            continue
        if values[item.id] not in item.options:
            shown = ", ".join(map(str, item.options[:10])) + (", ..." if len(item.options) > 10 else "")
            problems.append(f"{item.id}: '{values[item.id]}' is not one of the choices ({shown or 'there are none'})")
    return "; ".join(problems) or None
