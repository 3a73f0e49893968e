"""Checkpoint parts ↔ the quantized module that stands in for one ComfyUI Linear."""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from ..svdquant import layer_io, packing
from ..svdquant.checkpoint import CheckpointReader, QuantizationInfo
from ..svdquant.errors import SVDQuantError
from ..svdquant.layers import ConcatLinear, SplitInputLinear, W4A4Linear, W4A16Linear, to_compute_dtype
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
        layer = layer_io.read_w4a4(reader, part.prefix, part.in_features, part.out_features, info, part.act_unsigned)
        return slice_rows(layer, *part.rows) if part.rows else layer
    layer = layer_io.read_w4a16(reader, part.prefix, part.in_features, part.out_features)
    if part.scale_chunks and layer.bias is not None:
        layer.bias = _shifted_bias(layer.bias, part, -1.0)
    return InterleavedOutput(layer, part.splits) if part.splits > 1 else layer


def part_tensors(module: nn.Module, part: Part) -> dict[str, torch.Tensor]:
    """The checkpoint tensors of one part (inverse of :func:`read_part`; row slices excepted, see
    :func:`checkpoint_tensors`)."""
    if isinstance(module, InterleavedOutput):
        module = module.inner
    tensors = layer_io.layer_state(module, part.prefix)
    bias = module.bias
    if bias is None and part.has_bias:
        # The engines allocate a bias for every such layer, and the python loaders load strictly.
        bias = torch.zeros(module.qweight.shape[0] * (4 if part.kind == "w4a16" else 1), dtype=_sixteen_bit(module))
    if bias is not None and not part.has_bias:
        if bias.any():
            raise SVDQuantError(f"layer '{part.prefix}' has a bias, which this checkpoint format does not store")
        bias = None
    if bias is not None and part.kind == "w4a16" and part.scale_chunks:
        bias = _shifted_bias(bias, part, 1.0)
    tensors.pop(f"{part.prefix}.bias", None)
    if bias is not None:
        tensors[f"{part.prefix}.bias"] = bias
    return tensors


def _sixteen_bit(module: nn.Module) -> torch.dtype:
    return module.smooth_factor.dtype if isinstance(module, W4A4Linear) else module.wscales.dtype


# --- layers the file fuses but ComfyUI keeps apart (SDXL's q/k/v) ------------------------------
# Rows are cut and joined on the unpacked codes and scales (exact); every input-side tensor
# (smoothing, branch down-projection, tensor scale) is shared by the rows.

_INPUT_SIDE = ("smooth_factor", "smooth_factor_orig", "proj_down", "wtscale")


def _row_tensors(layer: W4A4Linear) -> dict[str, torch.Tensor]:
    """The output-channel tensors of ``layer``, unpacked to (Np, ...) row order."""
    out = {"codes": packing.unpack_qweight(layer.qweight, signed=layer.precision == "int4"),
           "up": packing.unpack_up(layer.proj_up)}
    if layer.precision == "int4":
        out["scales"] = packing.unpack_scales(layer.wscales)
    else:
        out["scales"] = packing.unpack_fp8_scales(layer.wscales)
        out["wcscales"] = packing.unpack_vector(layer.wcscales).unsqueeze(1)
    if layer.bias is not None:
        out["bias"] = packing.unpack_vector(layer.bias).unsqueeze(1)
    return out


def _from_rows(like: W4A4Linear, rows: dict[str, torch.Tensor], n: int) -> W4A4Linear:
    """A layer with ``like``'s input side and the (unpadded) output rows ``rows``."""
    np_ = packing.round_up(n, packing.TILE)
    # padding rows: scales of 1, as the reference exporter writes them; zero codes, branch and bias
    padded = {k: packing.pad_to(v[:n], (np_, v.shape[1]), value=1.0 if k in ("scales", "wcscales") else 0.0)
              for k, v in rows.items()}
    layer = W4A4Linear(like.in_features, n, like.rank, like.precision, like.act_unsigned, bias="bias" in rows,
                       dtype=like.smooth_factor.dtype, device="meta")
    state = {name: getattr(like, name) for name in _INPUT_SIDE if hasattr(like, name)}
    state["qweight"] = packing.pack_qweight(padded["codes"])
    state["proj_up"] = packing.pack_up(padded["up"])
    if like.precision == "int4":
        state["wscales"] = packing.pack_scales(padded["scales"])
    else:
        state["wscales"] = packing.pack_fp8_scales(padded["scales"])
        state["wcscales"] = packing.pack_vector(padded["wcscales"].squeeze(1))
    if "bias" in padded:
        state["bias"] = packing.pack_vector(padded["bias"].squeeze(1))
    layer.load_state_dict(state, assign=True)
    layer.kernel_backend, layer.name = like.kernel_backend, like.name
    return layer


