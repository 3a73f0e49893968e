"""The two 4-bit residual formats behind one interface, so the quantizer's recipe is written once.

A format turns a residual (N, K) into fixed scales, rounds columns against those scales (RTN or
GPTQ), fake-quantizes activations exactly as the runtime does, and packs the result into the
checkpoint's tensors.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import int4, nvfp4, packing


@dataclass
class ResidualScales:
    effective: torch.Tensor  # fp32 (N, K/group): the factor each group's codes are multiplied by
    stored: dict[str, torch.Tensor]  # unpacked tensors as stored: wscales (N, G) [+ wcscales, wtscale]


class Int4Format:
    name = "int4"
    group = int4.GROUP

    def __init__(self, dtype: torch.dtype):
        self.dtype = dtype

    def scales(self, residual: torch.Tensor, clip: torch.Tensor | None = None) -> ResidualScales:
        wscales = int4.weight_scales(residual, self.dtype, clip)
        return ResidualScales(wscales.float(), {"wscales": wscales})

    def round(self, values: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
        """Dequantized RTN of ``values`` (N, c) against per-row ``scales`` (N, 1) or (N, c/group)."""
        safe = torch.where(scales > 0, scales, torch.ones_like(scales))
        return torch.round(values / safe).clamp_(-8, 7) * scales

    def codes(self, residual: torch.Tensor, scales: ResidualScales) -> torch.Tensor:
        return int4.quantize_weight_with_scales(residual, scales.stored["wscales"])

    def dequantize(self, codes: torch.Tensor, scales: ResidualScales) -> torch.Tensor:
        return int4.dequantize_weight(codes, scales.effective)

    def fake_quantize_input(self, x: torch.Tensor, smooth: torch.Tensor, unsigned: bool) -> torch.Tensor:
        return int4.dequantize_activations(*int4.quantize_activations(x, smooth, unsigned))

    def pack(self, codes: torch.Tensor, scales: ResidualScales, np_: int, kp: int) -> dict[str, torch.Tensor]:
        wscales = packing.pad_to(scales.stored["wscales"], (np_, kp // self.group), value=1.0)
        return {
            "qweight": packing.pack_qweight(packing.pad_to(codes, (np_, kp))),
            "wscales": packing.pack_scales(wscales),
        }


class Nvfp4Format:
    name = "nvfp4"
    group = nvfp4.GROUP

    def __init__(self, dtype: torch.dtype):
        self.dtype = dtype

    def scales(self, residual: torch.Tensor, clip: torch.Tensor | None = None) -> ResidualScales:
        group_scales, wcscales, wtscale = nvfp4.weight_scales(residual, self.dtype, clip)
        effective = nvfp4.effective_weight_scales(group_scales, wcscales, wtscale)
        return ResidualScales(effective, {"wscales": group_scales, "wcscales": wcscales, "wtscale": wtscale})

    def round(self, values: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
        safe = torch.where(scales > 0, scales, torch.ones_like(scales))
        return nvfp4.decode_e2m1(nvfp4.encode_e2m1(values / safe)) * scales

    def codes(self, residual: torch.Tensor, scales: ResidualScales) -> torch.Tensor:
        return nvfp4.quantize_weight_with_scales(residual, scales.effective)

    def dequantize(self, codes: torch.Tensor, scales: ResidualScales) -> torch.Tensor:
        return nvfp4.dequantize_weight(codes, scales.effective)

    def fake_quantize_input(self, x: torch.Tensor, smooth: torch.Tensor, unsigned: bool) -> torch.Tensor:
        return nvfp4.dequantize_activations(*nvfp4.quantize_activations(x, smooth))

    def pack(self, codes: torch.Tensor, scales: ResidualScales, np_: int, kp: int) -> dict[str, torch.Tensor]:
        group_scales = packing.pad_to(scales.stored["wscales"], (np_, kp // self.group), value=1.0)
        return {
            "qweight": packing.pack_qweight(packing.pad_to(codes, (np_, kp))),
            "wscales": packing.pack_fp8_scales(group_scales),
            "wcscales": packing.pack_vector(packing.pad_to(scales.stored["wcscales"], (np_,), value=1.0)),
            "wtscale": scales.stored["wtscale"].reshape(1),
        }


CLIP_RATIOS = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75)


def searched_scales(fmt: Int4Format | Nvfp4Format, residual: torch.Tensor, importance: torch.Tensor
                    ) -> ResidualScales:
    """Scales whose every group clips its absmax by the ratio of :data:`CLIP_RATIOS` that gives the lowest
    rounding error Σ importance_k (w_k − ŵ_k)² over the group: a smaller scale rounds the many small
    values finer at the cost of the few largest. ``importance`` (K,): the mean square of each input channel,
    so the error is the group's share of the output error (cross-channel terms aside)."""
    n, k = residual.shape
    shape = (n, k // fmt.group, fmt.group)
    best_error = best_clip = None
    for ratio in CLIP_RATIOS:
        clip = torch.full(shape[:2], ratio, device=residual.device)
        scales = fmt.scales(residual, clip)
        error = ((fmt.dequantize(fmt.codes(residual, scales), scales) - residual).square() * importance)
        error = error.reshape(shape).sum(dim=-1)
        if best_error is None:
            best_error, best_clip = error, clip
        else:
            better = error < best_error
            best_error, best_clip = torch.where(better, error, best_error), torch.where(better, clip, best_clip)
    return fmt.scales(residual, best_clip)


def residual_format(precision: str, dtype: torch.dtype) -> Int4Format | Nvfp4Format:
    return Int4Format(dtype) if precision == "int4" else Nvfp4Format(dtype)
