"""W4A16 numerics for the AdaLN modulation linears: 4-bit weights, 16-bit activations, no branch.

Unsigned codes 0..15 with a float zero point, one (scale, zero) pair per output row per 64 input
channels: ``w = code * scale + zero``. The quantizer uses the group's min/max (asymmetric), which the
file format allows because it stores the zero point as a 16-bit value, not as an integer.
"""

from __future__ import annotations

import torch

GROUP = 64


def _grouped(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(*t.shape[:-1], t.shape[-1] // GROUP, GROUP)


def quantize_weight(
    weight: torch.Tensor, scale_dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(uint8 codes (N, K), scales (N, K/64), zeros (N, K/64)); scales and zeros in ``scale_dtype``."""
    groups = _grouped(weight.float())
    low, high = groups.amin(dim=-1), groups.amax(dim=-1)
    scales = ((high - low) / 15).to(scale_dtype)
    zeros = low.to(scale_dtype)
    s = scales.float().unsqueeze(-1)
    shifted = groups - zeros.float().unsqueeze(-1)
    safe = torch.where(s > 0, s, torch.ones_like(s))
    codes = torch.where(s > 0, torch.round(shifted / safe), torch.zeros_like(shifted)).clamp_(0, 15)
    return codes.reshape(weight.shape).to(torch.uint8), scales, zeros


def dequantize_weight(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor) -> torch.Tensor:
    values = _grouped(codes.float()) * scales.float().unsqueeze(-1) + zeros.float().unsqueeze(-1)
    return values.reshape(codes.shape)
