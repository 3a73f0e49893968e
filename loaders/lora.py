"""LoRA on SVDQuant layers: ComfyUI's weight patches turned into extra low-rank branch tensors.

A quantized layer computes ``Q(x)·R + (x·downᵀ)·upᵀ + bias``: a 4-bit residual next to a 16-bit
low-rank branch on the raw input. A LoRA pair (up B, down A, scale s) changes the weight by s·B·A, so
appending it to the branch (down' = [down; A], up' = [up, s·B]) is exact, with no requantization and
no dense copy of the weight. ComfyUI addresses the layer's logical weight (N × K, with row slices for
the q/k/v and proj_mlp LoRAs of fused layers); the layer may be stored as several parts (outputs
concatenated, input split along K, outputs interleaved), so each pair is cut into the parts it
touches.

Every other patch (LoHa, LoKr, full diffs, DoRA, OFT/BOFT/GLoRA, a weight function, a model
strength) has no exact low-rank form. ComfyUI's own ``calculate_weight`` applies it transiently to
the dequantized weight, and the change is absorbed by a truncated SVD of rank
``op.lora_adapter_rank`` per stored part.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import comfy.lora
import torch
from comfy.weight_adapter import LoRAAdapter
from torch import nn

from ..svdquant import packing
from ..svdquant.errors import SVDQuantError
from ..svdquant.layers import ConcatLinear, SplitInputLinear, W4A4Linear, W4A16Linear
from ..svdquant.quantizer.lowrank import top_singular
from .parts import InterleavedOutput

log = logging.getLogger(__name__)

# The model option the LoRA stack node sets; SVDQuantModelPatcher hands it to every quantized layer.
ADAPTER_RANK_OPTION = "svdquant_lora_adapter_rank"
DEFAULT_ADAPTER_RANK = 64

_approximations_logged: set[str] = set()


@dataclass
class _Pair:
    """A low-rank change up·down of the rows [row, row + len(up)) × columns [col, col + down.shape[1])
    of a layer's logical weight (fp32, scale folded into up)."""

    up: torch.Tensor  # (n, r)
    down: torch.Tensor  # (r, k)
    row: int = 0
    col: int = 0


@dataclass
class _Leaf:
    """A stored W4A4 / W4A16 layer and the block of the logical weight it computes."""

    module: nn.Module
    row: int
    col: int
    splits: int = 1  # > 1: its outputs are stored interleaved (InterleavedOutput)

    @property
    def rows(self) -> int:
        return self.module.out_features

    @property
    def cols(self) -> int:
        return self.module.in_features


def branch_buffers(op: nn.Module, patches: list) -> dict[int, dict[str, torch.Tensor]]:
    """Replacement buffers, keyed by ``id(leaf)``, that make ``op.quantized`` compute its layer with
    ``patches`` (ComfyUI patch tuples) applied. The body itself is not modified."""
    body = op.quantized
    leaves = _leaves(body)
    device = op.body_device()
    shape = (op.out_features, op.in_features)
    steps = [(patch, _exact_pair(patch, shape, device)) for patch in patches]
    pairs = [pair for _, pair in steps if pair is not None]
    if any(pair is None for _, pair in steps):
        pairs += _absorbed(body, leaves, steps, op.lora_adapter_rank, device)
    out = {}
    for leaf in leaves:
        mine = [p for p in (_cut(pair, leaf) for pair in pairs) if p is not None]
        if mine:
            out[id(leaf.module)] = _leaf_buffers(leaf, mine)
    return out


def branch_bytes(op: nn.Module, added: int) -> int:
    """Bytes by which :func:`branch_buffers` grows ``op``'s low-rank branch for ``added`` more ranks over the
    whole layer (W4A4 ranks padded to the packing's tile, as stored)."""
    total = 0
    for leaf in _leaves(op.quantized):
        m = leaf.module
        if isinstance(m, W4A4Linear):
            grown = packing.round_up(m.rank + added, packing.RANK_TILE) - m.rank
            total += (m.proj_down.shape[0] + m.proj_up.shape[0]) * grown * m.proj_down.element_size()
        else:
            total += (m.in_features + m.wscales.shape[1]) * added * m.wscales.element_size()
    return total


def _leaves(module: nn.Module, row: int = 0, col: int = 0) -> list[_Leaf]:
    if isinstance(module, (W4A4Linear, W4A16Linear)):
        return [_Leaf(module, row, col)]
    if isinstance(module, InterleavedOutput):
        return [_Leaf(module.inner, row, col, module.splits)]
    if isinstance(module, (ConcatLinear, SplitInputLinear)):
        out = []
        for part in module.parts:
            out += _leaves(part, row, col)
            if isinstance(module, ConcatLinear):
                row += part.out_features
            else:
                col += part.in_features
        return out
    raise SVDQuantError(f"LoRA: a quantized layer made of {type(module).__name__} cannot take a LoRA")


