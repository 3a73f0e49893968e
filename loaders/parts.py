"""Checkpoint parts ↔ the quantized module that stands in for one ComfyUI Linear."""

from __future__ import annotations

import torch
from torch import nn

from ..svdquant import layer_io
from ..svdquant.checkpoint import CheckpointReader, QuantizationInfo
from ..svdquant.layers import ConcatLinear, SplitInputLinear, W4A4Linear, W4A16Linear
from .architecture import Part, QuantizedLayer


class InterleavedOutput(nn.Module):
    """A W4A16 modulation layer kept in the checkpoint's interleaved output order.

    The file stores output channel s·D + d at d·splits + s (so one GEMV thread block writes all the
    chunks of channel d). Rather than repacking 4-bit rows at load, the output is put back in
    ComfyUI's chunk order after each call: a reshape of a (batch, N) tensor."""

    def __init__(self, inner: W4A16Linear, splits: int):
        super().__init__()
        self.inner, self.splits = inner, splits
        self.in_features, self.out_features = inner.in_features, inner.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.inner(x)
        return y.unflatten(-1, (self.out_features // self.splits, self.splits)).transpose(-1, -2).flatten(-2)

    def to_dense(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        weight, bias = self.inner.to_dense()
        order = _interleaved_order(self.out_features, self.splits)
        return weight[order], None if bias is None else bias[order]


def _interleaved_order(n: int, splits: int) -> torch.Tensor:
    """For logical channel j, the stored index."""
    logical = torch.arange(n)
    chunk, d = logical // (n // splits), logical % (n // splits)
    return d * splits + chunk


def _scale_chunk_mask(part: Part, n_padded: int) -> torch.Tensor:
    """Stored positions whose bias has +1 pre-added (ComfyUI applies (1 + scale) itself)."""
    mask = torch.zeros(n_padded, dtype=torch.bool)
    d = part.out_features // part.splits
    for chunk in part.scale_chunks:
        mask[_interleaved_order(part.out_features, part.splits)[chunk * d:(chunk + 1) * d]] = True
    return mask


def _shifted_bias(bias: torch.Tensor, part: Part, delta: float) -> torch.Tensor:
    """``bias`` with ``delta`` added at the scale chunks' stored positions."""
    mask = _scale_chunk_mask(part, bias.shape[0]).to(bias.device)
    return torch.where(mask, bias.float() + delta, bias.float()).to(bias.dtype)


def make_storable(layer: W4A16Linear, part: Part) -> None:
    """Round the scale chunks' bias to values that survive the file's +1 exactly, so a model saved
    right after quantization loads bit-identical (the file stores ``bias + 1`` in 16 bits)."""
    if part.scale_chunks and layer.bias is not None:
        layer.bias = _shifted_bias(_shifted_bias(layer.bias, part, 1.0), part, -1.0)


def read_part(reader: CheckpointReader, part: Part, info: QuantizationInfo) -> nn.Module:
    if part.kind == "w4a4":
        return layer_io.read_w4a4(reader, part.prefix, part.in_features, part.out_features, info, part.act_unsigned)
    layer = layer_io.read_w4a16(reader, part.prefix, part.in_features, part.out_features)
    if part.scale_chunks and layer.bias is not None:
        layer.bias = _shifted_bias(layer.bias, part, -1.0)
    return InterleavedOutput(layer, part.splits) if part.splits > 1 else layer


def part_tensors(module: nn.Module, part: Part) -> dict[str, torch.Tensor]:
    """The checkpoint tensors of one part (inverse of :func:`read_part`)."""
    if isinstance(module, InterleavedOutput):
        module = module.inner
    tensors = layer_io.layer_state(module, part.prefix)
    if part.kind == "w4a16" and part.scale_chunks and module.bias is not None:
        tensors[f"{part.prefix}.bias"] = _shifted_bias(module.bias, part, 1.0)
    return tensors


def combine(layer: QuantizedLayer, parts: list[nn.Module]) -> nn.Module:
    if layer.combine == "concat":
        return ConcatLinear(parts)
    if layer.combine == "split_input":
        return SplitInputLinear(parts)
    return parts[0]


def split(layer: QuantizedLayer, body: nn.Module) -> list[nn.Module]:
    return list(body.parts) if layer.combine in ("concat", "split_input") else [body]


def read_layer(reader: CheckpointReader, layer: QuantizedLayer, info: QuantizationInfo) -> nn.Module:
    return combine(layer, [read_part(reader, p, info) for p in layer.parts])


def layer_tensors(layer: QuantizedLayer, body: nn.Module) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for part, module in zip(layer.parts, split(layer, body)):
        out.update(part_tensors(module, part))
    return out


def quantized_modules(body: nn.Module) -> list[nn.Module]:
    """The W4A4 / W4A16 leaves of a body, in part order."""
    return [m for m in body.modules() if isinstance(m, (W4A4Linear, W4A16Linear))]
