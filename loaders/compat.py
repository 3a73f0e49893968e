"""Where ComfyUI versions differ, in one place (supported: v0.3.64 through v0.33; docs/COMPATIBILITY.md).

Everything else in the pack uses ComfyUI's interfaces that are the same in every supported version.
"""

from __future__ import annotations

import functools

import comfy.ldm.flux.layers
import comfy.model_patcher
import comfy.ops

from ..svdquant.errors import SVDQuantError

# The oldest ComfyUI the pack runs on: V3 nodes (comfy_api.latest) and the weight adapters it reads.
MINIMUM = (0, 3, 64)


def version() -> tuple[int, ...] | None:
    """The running ComfyUI's version, or None where it cannot be read (a tree without comfyui_version.py)."""
    try:
        from comfyui_version import __version__
    except ImportError:
        return None
    try:
        return tuple(int(p) for p in __version__.split(".")[:3])
    except ValueError:
        return None


def check_version() -> None:
    """A clear message, not a traceback deep in the loader, on a ComfyUI older than :data:`MINIMUM`."""
    found = version()
    if found is not None and found < MINIMUM:
        raise SVDQuantError(f"this pack needs ComfyUI {'.'.join(map(str, MINIMUM))} or newer; this is "
                            f"{'.'.join(map(str, found))}. Update ComfyUI (git pull, or the ComfyUI Manager).")
    try:
        import comfy.weight_adapter  # noqa: F401  (added in v0.3.3x: the LoRA adapters the pack reads)
        from comfy_api.latest import io  # noqa: F401
    except ImportError as exc:
        raise SVDQuantError(f"this ComfyUI lacks {exc.name}, which the pack needs: update ComfyUI to "
                            f"{'.'.join(map(str, MINIMUM))} or newer") from None


def checks_v3_dropdowns() -> bool:
    """Whether ComfyUI checks a V3 ``io.Combo`` value against its options when a prompt is queued (v0.8.0 does,
    v0.3.64 does not; versions in between are treated as not checking). Where it does not, a node checks its
    dropdowns in ``validate_inputs`` and ComfyUI then repeats its message on every input that function names."""
    found = version()
    return found is not None and found >= (0, 8, 0)


def lowvram_patch(op) -> comfy.model_patcher.LowVramPatch | None:
    """The patches ComfyUI attached to a layer it streams: in ``weight_function`` (classic low-VRAM mode)
    or, with dynamic VRAM (v0.33+), in ``weight_lowvram_function``."""
    dynamic = getattr(op, "weight_lowvram_function", None)
    if isinstance(dynamic, comfy.model_patcher.LowVramPatch):
        return dynamic
    for f in op.weight_function:
        if isinstance(f, comfy.model_patcher.LowVramPatch):
            return f
    return None


@functools.cache
def flux_norm_leaf() -> str:
    """The parameter name of FLUX's q/k RMSNorm in this ComfyUI: ``scale`` in v0.3.64 and v0.8, ``weight`` in
    v0.33, whose RMSNorm is torch's (files keep ``scale``; ComfyUI renames it at load)."""
    norm = comfy.ldm.flux.layers.QKNorm(8, device="meta", operations=comfy.ops.disable_weight_init)
    return next(name for name, _ in norm.named_parameters()).rpartition(".")[2]
