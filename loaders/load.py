"""Checkpoint file → ComfyUI model: ComfyUI's own model class, built with SVDQuant operations.

Every tensor is read once from the memory-mapped file and assigned to its module (no second copy).
Anything wrong with the file raises a :class:`CheckpointError` naming the file and the tensor
before the model is returned; nothing is registered with ComfyUI until loading has succeeded.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable

import comfy.model_management
import torch
from torch import nn

from ..kernels import enable as enable_kernels
from ..kernels.backend import path_summary
from ..svdquant.checkpoint import CheckpointReader, holds_svdquant, layer_names
from ..svdquant.errors import CheckpointError, SVDQuantError
from ..svdquant.layers import SIXTEEN_BIT
from . import dense_layers, detection, parts
from .architecture import Architecture, all_layers
from .compat import check_version
from .flux import FluxArchitecture
from .ops import SVDQuantOps
from .patcher import SVDQuantModelPatcher
from .qwen_image import QwenImageArchitecture
from .sdxl import SDXLArchitecture
from .zimage import ZImageArchitecture

log = logging.getLogger(__name__)

ARCHITECTURES: list[Architecture] = [
    FluxArchitecture(), FluxArchitecture("python"), SDXLArchitecture(), QwenImageArchitecture(), ZImageArchitecture(),
]


def register(architecture: Architecture) -> None:
    if all(a.name != architecture.name for a in ARCHITECTURES):
        ARCHITECTURES.append(architecture)


def detect(reader: CheckpointReader) -> Architecture:
    for architecture in ARCHITECTURES:
        if architecture.detect(reader):
            return architecture
    model_class = reader.metadata.get("model_class")
    known = ", ".join(dict.fromkeys(a.name for a in ARCHITECTURES))
    if model_class:
        raise CheckpointError(reader.path, f"model_class {model_class!r} is not a model this pack loads ({known})")
    raise CheckpointError(reader.path, f"no {known} layers found: this is not an SVDQuant checkpoint of a supported "
                          "model")


def architecture_of(diffusion_model: nn.Module) -> tuple[Architecture, dict] | None:
    for architecture in ARCHITECTURES:
        config = architecture.architecture_of(diffusion_model)
        if config is not None:
            return architecture, config
    return None


def resolve_dtype(choice: str, file_dtype: torch.dtype, device: torch.device) -> torch.dtype:
    if choice == "bfloat16":
        return torch.bfloat16
    if choice == "float16":
        return torch.float16
    if choice != "auto":
        raise SVDQuantError(f"compute dtype {choice!r}: expected auto, bfloat16 or float16")
    if file_dtype == torch.bfloat16 and comfy.model_management.should_use_bf16(device):
        return torch.bfloat16
    return torch.float16 if device.type == "cuda" else torch.bfloat16


def checkpoint_shapes(architecture: Architecture, reader: CheckpointReader, unet_config: dict) -> dict:
    """The diffusion model's parameters as ComfyUI names them, shapes only (meta tensors): 16-bit tensors as
    the file stores them, each quantized Linear at its logical (out, in) shape."""
    def meta(shape) -> torch.Tensor:
        return torch.empty(tuple(shape), device="meta")

    shapes = {comfy_key: meta(reader.shape(file_key))
              for comfy_key, file_key in architecture.dense_key_map(unet_config).items() if file_key in reader}
    for layer in all_layers(architecture.blocks(unet_config)):
        shapes[f"{layer.module}.weight"] = meta((layer.out_features, layer.in_features))
        if all(p.has_bias and not p.rows and f"{p.prefix}.bias" in reader for p in layer.parts):
            shapes[f"{layer.module}.bias"] = meta((layer.out_features,))
    return shapes


def stored_dtype(reader: CheckpointReader, quantized: list) -> torch.dtype:
    """The 16-bit dtype of the file's quantized layers: that of a W4A4 layer's smoothing factors or a
    W4A16 layer's scales (NVFP4 weight scales are fp8, so they cannot tell)."""
    for layer in quantized:
        for part in layer.parts:
            names = layer_names(part.prefix, reader.keys)
            for name in ("smooth_factor", "wscales"):
                if name in names and reader.dtype(names[name]) in SIXTEEN_BIT:
                    return reader.dtype(names[name])
    return torch.bfloat16


