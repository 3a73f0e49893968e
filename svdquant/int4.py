"""INT4 numerics of SVDQuant W4A4: the contract every INT4 kernel is tested against.

Weights: symmetric, one scale per output row per 64 input channels, ``scale = absmax / 7`` rounded to
the 16-bit storage dtype *before* the codes are computed, so that ``code * scale`` is exactly what a
kernel reconstructs from the file.

Activations: dynamic, one fp32 scale per token per 64 channels. The input is divided by the smoothing
factor first. Layers that read a GELU output use unsigned codes: the input is shifted by +0.171875
(GELU's minimum is about -0.17, so the shifted input is non-negative) and quantized to 0..15 with
``scale = max / 15``. Every step is a single IEEE fp32 operation (add, divide, round-half-even), so a
kernel that performs the same operations produces bit-identical codes and scales.
"""

from __future__ import annotations

import torch

GROUP = 64
GELU_SHIFT = 0.171875


def _grouped(t: torch.Tensor, group: int) -> torch.Tensor:
    return t.reshape(*t.shape[:-1], t.shape[-1] // group, group)


def divide(values: torch.Tensor, divisor: float) -> torch.Tensor:
    """``values / divisor`` as one IEEE division on every device. PyTorch's CUDA kernels turn
    ``tensor / number`` into a multiplication by the rounded reciprocal, off by one bit for some
    values (seen on an H200: scales one ulp away from the CPU's and the kernels'); a 0-dim tensor on
    the same device is divided properly."""
    return values / torch.full((), divisor, dtype=values.dtype, device=values.device)


def _divide_or_zero(values: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    # An all-zero group has scale 0; its codes are 0 rather than NaN.
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    return torch.where(scale > 0, values / safe, torch.zeros_like(values))


def weight_scales(weight: torch.Tensor, scale_dtype: torch.dtype, clip: torch.Tensor | None = None) -> torch.Tensor:
    """Per row, per 64 input channels: ``absmax / 7`` in ``scale_dtype``, the absmax first multiplied by
    ``clip`` (N, K/64) when given (values beyond it then round to the end codes). Shape (N, K/64)."""
    absmax = _grouped(weight.float(), GROUP).abs().amax(dim=-1)
    if clip is not None:
        absmax = absmax * clip
    return divide(absmax, 7).to(scale_dtype)


def quantize_weight_with_scales(weight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """Round ``weight / scale`` half-to-even into [-8, 7]. Returns int8 codes of ``weight``'s shape."""
    groups = _grouped(weight.float(), GROUP)
    codes = torch.round(_divide_or_zero(groups, scales.float().unsqueeze(-1))).clamp_(-8, 7)
    return codes.reshape(weight.shape).to(torch.int8)


def quantize_weight(weight: torch.Tensor, scale_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """RTN: (int8 codes (N, K), scales (N, K/64) in ``scale_dtype``)."""
    scales = weight_scales(weight, scale_dtype)
    return quantize_weight_with_scales(weight, scales), scales


def dequantize_weight(codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """fp32 (N, K) weight that the codes and scales stand for."""
    values = _grouped(codes.float(), GROUP) * scales.float().unsqueeze(-1)
    return values.reshape(codes.shape)


def quantize_activations(
    x: torch.Tensor, smooth: torch.Tensor, unsigned: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize (M, K) activations per token per 64 channels.

    Returns int8 codes (M, K) (in [-8, 7], or [0, 15] when ``unsigned``) and fp32 scales (M, K/64).
    """
    xs = x.float()
    if unsigned:
        xs = xs + GELU_SHIFT
    groups = _grouped(xs / smooth.float(), GROUP)
    if unsigned:
        scales = divide(groups.amax(dim=-1).clamp_min(0), 15)
        low, high = 0, 15
    else:
        scales = divide(groups.abs().amax(dim=-1), 7)
        low, high = -8, 7
    codes = torch.round(_divide_or_zero(groups, scales.unsqueeze(-1))).clamp_(low, high)
    return codes.reshape(xs.shape).to(torch.int8), scales


def dequantize_activations(codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    values = _grouped(codes.float(), GROUP) * scales.unsqueeze(-1)
    return values.reshape(codes.shape)
