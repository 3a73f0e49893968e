"""Quantize a whole model one block at a time, in bounded memory.

For each block, hooks record bounded statistics of the inputs of that block's linears while the
calibration forwards run; each forward is cut short right after the block (nothing later is
computed), the block's layers are quantized, and the statistics are dropped before the next block.
The model itself is never modified: every block is calibrated on full-precision inputs, as in the
authors' recipe, and the quantized layers are returned for the caller to install into a new model.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import CalibrationError
from .linear import QuantizeConfig, QuantizedLinear, check_rank_fits, quantize_linears, quantize_w4a16
from .stats import InputStats, record_inputs


@dataclass(frozen=True)
class Target:
    """One checkpoint layer: a slice of a dense Linear of the model."""

    name: str  # the checkpoint prefix, unique in the model
    module: str  # path of the dense nn.Linear it is cut from
    rows: tuple[int, int] | None = None  # (start, length) of its output channels, for concatenated parts
    # >1: the checkpoint stores the outputs interleaved (channel s·D + d at d·interleave + s), so the
    # rows are quantized in that stored order
    interleave: int = 1
    # further Linears reading the same input whose outputs continue ``module``'s: the checkpoint fuses
    # them into this one layer (SDXL's q/k/v), quantized as their concatenated weight
    fused: tuple[str, ...] = ()


@dataclass(frozen=True)
class Group:
    """Targets that read one input tensor and therefore share a smoothing factor."""

    kind: str  # "w4a4" | "w4a16"
    targets: tuple[Target, ...]
    columns: tuple[int, int] | None = None  # (start, length) of the input they read (input split along K)
    act_unsigned: bool = False


@dataclass(frozen=True)
class BlockPlan:
    module: str  # path of the block: calibration forwards stop after it
    groups: tuple[Group, ...]


# The weight and bias a Linear computes with. The default reads its parameters; a caller whose layers
# store something else (ComfyUI's fp8 with a scale, LoRA patches applied at run time) passes its own.
WeightOf = Callable[[nn.Module], tuple[torch.Tensor, "torch.Tensor | None"]]


def parameters_of(linear: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    return linear.weight, linear.bias


class _StopCalibration(Exception):
    pass


@contextlib.contextmanager
def _stop_after(module: nn.Module) -> Iterator[None]:
    def hook(*_):
        raise _StopCalibration

    handle = module.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def _weight(model: nn.Module, target: Target, columns: tuple[int, int] | None, weight_of: WeightOf
            ) -> tuple[torch.Tensor, torch.Tensor | None]:
    weight, bias = _fused_weight(model, target, weight_of)
    if target.rows is not None:
        weight = weight.narrow(0, *target.rows)
        bias = bias.narrow(0, *target.rows) if bias is not None else None
    if columns is not None:
        weight = weight.narrow(1, *columns)
        # of an input-split layer, only the first part carries the bias
        bias = bias if columns[0] == 0 else None
    if target.interleave > 1:
        chunk = weight.shape[0] // target.interleave
        stored = torch.arange(weight.shape[0]).reshape(target.interleave, chunk).T.reshape(-1)
        weight = weight[stored.to(weight.device)]
        bias = bias[stored.to(bias.device)] if bias is not None else None
    return weight.detach(), None if bias is None else bias.detach()


def _fused_weight(model: nn.Module, target: Target, weight_of: WeightOf) -> tuple[torch.Tensor, torch.Tensor | None]:
    pairs = [weight_of(model.get_submodule(m)) for m in (target.module, *target.fused)]
    if len(pairs) == 1:
        return pairs[0]
    weight = torch.cat([w for w, _ in pairs])
    if all(b is None for _, b in pairs):
        return weight, None
    return weight, torch.cat([b if b is not None else w.new_zeros(w.shape[0]) for w, b in pairs])


def quantize_blocks(
    model: nn.Module,
    blocks: Sequence[BlockPlan],
    calls: Sequence[Callable[[], object]],
    config: QuantizeConfig,
    max_rows: int = 512,
    device: torch.device | str | None = None,
    progress: Callable[[str, int, int], None] | None = None,
    weight_of: WeightOf = parameters_of,
) -> tuple[dict[str, nn.Module], list[QuantizedLinear]]:
    """Quantize every group of ``blocks``. ``calls`` are the calibration forwards (each runs the model
    once); ``progress(layer, done, total)`` is called after each layer and may raise to cancel;
    ``weight_of(linear)`` gives the dense weight and bias a Linear computes with.

    Returns the quantized modules by target name and the per-layer reports."""
    check_ranks(model, blocks, config.rank)
    total = sum(len(g.targets) for b in blocks for g in b.groups)
    done = 0
    modules: dict[str, nn.Module] = {}
    reports: list[QuantizedLinear] = []
    for block in blocks:
        sources = {g.targets[0].module for g in block.groups if g.kind == "w4a4"}
        stats = _calibrate(model, block, sources, calls, max_rows, config.gptq, device) if sources else {}
        for group in block.groups:
            if group.kind == "w4a16":
                for target in group.targets:
                    weight, bias = _weight(model, target, None, weight_of)
                    modules[target.name] = quantize_w4a16(target.name, weight.to(device), bias, config.dtype)
                    done += 1
                    if progress:
                        progress(target.name, done, total)
                continue
            source = stats[group.targets[0].module]
            if group.columns is not None:
                source = source.narrow(*group.columns, name=f"{group.targets[0].name} (input)")
            layers = [(t.name, *_weight(model, t, group.columns, weight_of)) for t in group.targets]
            for result in quantize_linears(layers, source, config, group.act_unsigned, device):
                modules[result.name] = result.module()
                reports.append(result)
                done += 1
                if progress:
                    progress(result.name, done, total)
        del stats
    return modules, reports


def check_ranks(model: nn.Module, blocks: Sequence[BlockPlan], rank: int) -> None:
    """Refuse a rank some W4A4 layer of the plan cannot hold, before any calibration work."""
    for block in blocks:
        for group in block.groups:
            if group.kind != "w4a4":
                continue
            for target in group.targets:
                linears = [model.get_submodule(m) for m in (target.module, *target.fused)]
                out_features = target.rows[1] if target.rows is not None else sum(m.out_features for m in linears)
                in_features = group.columns[1] if group.columns is not None else linears[0].in_features
                check_rank_fits(target.name, out_features, in_features, rank)


def _calibrate(model: nn.Module, block: BlockPlan, sources: set[str], calls: Sequence[Callable[[], object]],
               max_rows: int, hessian: bool, device) -> dict[str, InputStats]:
    if not calls:
        raise CalibrationError("no calibration inputs: give at least one prompt to calibrate on")
    layers = {name: model.get_submodule(name) for name in sorted(sources)}
    stats_device = device if device is not None else next(iter(layers.values())).weight.device
    stats = {name: InputStats(name, m.in_features, max_rows, hessian, stats_device) for name, m in layers.items()}
    with torch.no_grad(), record_inputs(layers, stats), _stop_after(model.get_submodule(block.module)):
        for call in calls:
            try:
                call()
            except _StopCalibration:
                pass
    return stats