def build_config(model_config, dtype: torch.dtype):
    """``model_config`` set to build its model (``get_model``) in ``dtype`` with SVDQuant operations."""
    model_config.set_inference_dtype(dtype, None)
    model_config.custom_operations = SVDQuantOps
    return model_config


def load_checkpoint(path: str | os.PathLike, dtype: str = "auto", kernel_backend: str = "auto",
                    progress: Callable[[int, int], None] | None = None) -> SVDQuantModelPatcher:
    """Load an SVDQuant checkpoint of a family in ``ARCHITECTURES`` (file or folder) as a ComfyUI MODEL.

    ``progress(done, total)`` is called after each quantized layer is read."""
    check_version()
    enable_kernels(kernel_backend)  # first, so that a 'cuda' request that cannot be met fails before any reading
    load_device = comfy.model_management.get_torch_device()
    with CheckpointReader(path) as reader:
        if not holds_svdquant(reader.metadata, reader.keys):
            raise CheckpointError(reader.path, "this is not an SVDQuant checkpoint (no 4-bit layers, no "
                                  "quantization_config): a 16-bit or fp8 model loads with Load Diffusion Model, and "
                                  "SVDQuant Quantize Model makes a 4-bit model from it")
        info = reader.quantization()
        architecture = detect(reader)
        described = architecture.unet_config(reader)
        model_config = detection.model_config(architecture, checkpoint_shapes(architecture, reader, described),
                                              hint=described)
        unet_config = dict(model_config.unet_config)  # before get_model adds the dtype and operations
        layers = all_layers(architecture.blocks(unet_config))
        kept = {layer.module: dense_layers.read_dense(reader, layer) for layer in layers}
        quantized = [layer for layer in layers if kept[layer.module] is None]
        file_dtype = stored_dtype(reader, quantized)
        compute_dtype = resolve_dtype(dtype, file_dtype, load_device)
        model = build_config(model_config, compute_dtype).get_model({})
        diffusion_model = model.diffusion_model
        consumed: set[str] = set()
        dense = {}
        leaves = []
        for index, layer in enumerate(layers):
            if kept[layer.module] is not None:  # a layer the file keeps 16-bit (see :mod:`.dense_layers`)
                weight, bias = kept[layer.module]
                dense[f"{layer.module}.weight"] = weight.to(compute_dtype)
                if bias is not None:
                    dense[f"{layer.module}.bias"] = bias.to(compute_dtype)
                consumed.update(dense_layers.stored_keys(layer))
                continue
            body = parts.read_layer(reader, layer, info)
            for leaf in parts.fit_to_model(body, layer.module, compute_dtype):
                leaf.kernel_backend = kernel_backend
                leaves.append(leaf)
            op = diffusion_model.get_submodule(layer.module)
            op.set_quantized(body)
            consumed.update(k for p in layer.parts for k in reader.keys if k.startswith(p.prefix + "."))
            if progress:
                progress(index + 1, len(layers))
        for comfy_key, file_key in architecture.dense_key_map(unet_config).items():
            if file_key not in reader:
                raise CheckpointError(reader.path, f"required tensor '{file_key}' (ComfyUI '{comfy_key}') is missing")
            tensor = architecture.convert_dense(comfy_key, reader.get(file_key), to_file=False)
            dense[comfy_key] = tensor.to(compute_dtype) if tensor.is_floating_point() else tensor
            consumed.add(file_key)
        missing, unexpected = diffusion_model.load_state_dict(dense, strict=False)
        missing = [k for k in missing if ".quantized." not in k]  # quantized bodies were set above
        problems = sorted(set(missing) | {name for name, p in diffusion_model.named_parameters() if p.is_meta})
        if problems or unexpected:
            raise CheckpointError(reader.path, f"tensors do not fit ComfyUI's {architecture.label} model: "
                                  f"missing {problems[:5]}, unexpected {unexpected[:5]}")
        leftover = [k for k in reader.keys if k not in consumed]
        if leftover:
            log.warning("SVDQuant: %s: %d tensors are not used by the model (e.g. %s)", path, len(leftover),
                        ", ".join(leftover[:3]))
    log.info("SVDQuant: loaded %s (%s %s, rank %d, compute %s; %s)", os.path.basename(str(path)),
             architecture.name, info.precision, info.rank, str(compute_dtype).replace("torch.", ""),
             path_summary(leaves, load_device))
    return SVDQuantModelPatcher(model, load_device, comfy.model_management.unet_offload_device())
