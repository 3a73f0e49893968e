"""Dense ComfyUI model → SVDQuant model: the quantization plan of an architecture, and the new model
assembled from the quantized layers and the source model's 16-bit tensors (shared, not copied)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch
from torch import nn

from ..svdquant.errors import SVDQuantError
from ..svdquant.quantizer.model import BlockPlan, Group, Target
from . import detection, parts
from .architecture import Architecture, Block, QuantizedLayer, all_layers
from .load import ARCHITECTURES, architecture_of, build_config
from .parts import InterleavedOutput


def _fused_targets(block: Block) -> dict[str, Target]:
    """Linears that are row slices of one checkpoint layer (SDXL's q/k/v) → the one target that
    quantizes their concatenated weight (one smoothing factor, one branch), keyed by each Linear."""
    slices: dict[str, list[tuple[int, int, str]]] = {}
    for layer in block.layers:
        for p in layer.parts:
            if p.rows:
                slices.setdefault(p.prefix, []).append((*p.rows, layer.module))
    out = {}
    for prefix, found in slices.items():
        found.sort()
        ends = [start + length for start, length, _ in found]
        if [start for start, _, _ in found] != [0] + ends[:-1]:
            raise SVDQuantError(f"'{prefix}': the model's Linears do not cover this checkpoint layer's rows once each")
        modules = [module for _, _, module in found]
        target = Target(prefix, modules[0], fused=tuple(modules[1:]))
        out.update({module: target for module in modules})
    return out


def _groups(layer: QuantizedLayer, fused: dict[str, Target]) -> list[Group]:
    if layer.module in fused:
        p = layer.parts[0]
        return [Group(p.kind, (fused[layer.module],), act_unsigned=p.act_unsigned)]
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


def plan(architecture: Architecture, unet_config: dict, keep: frozenset[str] = frozenset()) -> list[BlockPlan]:
    """The quantizer's block plan: layers that read one input form one group (one smoothing factor).
    The Linears in ``keep`` (ComfyUI module paths) stay 16-bit and are left out."""
    out = []
    for block in architecture.blocks(unet_config):
        block = dataclasses.replace(block, layers=tuple(layer for layer in block.layers if layer.module not in keep))
        fused = _fused_targets(block)
        groups = {layer.module: _groups(layer, fused) for layer in block.layers}
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
                names = [n for n in names if n in groups]
                first = groups[names[0]][0]
                targets = tuple(dict.fromkeys(t for n in names for g in groups[n] for t in g.targets))
                merged.append(Group(first.kind, targets, act_unsigned=first.act_unsigned))
        if merged:
            out.append(BlockPlan(block.module, tuple(merged)))
    return out


def body_from_parts(layer: QuantizedLayer, modules: dict[str, nn.Module]) -> nn.Module:
    leaves = []
    for p in layer.parts:
        module = modules[p.prefix]
        if p.rows:
            module = parts.slice_rows(module, *p.rows)
        if p.kind == "w4a16":
            parts.make_storable(module, p)
        leaves.append(InterleavedOutput(module, p.splits) if p.splits > 1 else module)
    return parts.combine(layer, leaves)


def assemble(source_model, modules: dict[str, nn.Module], dtype: torch.dtype | None = None,
             keep: frozenset[str] = frozenset(), tensor_of: Callable[[str], torch.Tensor] | None = None):
    """A new ComfyUI model (BaseModel) of ``source_model``'s family with ``modules`` as its quantized
    layers and every other tensor shared with ``source_model``: the Linears in ``keep`` stay 16-bit.
    ``tensor_of(key)`` gives a 16-bit tensor's value (default: the source's parameter)."""
    found = architecture_of(source_model.diffusion_model)
    if found is None:
        raise SVDQuantError(f"{type(source_model.diffusion_model).__name__} is not a model this pack can quantize "
                            f"({_families()})")
    architecture, unet_config = found
    dtype = dtype or next(iter(modules.values())).wscales.dtype
    if dtype not in (torch.bfloat16, torch.float16):
        dtype = torch.bfloat16
    # ComfyUI's detection over the source's own tensors gives the config; what the source's loader settled
    # beyond its tensors (model type, sampling settings such as v-prediction or shift, latent format) carries over.
    source_config = source_model.model_config
    shapes = detection.meta_shapes(source_model.diffusion_model.state_dict())
    model_config = detection.model_config(architecture, shapes, hint=unet_config)
    model_config.sampling_settings = dict(source_config.sampling_settings)
    model_config.latent_format = source_config.latent_format
    model = type(source_model)(build_config(model_config, dtype), model_type=source_model.model_type)
    kept = []
    for layer in all_layers(architecture.blocks(unet_config)):
        if layer.module in keep:
            op = model.diffusion_model.get_submodule(layer.module)
            kept += [f"{layer.module}.{name}" for name in ("weight", "bias") if getattr(op, name, None) is not None]
            continue
        body = body_from_parts(layer, modules)
        parts.fit_to_model(body, layer.module, dtype)
        model.diffusion_model.get_submodule(layer.module).set_quantized(body)
    source = source_model.diffusion_model
    tensor_of = tensor_of or (lambda key: source.get_parameter(key).detach())
    dense = {k: tensor_of(k).to(dtype) for k in [*architecture.dense_key_map(unet_config), *kept]}
    model.diffusion_model.load_state_dict(dense, strict=False)
    left = [n for n, p in model.diffusion_model.named_parameters() if p.is_meta]
    if left:
        raise SVDQuantError(f"the source model has no tensors for {left[:5]}")
    return model


def blocks_of(diffusion_model: nn.Module) -> tuple[Architecture, dict, list[Block]]:
    found = architecture_of(diffusion_model)
    if found is None:
        raise SVDQuantError(f"{type(diffusion_model).__name__} is not a model this pack can quantize ({_families()})")
    architecture, unet_config = found
    return architecture, unet_config, architecture.blocks(unet_config)


def _families() -> str:
    return ", ".join(dict.fromkeys(a.name for a in ARCHITECTURES))