def _region(shape: tuple[int, int], offset) -> tuple[int, int, int, int]:
    """(row, rows, col, cols) of the weight block a patch with ComfyUI's ``offset`` addresses."""
    row, rows, col, cols = 0, shape[0], 0, shape[1]
    if offset is not None:
        dim, start, length = offset
        if dim == 0:
            row, rows = start, length
        else:
            col, cols = start, length
    return row, rows, col, cols


def _is_plain_pair(patch: tuple) -> bool:
    """A LoRA pair that extends the branch exactly (no mid or DoRA weight, reshape, function, model strength)."""
    _, adapter, strength_model, _, function = patch
    if not isinstance(adapter, LoRAAdapter) or function is not None or strength_model != 1.0:
        return False
    _, _, _, mid, dora_scale, reshape = adapter.weights
    return mid is None and dora_scale is None and reshape is None


def needs_absorption(patches: list) -> bool:
    """Whether some of ``patches`` are not LoRA pairs, and so are absorbed by a truncated SVD."""
    return not all(_is_plain_pair(p) for p in patches)


def branch_rank(patches: list, adapter_rank: int) -> int:
    """The branch rank that ``patches`` add to a layer: each LoRA pair its own rank; every other patch
    together the adapter SVD rank (they are absorbed by one truncated SVD)."""
    pairs = sum(p[1].weights[1].shape[0] for p in patches if _is_plain_pair(p))
    return pairs + (adapter_rank if needs_absorption(patches) else 0)


def _exact_pair(patch: tuple, shape: tuple[int, int], device: torch.device) -> _Pair | None:
    """The patch as a low-rank pair, or None if it is not a plain LoRA pair."""
    if not _is_plain_pair(patch):
        return None
    strength, adapter, _, offset, _ = patch
    up, down, alpha = adapter.weights[:3]
    up, down = up.flatten(start_dim=1), down.flatten(start_dim=1)
    row, rows, col, cols = _region(shape, offset)
    if up.shape[0] != rows or down.shape[1] != cols or up.shape[1] != down.shape[0]:
        raise SVDQuantError(
            f"LoRA: a pair with up {list(up.shape)} and down {list(down.shape)} does not fit the "
            f"{rows}×{cols} block at row {row}, column {col} of an SVDQuant layer ({shape[1]}→{shape[0]}): "
            "is the LoRA made for another model?")
    scale = strength * (alpha / down.shape[0] if alpha is not None else 1.0)
    return _Pair(up.to(device, torch.float32) * scale, down.to(device, torch.float32), row, col)


def _absorbed(body: nn.Module, leaves: list[_Leaf], steps: list[tuple[tuple, _Pair | None]], rank: int,
              device: torch.device) -> list[_Pair]:
    """Truncated-SVD pairs, per stored part, for the change made by the patches that are not LoRA
    pairs (``steps``: each patch with its exact pair, or None).

    All patches run in order on the dequantized weight, the others through ComfyUI's
    calculate_weight (DoRA, OFT and model strengths depend on the weight and on the patches before
    them). The exact pairs are added to a reference copy as well, so only the other patches' change
    is left to absorb."""
    weight = body.to_dense()[0].to(device, torch.float32)  # transient: dropped before the SVDs
    reference = weight.clone()
    kinds = []
    for patch, pair in steps:
        if pair is None:
            kinds.append(_describe(patch))
            weight = comfy.lora.calculate_weight([patch], weight, "SVDQuant layer")
            continue
        change = pair.up @ pair.down
        for target in (weight, reference):
            target[pair.row:pair.row + change.shape[0], pair.col:pair.col + change.shape[1]] += change
    change = weight - reference
    del weight, reference
    out, lost = [], 0.0
    for leaf in leaves:
        block = change[leaf.row:leaf.row + leaf.rows, leaf.col:leaf.col + leaf.cols]
        if not block.any():
            continue
        u, s, vh = top_singular(block, min(rank, *block.shape))
        root = s.sqrt()
        out.append(_Pair(u * root, root[:, None] * vh, leaf.row, leaf.col))
        total = float(block.square().sum())
        lost = max(lost, max(0.0, total - float(s.square().sum())) ** 0.5 / total**0.5)
    _log_approximation(kinds, rank, lost)
    return out


