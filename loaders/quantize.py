"""A dense FLUX.1 / SDXL / Qwen-Image / Z-Image MODEL → an SVDQuant MODEL, inside ComfyUI (the engine of the
Quantize node and of ``scripts/quantize_cli.py``).

1. Calibration: the user's prompts are sampled with the MODEL's own sampler, and every call the sampler
   makes to the diffusion model is recorded (:mod:`.calibration`).
2. Quantization, one block at a time, on the MODEL's device (:func:`quantize_blocks`): the recorded calls
   are replayed and cut short after the block, hooks keep bounded statistics of the block's layer
   inputs, then the block's layers are quantized and the statistics dropped.
3. Assembly: a new ComfyUI model of the same class whose quantized Linears hold the packed layers and
   whose other tensors are the source's (:func:`convert.assemble`).

Memory. The source MODEL is loaded by ComfyUI's model management with room reserved for one block's
work (:func:`working_memory`): what does not fit stays in RAM and is streamed layer by layer at every
forward (ComfyUI's low-VRAM mode), as when sampling. The device then holds the loaded part of the model,
one block's statistics (``max_rows × K`` rows, the per-channel ranges, and ``K²`` for GPTQ per input),
one group of layers being quantized (fp32), and one forward's activations. RAM holds the source MODEL
as ComfyUI keeps it, the recorded calls (prompts × steps latents and conditionings) and the packed
layers made so far (about 0.28× the 16-bit size). Nothing grows with the model's depth but the packed
output. The dense weight of each Linear is read the way ComfyUI computes with it
(:func:`runtime_weight`): fp8 with its scale, LoRA and other weight patches applied.
"""

from __future__ import annotations

import fnmatch
import json
import logging
import math
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import comfy.model_management
import comfy.ops
import comfy.utils
import torch
from torch import nn
from tqdm import tqdm

from ..svdquant.errors import CalibrationError, ConfigError
from ..svdquant.quantizer import QuantizeConfig
from ..svdquant.quantizer.model import BlockPlan, check_ranks, quantize_blocks
from . import convert
from .architecture import Block, all_layers
from .calibration import Conditioning, SamplingSettings, record_calls
from .ops import quantized_ops
from .patcher import SVDQuantModelPatcher

log = logging.getLogger(__name__)

# One entry of the checkpoint metadata records how the file was made.
PROVENANCE_KEY = "svdquant_quantizer"


@dataclass(frozen=True)
class Conversion:
    """Everything the user chooses for one conversion."""

    config: QuantizeConfig
    sampling: SamplingSettings
    keep: tuple[str, ...] = ()  # patterns of layers to keep 16-bit (ComfyUI or checkpoint names)
    max_rows: int = 512  # calibration rows sampled per layer input


def parse_patterns(text: str) -> tuple[str, ...]:
    """Layer-name patterns separated by commas, spaces or new lines."""
    return tuple(p for p in re.split(r"[,\s]+", text) if p)


def kept_layers(blocks: list[Block], patterns: Sequence[str]) -> frozenset[str]:
    """ComfyUI paths of the quantizable Linears that ``patterns`` keep 16-bit. A pattern (``fnmatch``)
    matches a ComfyUI path (``double_blocks.0.img_mlp.2``) or a checkpoint name
    (``transformer_blocks.0.mlp_fc2``); a checkpoint layer spread over several Linears is kept whole."""
    layers = all_layers(blocks)
    kept: set[str] = set()
    for pattern in patterns:
        hits = {layer.module for layer in layers
                if fnmatch.fnmatchcase(layer.module, pattern) or any(fnmatch.fnmatchcase(p.prefix, pattern)
                                                                      for p in layer.parts)}
        if not hits:
            example = layers[0]
            raise ConfigError(f"keep 16-bit: '{pattern}' matches no quantized layer (names look like "
                              f"'{example.module}' or '{example.parts[0].prefix}'; * and ? are wildcards)")
        kept |= hits
    prefixes = {p.prefix for layer in layers if layer.module in kept for p in layer.parts}
    kept |= {layer.module for layer in layers if any(p.prefix in prefixes for p in layer.parts)}
    if len(kept) == len(layers):
        raise ConfigError("keep 16-bit keeps every quantizable layer: nothing would be quantized")
    return frozenset(kept)


