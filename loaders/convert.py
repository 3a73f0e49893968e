"""Dense ComfyUI model → SVDQuant model: the quantization plan of an architecture, and the new model
assembled from the quantized layers and the source model's 16-bit tensors (shared, not copied)."""

from __future__ import annotations

import copy

import torch
from torch import nn

from ..svdquant.errors import SVDQuantError
from ..svdquant.layer_io import cast_16bit
from ..svdquant.quantizer.model import BlockPlan, Group, Target
from . import parts
from .architecture import Architecture, Block, QuantizedLayer, all_layers
from .load import architecture_of
from .ops import SVDQuantOps
from .parts import InterleavedOutput


def _groups(layer: QuantizedLayer) -> list[Group]:
    if layer.combine == "concat":
        targets, offset = [], 0
        for p in layer.parts:
            targets.append(Target(p.prefix, layer.module, rows=(offset, p.out_features)))
            offset += p.out_features
        return [Group(layer.parts[0].kind, tuple(targets), act_unsigned=layer.parts[0].act_unsigned)]
    if layer.combine == "split_input":
        groups, offset = [], 0
        for p in layer.parts:
            groups.append(Group(p.kind, (Target(p.prefix, layer.module),), columns=(offset, p.in_features),
                                act_unsigned=p.act_unsigned))
            offset += p.in_features
        return groups
    p = layer.parts[0]
    return [Group(p.kind, (Target(p.prefix, layer.module, interleave=p.splits),), act_unsigned=p.act_unsigned)]


def plan(architecture: Architecture, unet_config: dict) -> list[BlockPlan]:
    """The quantizer's block plan: layers that read one input form one group (one smoothing factor)."""
    out = []
    for block in architecture.blocks(unet_config):
        groups = {layer.module: _groups(layer) for layer in block.layers}
        merged: list[Group] = []
        shared = {m: names for names in block.shared_inputs for m in names}
        seen: set[str] = set()
        for layer in block.layers:
            if layer.module in seen:
                continue
            names = shared.get(layer.module, (layer.module,))
            seen.update(names)
            if len(names) == 1:
                merged += groups[layer.module]
            else:  # separate Linears reading one input: one group, one smoothing factor
                first = groups[names[0]][0]
                targets = tuple(t for n in names for g in groups[n] for t in g.targets)
                merged.append(Group(first.kind, targets, act_unsigned=first.act_unsigned))
        out.append(BlockPlan(block.module, tuple(merged)))
    return out


def body_from_parts(layer: QuantizedLayer, modules: dict[str, nn.Module]) -> nn.Module:
    leaves = []
    for p in layer.parts:
        module = modules[p.prefix]
        if p.kind == "w4a16":
            parts.make_storable(module, p)
        leaves.append(InterleavedOutput(module, p.splits) if p.splits > 1 else module)
    return parts.combine(layer, leaves)


def assemble(source_model, modules: dict[str, nn.Module], dtype: torch.dtype | None = None):
    """A new ComfyUI model (BaseModel) of ``source_model``'s family with ``modules`` as its quantized
    layers and every other tensor shared with ``source_model``."""
    found = architecture_of(source_model.diffusion_model)
    if found is None:
        raise SVDQuantError(f"{type(source_model.diffusion_model).__name__} is not FLUX or SDXL")
    architecture, unet_config = found
    dtype = dtype or next(iter(modules.values())).wscales.dtype
    if dtype not in (torch.bfloat16, torch.float16):
        dtype = torch.bfloat16
    # The source's own model config and type, so sampling settings (v-prediction, shift) carry over.
    model_config = copy.copy(source_model.model_config)
    model_config.unet_config = dict(model_config.unet_config)
    model_config.custom_operations = SVDQuantOps
    model_config.set_inference_dtype(dtype, None)
    model = type(source_model)(model_config, model_type=source_model.model_type)
    for layer in all_layers(architecture.blocks(unet_config)):
        body = body_from_parts(layer, modules)
        for leaf in parts.quantized_modules(body):
            cast_16bit(leaf, dtype)
        model.diffusion_model.get_submodule(layer.module).set_quantized(body)
    source = source_model.diffusion_model
    dense = {k: source.get_parameter(k).detach().to(dtype) for k in architecture.dense_key_map(unet_config)}
    model.diffusion_model.load_state_dict(dense, strict=False)
    left = [n for n, p in model.diffusion_model.named_parameters() if p.is_meta]
    if left:
        raise SVDQuantError(f"the source model has no tensors for {left[:5]}")
    return model


def blocks_of(diffusion_model: nn.Module) -> tuple[Architecture, dict, list[Block]]:
    found = architecture_of(diffusion_model)
    if found is None:
        raise SVDQuantError(f"{type(diffusion_model).__name__} is not a model this pack can quantize "
                            "(FLUX.1 or SDXL)")
    architecture, unet_config = found
    return architecture, unet_config, architecture.blocks(unet_config)