def slice_rows(layer: W4A4Linear, start: int, length: int) -> W4A4Linear:
    """Output channels [start, start + length) of ``layer`` as a layer of their own."""
    rows = {k: v[start:start + length] for k, v in _row_tensors(layer).items()}
    return _from_rows(layer, rows, length)


def join_rows(prefix: str, layers: list[W4A4Linear]) -> W4A4Linear:
    """The inverse of :func:`slice_rows`: one layer whose output is the layers' outputs in order.
    They must share their input side, as slices of one checkpoint layer do."""
    first = layers[0]
    for other in layers[1:]:
        same = (other.precision, other.act_unsigned, other.rank, other.in_features) == \
            (first.precision, first.act_unsigned, first.rank, first.in_features)
        if not same or not all(torch.equal(getattr(other, name), getattr(first, name))
                               for name in _INPUT_SIDE if hasattr(first, name)):
            raise SVDQuantError(f"'{prefix}' is one fused layer in the checkpoint, but its parts in the model have "
                                "different smoothing or low-rank branches; quantize them together to save them")
    pieces = [_row_tensors(layer) for layer in layers]
    if len({tuple(p) for p in pieces}) != 1:
        raise SVDQuantError(f"'{prefix}': some of the layers fused in the checkpoint have a bias and some do not")
    rows = {k: torch.cat([p[k][:layer.out_features] for p, layer in zip(pieces, layers, strict=True)])
            for k in pieces[0]}
    return _from_rows(first, rows, sum(layer.out_features for layer in layers))


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


def checkpoint_tensors(bodies: list[tuple[QuantizedLayer, nn.Module]]) -> dict[str, torch.Tensor]:
    """Every checkpoint tensor of the quantized layers ``[(layer, its body)]``; row slices of one
    checkpoint layer (spread over several ComfyUI Linears) are joined back into it."""
    out: dict[str, torch.Tensor] = {}
    sliced: dict[str, list[tuple[Part, nn.Module]]] = {}
    for layer, body in bodies:
        for part, module in zip(layer.parts, split(layer, body), strict=True):
            if part.rows:
                sliced.setdefault(part.prefix, []).append((part, module))
            else:
                out.update(part_tensors(module, part))
    for prefix, pieces in sliced.items():
        pieces.sort(key=lambda piece: piece[0].rows[0])
        starts = [part.rows[0] for part, _ in pieces]
        ends = [part.rows[0] + part.rows[1] for part, _ in pieces]
        if starts[0] != 0 or starts[1:] != ends[:-1] or ends[-1] != pieces[0][0].out_features:
            raise SVDQuantError(f"'{prefix}': the model does not hold every row of this fused checkpoint layer")
        fused = join_rows(prefix, [module for _, module in pieces])
        out.update(part_tensors(fused, dataclasses.replace(pieces[0][0], rows=None)))
    return out


def quantized_modules(body: nn.Module) -> list[nn.Module]:
    """The W4A4 / W4A16 leaves of a body, in part order."""
    return [m for m in body.modules() if isinstance(m, (W4A4Linear, W4A16Linear))]


def fit_to_model(body: nn.Module, module: str, dtype: torch.dtype) -> list[nn.Module]:
    """Name the leaves of ``body`` after the model's ``module`` (messages name the layer) and put them in
    the model's compute ``dtype`` by the kernels' dtype rule. Returns the leaves."""
    leaves = quantized_modules(body)
    for index, leaf in enumerate(leaves):
        leaf.name = module if len(leaves) == 1 else f"{module}[{index}]"
        to_compute_dtype(leaf, dtype)
    return leaves
