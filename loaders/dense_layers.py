"""Quantizable layers kept in 16 bits (the Quantize node's "keep 16-bit" list), as a checkpoint stores them.

Our extension of the format, additive and only present in files that keep layers (nunchaku's loaders do not
read such files): a checkpoint layer with ``<prefix>.weight`` (N×K, 16-bit) and optionally ``<prefix>.bias``
in place of ``qweight`` & co. is a plain diffusers ``nn.Linear``: no packing, no interleaved outputs, no +1
pre-added to modulation biases. Each ComfyUI Linear takes its share of it as the layer table says: the output
rows of a ``concat`` part or of a row slice, the input columns of a ``split_input`` part (whose ComfyUI
Linear adds the parts' outputs, so the bias is stored once, on the first part).
"""

from __future__ import annotations

import torch

from ..svdquant.checkpoint import CheckpointReader
from ..svdquant.errors import CheckpointError, SVDQuantError
from .architecture import Part, QuantizedLayer

Dense = tuple[torch.Tensor, "torch.Tensor | None"]
Piece = tuple[Part, torch.Tensor, "torch.Tensor | None"]


def _pieces(layer: QuantizedLayer, weight: torch.Tensor, bias: torch.Tensor | None) -> list[Piece]:
    """Each part's share of a ComfyUI Linear's (weight, bias)."""
    out, start = [], 0
    for index, part in enumerate(layer.parts):
        if layer.combine == "concat":
            rows = slice(start, start + part.width)
            out.append((part, weight[rows], None if bias is None else bias[rows]))
            start += part.width
        elif layer.combine == "split_input":
            out.append((part, weight[:, start:start + part.in_features], bias if index == 0 else None))
            start += part.in_features
        else:
            out.append((part, weight, bias))
    return out


def _join_biases(pieces: list[tuple[torch.Tensor, torch.Tensor | None]]) -> torch.Tensor | None:
    if all(b is None for _, b in pieces):
        return None
    return torch.cat([b if b is not None else w.new_zeros(w.shape[0]) for w, b in pieces])


def dense_tensors(layers: list[tuple[QuantizedLayer, torch.Tensor, torch.Tensor | None]]) -> dict[str, torch.Tensor]:
    """The checkpoint tensors of the kept layers ``[(layer, its ComfyUI weight, bias)]``; row slices of one
    checkpoint layer (SDXL's q/k/v) are joined back into it."""
    out: dict[str, torch.Tensor] = {}
    sliced: dict[str, list[Piece]] = {}
    for layer, weight, bias in layers:
        for part, w, b in _pieces(layer, weight, bias):
            if part.rows:
                sliced.setdefault(part.prefix, []).append((part, w, b))
                continue
            out[f"{part.prefix}.weight"] = w
            if b is not None:
                out[f"{part.prefix}.bias"] = b
    for prefix, pieces in sliced.items():
        pieces.sort(key=lambda piece: piece[0].rows[0])
        if sum(w.shape[0] for _, w, _ in pieces) != pieces[0][0].out_features:
            raise SVDQuantError(f"'{prefix}': the model does not keep every row of this fused checkpoint layer 16-bit")
        out[f"{prefix}.weight"] = torch.cat([w for _, w, _ in pieces])
        bias = _join_biases([(w, b) for _, w, b in pieces])
        if bias is not None:
            out[f"{prefix}.bias"] = bias
    return out


def read_dense(reader: CheckpointReader, layer: QuantizedLayer) -> Dense | None:
    """The ComfyUI Linear's (weight, bias) if the checkpoint keeps ``layer`` 16-bit, else None."""
    stored = [f"{part.prefix}.weight" in reader for part in layer.parts]
    if not any(stored):
        return None
    if not all(stored):
        raise CheckpointError(reader.path, f"'{layer.parts[stored.index(False)].prefix}' is quantized but "
                              f"'{layer.parts[stored.index(True)].prefix}' is 16-bit; the parts of ComfyUI's "
                              f"'{layer.module}' must be stored alike")
    pieces = []
    for part in layer.parts:
        key = f"{part.prefix}.weight"
        if reader.shape(key) != (part.out_features, part.in_features):
            raise CheckpointError(reader.path, f"tensor '{key}' has shape {list(reader.shape(key))}, but this 16-bit "
                                  f"layer needs {[part.out_features, part.in_features]}")
        weight = reader.get(key)
        bias = reader.get(f"{part.prefix}.bias") if f"{part.prefix}.bias" in reader else None
        if bias is not None and tuple(bias.shape) != (part.out_features,):
            raise CheckpointError(reader.path, f"tensor '{part.prefix}.bias' has shape {list(bias.shape)}, "
                                  f"expected {[part.out_features]}")
        if part.rows:
            weight = weight.narrow(0, *part.rows)
            bias = bias.narrow(0, *part.rows) if bias is not None else None
        pieces.append((weight, bias))
    if layer.combine == "concat":
        return torch.cat([w for w, _ in pieces]), _join_biases(pieces)
    if layer.combine == "split_input":
        biases = [b for _, b in pieces if b is not None]
        return torch.cat([w for w, _ in pieces], dim=1), (sum(biases[1:], biases[0]) if biases else None)
    return pieces[0]


def stored_keys(layer: QuantizedLayer) -> list[str]:
    return [f"{part.prefix}.{name}" for part in layer.parts for name in ("weight", "bias")]
