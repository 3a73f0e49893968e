"""NVFP4 numerics of SVDQuant W4A4 (Blackwell): the contract every FP4 kernel is tested against.

Values are E2M1 (magnitudes 0, 0.5, 1, 1.5, 2, 3, 4, 6), rounded to nearest with ties to the even
code, as the hardware's ``cvt.rn.satfinite.e2m1x2`` does, and saturated at 6. A 4-bit code is
``sign << 3 | magnitude index``. Every 16 consecutive input channels share an FP8-E4M3 scale.

Weights carry two more factors so that the FP8 group scales use their whole range:
``w = e2m1 * fp8_group_scale * wcscales[n] * wtscale``, with ``wtscale = absmax(W) / (6 * 448)``
(per tensor) and ``wcscales[n] = rowmax[n] / absmax(W)`` (per output channel), both 16-bit.

Activations: per token per 16 channels, ``scale = fp8(min(absmax / 6, 448))``, no tensor scale.
"""

from __future__ import annotations

import torch

from .int4 import divide

GROUP = 16
FP8_MAX = 448.0
E2M1_MAX = 6.0
E2M1_MAGNITUDES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)

# Midpoints between neighbouring magnitudes. A tie goes to the code with an even mantissa bit:
# down at 0.25, 1.25, 2.5 and 5, up at 0.75, 1.75 and 3.5.
_ROUND_DOWN_TIES = (0.25, 1.25, 2.5, 5.0)
_ROUND_UP_TIES = (0.75, 1.75, 3.5)


def _grouped(t: torch.Tensor, group: int) -> torch.Tensor:
    return t.reshape(*t.shape[:-1], t.shape[-1] // group, group)


def encode_e2m1(values: torch.Tensor) -> torch.Tensor:
    """fp32 values (already divided by their scale) → uint8 4-bit codes."""
    magnitude = values.float().abs()
    index = torch.zeros_like(magnitude, dtype=torch.uint8)
    for t in _ROUND_DOWN_TIES:
        index += (magnitude > t).to(torch.uint8)
    for t in _ROUND_UP_TIES:
        index += (magnitude >= t).to(torch.uint8)
    sign = (values < 0).to(torch.uint8) << 3
    return sign | index


def decode_e2m1(codes: torch.Tensor) -> torch.Tensor:
    table = torch.tensor(E2M1_MAGNITUDES, dtype=torch.float32, device=codes.device)
    codes = codes.to(torch.int64) & 0xF
    magnitude = table[codes & 7]
    return torch.where(codes >= 8, -magnitude, magnitude)


def to_fp8(scales: torch.Tensor) -> torch.Tensor:
    """Round fp32 scales to FP8-E4M3 (nearest even), saturating at 448 as the CUDA conversion does."""
    return scales.float().clamp(0, FP8_MAX).to(torch.float8_e4m3fn)


def _divide_or_zero(values: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    return torch.where(scale > 0, values / safe, torch.zeros_like(values))


def weight_scales(
    weight: torch.Tensor, channel_dtype: torch.dtype, clip: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(fp8 group scales (N, K/16), wcscales (N,) and wtscale [1], both in ``channel_dtype``); each group's
    absmax is first multiplied by ``clip`` (N, K/16) when given."""
    w = weight.float()
    rowmax = w.abs().amax(dim=1)
    tensor_max = rowmax.max()
    tensor_max = torch.where(tensor_max > 0, tensor_max, torch.ones_like(tensor_max))
    # Checkpoints store wtscale in the 16-bit dtype too; round it first so the codes use what loads.
    wtscale = (tensor_max / (E2M1_MAX * FP8_MAX)).reshape(1).to(channel_dtype)
    wtscale = torch.where(wtscale > 0, wtscale, torch.finfo(channel_dtype).tiny)
    wcscales = torch.where(rowmax > 0, rowmax / tensor_max, torch.ones_like(rowmax)).to(channel_dtype)
    row_scale = wcscales.float() * wtscale.float()
    group_absmax = _grouped(w, GROUP).abs().amax(dim=-1)
    if clip is not None:
        group_absmax = group_absmax * clip
    group_scales = to_fp8(group_absmax / E2M1_MAX / row_scale.unsqueeze(1))
    return group_scales, wcscales, wtscale


def effective_weight_scales(
    group_scales: torch.Tensor, wcscales: torch.Tensor, wtscale: torch.Tensor
) -> torch.Tensor:
    """fp32 (N, K/16): the full factor each group's E2M1 codes are multiplied by."""
    return group_scales.float() * (wcscales.float() * wtscale.float()).unsqueeze(1)


def quantize_weight_with_scales(weight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """``scales``: the fp32 effective scales from :func:`effective_weight_scales`."""
    groups = _grouped(weight.float(), GROUP)
    return encode_e2m1(_divide_or_zero(groups, scales.unsqueeze(-1))).reshape(weight.shape)


def quantize_weight(
    weight: torch.Tensor, channel_dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """RTN: (uint8 codes (N, K), fp8 group scales, wcscales, wtscale)."""
    group_scales, wcscales, wtscale = weight_scales(weight, channel_dtype)
    codes = quantize_weight_with_scales(weight, effective_weight_scales(group_scales, wcscales, wtscale))
    return codes, group_scales, wcscales, wtscale


def dequantize_weight(codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """``scales``: fp32 effective scales (N, K/16)."""
    values = _grouped(decode_e2m1(codes), GROUP) * scales.unsqueeze(-1)
    return values.reshape(codes.shape)


def quantize_activations(x: torch.Tensor, smooth: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(M, K) → uint8 codes (M, K) and fp8 scales (M, K/16)."""
    groups = _grouped(x.float() / smooth.float(), GROUP)
    scales = to_fp8(divide(groups.abs().amax(dim=-1), E2M1_MAX))
    codes = encode_e2m1(_divide_or_zero(groups, scales.float().unsqueeze(-1)))
    return codes.reshape(x.shape), scales


def dequantize_activations(codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    values = _grouped(decode_e2m1(codes), GROUP) * scales.float().unsqueeze(-1)
    return values.reshape(codes.shape)