def runtime_weight(module: nn.Module, device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    """fp32 (weight, bias) of a Linear as ComfyUI computes with it, on ``device``: cast from fp8 and
    multiplied by ``scale_weight`` (scaled-fp8 checkpoints), with the weight patches ComfyUI applies at
    run time in low-VRAM mode (LoRA; in normal mode they are already merged into the weight)."""
    if not isinstance(module, comfy.ops.CastWeightBiasOp):
        bias = module.bias.to(device, torch.float32) if module.bias is not None else None
        return module.weight.to(device, torch.float32), bias
    weight, bias = comfy.ops.cast_bias_weight(module, dtype=torch.float32, device=device, bias_dtype=torch.float32)
    scale = getattr(module, "scale_weight", None)
    if scale is not None:
        weight = weight * scale.to(device, torch.float32)
    return weight, bias


def _runtime_tensors(patcher, device: torch.device, dtype: torch.dtype) -> Callable[[str], torch.Tensor]:
    """``tensor_of(key)`` for :func:`convert.assemble`: a 16-bit tensor's run-time value, shared with the
    source where it is stored as such (no copy), copied where ComfyUI changes it at run time."""
    diffusion_model = patcher.model.diffusion_model

    def tensor_of(key: str) -> torch.Tensor:
        module_name, _, name = key.rpartition(".")
        module = diffusion_model.get_submodule(module_name)
        parameter = getattr(module, name).detach()
        computed = isinstance(module, comfy.ops.CastWeightBiasOp) and name in ("weight", "bias") and (
            module.weight_function or module.bias_function or getattr(module, "scale_weight", None) is not None)
        if computed:
            weight, bias = runtime_weight(module, device)
            return (weight if name == "weight" else bias).to(dtype)
        value = parameter.to(device, dtype)
        if f"diffusion_model.{key}" in patcher.patches and value.data_ptr() == parameter.data_ptr():
            value = value.clone()  # merged in place: ComfyUI restores the original when it unloads the source
        return value

    return tensor_of


def working_memory(diffusion_model: nn.Module, plan: list[BlockPlan], config: QuantizeConfig, max_rows: int) -> int:
    """Bytes the quantizer needs on the device for its largest block, beyond the model and one forward:
    the block's input statistics and the largest group's fp32 working copies (weight, smoothed and
    residual weights, the branch fit in float64), plus GPTQ's float64 Hessian factors."""
    largest = 0
    for block in plan:
        inputs: dict[str, int] = {}
        group_bytes = 0
        for group in block.groups:
            first = diffusion_model.get_submodule(group.targets[0].module)
            k = group.columns[1] if group.columns else first.in_features
            elements = 0
            for target in group.targets:
                linears = [diffusion_model.get_submodule(m) for m in (target.module, *target.fused)]
                n = target.rows[1] if target.rows else sum(m.out_features for m in linears)
                elements += n * k
            work = 32 * elements
            if group.kind == "w4a4":
                inputs[group.targets[0].module] = first.in_features
                if config.gptq:
                    work += 32 * k * k
            group_bytes = max(group_bytes, work)
        stats = sum(4 * (max_rows * k + 4 * k + (k * k if config.gptq else 0)) for k in inputs.values())
        largest = max(largest, stats + group_bytes)
    return largest


def storage_dtype(base_model) -> torch.dtype:
    """The 16-bit type the quantized model stores and computes in: the source's, else bfloat16."""
    for dtype in (base_model.manual_cast_dtype, base_model.get_dtype()):
        if dtype in (torch.bfloat16, torch.float16):
            return dtype
    return torch.bfloat16


def quantize_model(patcher, prompts: list[Conditioning], negative: Conditioning | None, conversion: Conversion,
                   progress: Callable[[int, int], None] | None = None) -> SVDQuantModelPatcher:
    """The SVDQuant version of ``patcher`` (a dense MODEL of a family the pack knows), calibrated on ``prompts``
    (CONDITIONINGs, one per prompt). ``patcher`` and its model are not modified. ``progress(done,
    total)`` is called after every sampling step and every quantized layer; ComfyUI's interrupt flag
    is checked as often, and raises ``InterruptProcessingException``."""
    base = patcher.model
    architecture, unet_config, blocks = convert.blocks_of(base.diffusion_model)
    if quantized_ops(base.diffusion_model):
        raise ConfigError("this MODEL is already an SVDQuant model; quantize the 16-bit (or fp8) model it came from")
    if not prompts:
        raise CalibrationError("no calibration prompts: give at least one encoded prompt to calibrate on")
    config = conversion.config.replace(dtype=storage_dtype(base))
    keep = kept_layers(blocks, conversion.keep)
    plan = convert.plan(architecture, unet_config, keep)
    check_ranks(base.diffusion_model, plan, config.rank)

    sampling = conversion.sampling
    steps_total = len(prompts) * sampling.steps
    total = steps_total + sum(len(g.targets) for b in plan for g in b.groups)
    done = 0

    def advance() -> None:
        nonlocal done
        done += 1
        comfy.model_management.throw_exception_if_processing_interrupted()
        if progress:
            progress(done, total)

    started = time.perf_counter()
    log.info("SVDQuant: quantizing %s to %s rank %d (%d blocks, %d layers kept 16-bit); calibrating on %d "
             "prompt(s) × %d steps at %d×%d", architecture.name, config.precision, config.rank, len(plan), len(keep),
             len(prompts), sampling.steps, sampling.width, sampling.height)
    sampler_model = patcher.clone()  # carries the recording wrapper; the caller's MODEL is left as it was
    calls = record_calls(sampler_model, prompts, negative, sampling, step_done=advance)
    if not calls:
        raise CalibrationError("the calibration sampling never called the model (0 steps run)")
    device = patcher.load_device
    inference = base.memory_required(max((call.batch_shape for call in calls), key=math.prod))
    reserve = working_memory(base.diffusion_model, plan, config, conversion.max_rows) + inference
    # Loads what fits beside the reserve and streams the rest (and applies the MODEL's weight patches).
    comfy.model_management.load_models_gpu([sampler_model], memory_required=reserve)
    log.info("SVDQuant: calibration sampling done (%d model calls, %.0f s); quantizing on %s with %.2f GiB "
             "reserved per block", len(calls), time.perf_counter() - started, device, reserve / 2**30)

    console = tqdm(total=total - steps_total, desc="SVDQuant quantizing", unit="layer",
                   disable=not comfy.utils.PROGRESS_BAR_ENABLED)

    def layer_done(name: str, _done: int, _total: int) -> None:
        console.update()
        advance()

    with console:
        modules, reports = quantize_blocks(base.diffusion_model, plan, calls, config, conversion.max_rows, device,
                                           layer_done, weight_of=lambda linear: runtime_weight(linear, device))
    del calls
    offload = patcher.offload_device
    model = convert.assemble(base, modules, config.dtype, keep, _runtime_tensors(sampler_model, offload, config.dtype))
    worst = max(reports, key=lambda r: r.error)
    log.info("SVDQuant: quantized %d layers in %.0f s; output error on the calibration rows: median %.4f, worst "
             "%.4f (%s)", len(reports), time.perf_counter() - started,
             sorted(r.error for r in reports)[len(reports) // 2], worst.error, worst.name)
    model.svdquant_metadata = {PROVENANCE_KEY: json.dumps(provenance(conversion, config, len(prompts), keep))}
    return SVDQuantModelPatcher(model, device, offload)


def provenance(conversion: Conversion, config: QuantizeConfig, prompts: int, keep: frozenset[str]) -> dict:
    """How a checkpoint was made, for its metadata."""
    return {
        "precision": config.precision, "rank": config.rank, "smoothing": config.smooth, "gptq": config.gptq,
        "calibration": dict(asdict(conversion.sampling), prompts=prompts, rows_per_layer=conversion.max_rows),
        "kept_16bit": sorted(keep),
    }
