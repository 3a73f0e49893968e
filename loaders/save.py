"""ComfyUI model → SVDQuant checkpoint file, in the published layout (see :mod:`.flux`)."""

from __future__ import annotations

import os

import torch
from torch import nn

from ..svdquant.checkpoint import PYTHON_NAMES, QuantizationInfo, write_checkpoint
from ..svdquant.errors import SVDQuantError
from ..svdquant.layers import W4A4Linear
from . import dense_layers, parts
from .architecture import all_layers
from .load import architecture_of


def checkpoint_tensors(diffusion_model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors and metadata of the checkpoint that stores ``diffusion_model``."""
    found = architecture_of(diffusion_model)
    if found is None:
        raise SVDQuantError(f"{type(diffusion_model).__name__} is not a model family this pack can save")
    architecture, unet_config = found
    bodies, kept = [], []
    leaves: list[W4A4Linear] = []
    for layer in all_layers(architecture.blocks(unet_config)):
        op = diffusion_model.get_submodule(layer.module)
        if getattr(op, "quantized", None) is None:  # kept 16-bit (see :mod:`.dense_layers`)
            kept.append((layer, op.weight.detach(), None if op.bias is None else op.bias.detach()))
            continue
        bodies.append((layer, op.quantized))
        leaves += [m for m in parts.quantized_modules(op.quantized) if isinstance(m, W4A4Linear)]
    if not leaves:
        raise SVDQuantError("the model has no SVDQuant layers; quantize it before saving it")
    tensors = parts.checkpoint_tensors(bodies)
    precisions, ranks = {m.precision for m in leaves}, {m.rank for m in leaves}
    if len(precisions) != 1 or len(ranks) != 1:
        raise SVDQuantError(f"a checkpoint holds one precision and one rank; this model mixes {sorted(precisions)} "
                            f"and ranks {sorted(ranks)}")
    storage = leaves[0].smooth_factor.dtype
    tensors.update({k: v.to(storage) for k, v in dense_layers.dense_tensors(kept).items()})
    for comfy_key, file_key in architecture.dense_key_map(unet_config).items():
        tensor = diffusion_model.get_parameter(comfy_key).detach()
        tensor = architecture.convert_dense(comfy_key, tensor, to_file=True)
        tensors[file_key] = tensor.to(storage) if tensor.is_floating_point() else tensor
    if architecture.python_leaf_names:
        tensors = {_python_leaf(k): v for k, v in tensors.items()}
    metadata = architecture.metadata(unet_config, QuantizationInfo(precisions.pop(), ranks.pop()))
    return tensors, metadata


def _python_leaf(key: str) -> str:
    """``key`` with its leaf spelled as nunchaku's python modules name their parameters (``proj_down`` …)."""
    prefix, dot, leaf = key.rpartition(".")
    return prefix + dot + PYTHON_NAMES.get(leaf, leaf)


def save_checkpoint(diffusion_model: nn.Module, path: str | os.PathLike,
                    extra_metadata: dict[str, str] | None = None) -> None:
    """Write ``diffusion_model`` (ComfyUI's own model class with SVDQuant layers) to ``path`` atomically."""
    tensors, metadata = checkpoint_tensors(diffusion_model)
    metadata.update(extra_metadata or {})
    write_checkpoint(path, tensors, metadata)
