"""The model config of an SVDQuant model, derived by ComfyUI's own model detection.

ComfyUI decides a model's config from its tensors (``comfy.model_detection.detect_unet_config``), and every
version adds fields its model classes need (FLUX gained ``txt_ids_dims`` in v0.8). So the pack never writes
a config by hand: it shows ComfyUI a state dict of shapes only (meta tensors, ComfyUI's key names, the
4-bit layers at their logical (out, in) shape) and takes the config ComfyUI derives, with the running
version's fields. Two things are then settled by the tensors, as they decide everything in this pack:
- fields that an older ComfyUI fixes instead of reading (v0.3.x takes FLUX's width as 3072 whatever
  ``img_in`` says), corrected by the architecture (``fit_config``); real FLUX.1 and SDXL files need no
  correction on any supported version;
- the model class: ComfyUI's own match (``supported_models``), else, for shapes its table does not list
  (small test models), the architecture's class for the family.
"""

from __future__ import annotations

from collections.abc import Mapping

import comfy.model_detection
import comfy.supported_models
import torch

from ..svdquant.errors import SVDQuantError


def meta_shapes(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``tensors`` as shape-only meta tensors (no memory)."""
    return {k: torch.empty(tuple(t.shape), dtype=t.dtype, device="meta") for k, t in tensors.items()}


def model_config(architecture, shapes: Mapping[str, torch.Tensor], hint: dict | None = None):
    """ComfyUI's model config (a ``supported_models`` instance) for a diffusion model with these
    parameter ``shapes``. ``hint``: what a file's metadata says, used only where the tensors cannot tell."""
    detected = comfy.model_detection.detect_unet_config(dict(shapes), "")
    if detected is None:
        raise SVDQuantError(f"this ComfyUI does not recognise the {architecture.label} model's tensors "
                            "(comfy.model_detection found no model); is ComfyUI older than the pack supports?")
    unet_config = architecture.fit_config(dict(detected), shapes, hint or {})
    for candidate in comfy.supported_models.models:
        if candidate.matches(unet_config, dict(shapes)) and architecture.accepts(candidate):
            return candidate(unet_config)
    return architecture.config_class(unet_config)(unet_config)