def _describe(patch: tuple) -> str:
    strength, adapter, strength_model, offset, function = patch
    if strength_model != 1.0:
        return "a model strength other than 1"
    if function is not None:
        return "a weight function"
    if isinstance(adapter, LoRAAdapter) and adapter.weights[4] is not None:
        return "DoRA"
    if hasattr(adapter, "name"):
        return {"lora": "LoRA with a mid or reshape weight"}.get(adapter.name, adapter.name)
    if isinstance(adapter, tuple) and len(adapter) == 2 and isinstance(adapter[0], str):
        return f"'{adapter[0]}' patches"
    if isinstance(adapter, list):
        return "merged model weights"
    return "full weight differences"


def _log_approximation(kinds: list[str], rank: int, lost: float) -> None:
    """Once per kind of patch at INFO, every layer at DEBUG: ``lost`` is the share (relative norm) of the
    change that the rank-``rank`` truncation leaves out."""
    log.debug("SVDQuant: %s absorbed at rank %d; %.1f%% of the change left out", ", ".join(kinds), rank, 100 * lost)
    for kind in dict.fromkeys(kinds):
        if kind not in _approximations_logged:
            _approximations_logged.add(kind)
            log.info("SVDQuant: %s on 4-bit layers is applied as a rank-%d approximation (truncated SVD of its "
                     "change; %.1f%% of the change left out in the first layer); LoRA pairs are exact. Raise the "
                     "LoRA stack's adapter SVD rank for a closer match.", kind, rank, 100 * lost)


def _cut(pair: _Pair, leaf: _Leaf) -> _Pair | None:
    """The part of ``pair`` inside ``leaf``'s block, in the leaf's coordinates (None if outside)."""
    up = _window(pair.up, 0, pair.row, leaf.row, leaf.rows)
    down = _window(pair.down, 1, pair.col, leaf.col, leaf.cols)
    if up is None or down is None:
        return None
    return _Pair(up, down)


def _window(t: torch.Tensor, dim: int, start: int, window_start: int, window_length: int) -> torch.Tensor | None:
    """``t`` spans [start, start + t.shape[dim]) of a layer dimension: its values in
    [window_start, window_start + window_length), zero where it does not reach; None if disjoint."""
    lo, hi = max(start, window_start), min(start + t.shape[dim], window_start + window_length)
    if lo >= hi:
        return None
    if start == window_start and t.shape[dim] == window_length:
        return t
    shape = list(t.shape)
    shape[dim] = window_length
    out = t.new_zeros(shape)
    out.narrow(dim, lo - window_start, hi - lo).copy_(t.narrow(dim, lo - start, hi - lo))
    return out


def _leaf_buffers(leaf: _Leaf, pairs: list[_Pair]) -> dict[str, torch.Tensor]:
    module = leaf.module
    if isinstance(module, W4A4Linear):
        return _w4a4_buffers(module, pairs)
    return _w4a16_buffers(module, leaf.splits, pairs)


def _w4a4_buffers(layer: W4A4Linear, pairs: list[_Pair]) -> dict[str, torch.Tensor]:
    """The packed branch with the pairs appended (rank padded to the packing's tile of 16)."""
    dtype = layer.proj_down.dtype
    kp, np_ = layer.proj_down.shape[0], layer.proj_up.shape[0]
    if layer.rank:
        down, up = layer.branch_factors()
    else:
        down, up = layer.proj_down.new_zeros((0, kp)), layer.proj_up.new_zeros((np_, 0))
    added = sum(p.up.shape[1] for p in pairs)
    rank = packing.round_up(layer.rank + added, packing.RANK_TILE)
    downs = [down] + [packing.pad_to(p.down.to(dtype), (p.down.shape[0], kp)) for p in pairs]
    ups = [up] + [packing.pad_to(p.up.to(dtype), (np_, p.up.shape[1])) for p in pairs]
    new_down = packing.pad_to(torch.cat(downs), (rank, kp))
    new_up = packing.pad_to(torch.cat(ups, dim=1), (np_, rank))
    return {"proj_down": packing.pack_down(new_down), "proj_up": packing.pack_up(new_up)}


def _w4a16_buffers(layer: W4A16Linear, splits: int, pairs: list[_Pair]) -> dict[str, torch.Tensor]:
    """``lora_down`` (r, K) and ``lora_up`` (N padded, r), rows in the layer's stored order."""
    dtype = layer.wscales.dtype
    np_ = layer.wscales.shape[1]
    ups = []
    for pair in pairs:
        up = pair.up
        if splits > 1:  # logical row c·D + d is stored at d·splits + c
            up = up.unflatten(0, (splits, -1)).transpose(0, 1).flatten(0, 1)
        ups.append(packing.pad_to(up, (np_, up.shape[1])))
    return {"lora_down": torch.cat([p.down for p in pairs]).to(dtype), "lora_up": torch.cat(ups, dim=1).to(dtype)}
